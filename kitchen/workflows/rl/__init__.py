"""Reinforcement learning with verifiable rewards: ``rl/{base_model, dataset, checkpoints, trained_weights,
rollouts, eval_report, registered_model}``.

How it fits the seam: the workflow is this folder and one ``Workflow`` object, with no Dagster module of
its own. Its ``dataset`` is the standard asset with a problem row format (``problems.problem_format``: a
prompt built once with the few-shot example and format instruction, plus a reference answer the reward
function can check; rows it cannot check are skipped and counted). Its plan (``plan.RLPlan``) is an
on-policy plan (``max_staleness`` = ``--max-steps-off-policy``, 0 by default): the one loop hands each
step a sampling client on the current weights, the plan samples groups with the shared rollout machinery
(``kitchen.training.rollouts``), checks them (``rewards``), computes group-relative advantages and trains
with a built-in policy-gradient loss. ``rollouts`` is an extra output of the training step
(``Workflow.train_outputs``): the plan logs every step's rollouts as Parquet and returns their manifest
from ``outputs()``. Its evaluation (``evaluate.evaluate_rl``) answers held-out problems greedily with the
starting and the trained model and gates on accuracy (no NLL rule).
"""

from __future__ import annotations

from kitchen.data import load_saved_dataset, prompt_and_answer
from kitchen.data.sources import LoadedDataset
from kitchen.manifests import BaseModelManifest, DatasetManifest
from kitchen.models.base import hidden_size
from kitchen.training.schedule import recommended_lora_lr
from kitchen.workflows.context import PlanContext
from kitchen.workflows.registry import Workflow, register_workflow
from kitchen.workflows.rl.config import SECTIONS, RLConfig, RLDatasetSection, RLTrainSection, smoke_run_config
from kitchen.workflows.rl.evaluate import evaluate_rl, stop_tokens
from kitchen.workflows.rl.plan import Problem, RLPlan, RLSettings
from kitchen.workflows.rl.problems import ProblemPrompt, problem_format, prompt_question
from kitchen.workflows.rl.rewards import RewardRunner

NAME = "rl"


def load_problems(config: RLDatasetSection) -> LoadedDataset:
    """The source as problems prompted for ``config.reward`` (answers it cannot check skipped)."""
    prompt = ProblemPrompt(
        config.reward,
        fewshot=config.fewshot,
        format_instruction=config.format_instruction,
        system_prompt=config.system_prompt,
    )
    runner = RewardRunner(config.reward) if config.reward == "math_verify" else None
    try:
        return config.load(problem_format(prompt, runner))
    finally:
        if runner is not None:
            runner.close()


def build_plan(ctx: PlanContext) -> RLPlan:
    from transformers import AutoTokenizer

    config: RLTrainSection = ctx.config
    dataset = ctx.inputs["dataset"]
    assert isinstance(dataset, DatasetManifest)
    tokenizer = AutoTokenizer.from_pretrained(ctx.base_model.tokenizer_path)
    rows = load_saved_dataset(dataset.path)["train"]
    problems = []
    for row in rows:
        rendered = prompt_and_answer(row, tokenizer)
        problems.append(Problem(rendered.prompt_tokens, rendered.answer, prompt_question(row)))
    if config.groups_per_batch > len(problems):
        raise ValueError(
            f"--groups-per-batch {config.groups_per_batch} is more than the {len(problems)} training "
            "problems; lower it or use more data"
        )
    settings = RLSettings(
        group_size=config.group_size,
        max_tokens=config.max_tokens,
        temperature=config.temperature,
        stop=stop_tokens(tokenizer),
        loss=config.loss,
        loss_fn_config=config.loss_fn_config(),
        format_coef=config.format_coef,
        advantage_norm=config.advantage_norm,
        remove_constant_reward_groups=config.remove_constant_reward_groups,
        seed=config.seed,
    )
    sync = (
        "on-policy"
        if not config.max_steps_off_policy
        else f"up to {config.max_steps_off_policy} steps off-policy"
    )
    ctx.log(
        f"RL on {len(problems)} problems: {config.groups_per_batch} groups of {config.group_size} per step, "
        f"reward {config.reward}, loss {config.loss}, max {config.max_tokens} tokens at temperature "
        f"{config.temperature}, {sync}"
    )
    return RLPlan.build(
        problems,
        settings=settings,
        runner=RewardRunner(config.reward, timeout=config.reward_timeout),
        tokenizer=tokenizer,
        groups_per_batch=config.groups_per_batch,
        epochs=config.epochs,
        max_steps=config.max_steps,
        max_staleness=config.max_steps_off_policy,
        dataset_hash=dataset.content_hash,
        fingerprint_extra={"environment": dataset.name},
    )


#: RL's default learning rate as a share of the LoRA rule's. At the rule's own rate (1.3e-3 on SmolLM2-135M)
#: the policy's reward rose for three steps and then collapsed (0.08, 0.28, 0.33, 0.03, 0.09, ...: one
#: run, 8 groups of 4); at 0.3 of it (4e-4) it rose to 0.68 by step 5; at 1e-4, 0.15 by step 5.
RL_LR_SHARE = 0.3


def lora_learning_rate(base_model: BaseModelManifest) -> float:
    """tinker-cookbook's LoRA rule (``hyperparam_utils.get_lr``) from the model's hidden size, times
    ``RL_LR_SHARE``: the rule is tuned for supervised batches; RL's few, noisy groups per step need less."""
    return RL_LR_SHARE * recommended_lora_lr(hidden_size(base_model), base_model.architecture)


RL = register_workflow(
    Workflow(
        name=NAME,
        summary="Reinforcement learning with verifiable rewards: sample groups, check answers, "
        "group-relative advantages, policy-gradient updates.",
        config=RLConfig,
        sections=SECTIONS,
        load_dataset=load_problems,
        build_plan=build_plan,
        evaluate=evaluate_rl,
        default_learning_rate=lora_learning_rate,
        train_inputs=("dataset",),
        train_outputs={
            "rollouts": "Every step's sampled completions: prompts, replies, rewards, advantages and the "
            "sampler's logprobs (Parquet, one file a step).",
        },
        smoke_config=smoke_run_config,
    )
)

__all__ = ["NAME", "RL", "RLConfig", "RLPlan", "load_problems", "smoke_run_config"]
