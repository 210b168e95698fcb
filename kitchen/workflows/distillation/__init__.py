"""Distillation: a student learns from a teacher, off-policy (SFT on the teacher's samples) or on-policy
(the student samples, the teacher scores every token: reverse KL). ``kitchen run distillation`` (or
``distill``); assets ``distillation/{base_model, teacher_model, dataset, teacher_samples, datums,
checkpoints, trained_weights, eval_report, registered_model}``.

How it fits the seam:

- ``base_model`` is the student and ``dataset`` the prompts (``prompts.PROMPTS``: any chat schema or a
  bare prompt column; only the prompt side is used, a reply is ignored and counted), both the standard
  assets. ``teacher_model``, ``teacher_samples`` and ``datums`` are this workflow's own
  (``kitchen_assets.distillation``); ``datums`` is the shared chat-datums factory reading
  ``teacher_samples``, exactly as SFT's reads ``dataset``.
- The mode is a ``teacher_model`` setting and travels in its manifest, so every later asset reads the
  one value. The graph is static: in on-policy mode ``teacher_samples`` and ``datums`` materialise as
  ``NotUsedManifest`` (no sampling, no rendering); in off-policy mode the plan simply never samples.
- ``build_plan``: off-policy is the shared ``kitchen.training.supervised.SupervisedPlan`` on the datums
  (``cross_entropy``); on-policy is ``plan.OnPolicyDistillationPlan`` (``max_staleness`` 0,
  ``importance_sampling``) built on the shared rollout machinery (``kitchen.training.rollouts``).
- ``evaluate``: three columns (``Evaluation.reference`` is the teacher), the supervised tasks through the
  shared ``kitchen.eval.compare.score_models`` plus ``teacher_kl``; the gate's ``min_gap_closed`` rule
  comes from ``gate_min_gap_closed``.
- Registration is the standard asset; the teacher's name, registered version and hash reach the lineage
  tags as ``kitchen.teacher_model.*`` (every input manifest's identity is tagged).
"""

from __future__ import annotations

from pathlib import Path

from kitchen.data import load_saved_dataset, read_datums
from kitchen.data.sources import LoadedDataset
from kitchen.manifests import BaseModelManifest, DatasetManifest, DatumsManifest, TeacherManifest
from kitchen.models.base import hidden_size
from kitchen.training.plan import TrainingPlan
from kitchen.training.schedule import recommended_lora_lr
from kitchen.training.supervised import SupervisedPlan
from kitchen.workflows.config import DatasetSection
from kitchen.workflows.context import PlanContext, starting_sampling_client
from kitchen.workflows.distillation.config import (
    DEFAULT_TEACHER,
    DEFAULT_TEACHER_NAME,
    MODES,
    SECTIONS,
    DistillationConfig,
    smoke_run_config,
)
from kitchen.workflows.distillation.evaluate import evaluate_distillation
from kitchen.workflows.distillation.plan import OnPolicyDistillationPlan, reverse_kl_advantages
from kitchen.workflows.distillation.prompts import PROMPTS, render_prompt
from kitchen.workflows.registry import Workflow, register_workflow

NAME = "distillation"


def load_prompts(config: DatasetSection) -> LoadedDataset:
    """Any chat schema or bare prompts, normalised to prompt rows (``prompts.PROMPTS``)."""
    return config.load(PROMPTS)


def learning_rate(student: BaseModelManifest) -> float:
    """tinker-cookbook's LoRA rule (``hyperparam_utils.get_lr``) from the student's hidden size, as SFT."""
    return recommended_lora_lr(hidden_size(student), student.architecture)


def build_plan(ctx: PlanContext) -> TrainingPlan:
    teacher = ctx.inputs["teacher_model"]
    assert isinstance(teacher, TeacherManifest)
    config = ctx.config
    if teacher.mode == "off_policy":
        datums = ctx.inputs["datums"]
        if not isinstance(datums, DatumsManifest):
            raise ValueError(f"off-policy distillation needs datums of the teacher's samples; got {datums}")
        return SupervisedPlan.build(
            read_datums(Path(datums.train_path)),
            datums_hash=datums.content_hash,
            batch_size=config.batch_size,
            epochs=config.epochs,
            seed=config.seed,
            max_steps=config.max_steps,
        )
    dataset = ctx.inputs["dataset"]
    assert isinstance(dataset, DatasetManifest)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ctx.base_model.tokenizer_path)
    rows = load_saved_dataset(dataset.path)["train"]
    prompts = [render_prompt(row["messages"], tokenizer) for row in rows]
    ctx.log(
        f"on-policy distillation from {teacher.name}: {len(prompts)} prompts, {config.group_size} samples "
        f"each, up to {config.max_tokens} tokens, kl_coef {config.kl_coef}"
    )
    return OnPolicyDistillationPlan.build(
        prompts,
        starting_sampling_client(ctx.service, teacher.model),
        batch_size=config.batch_size,
        epochs=config.epochs,
        max_steps=config.max_steps,
        group_size=config.group_size,
        max_tokens=config.max_tokens,
        temperature=config.temperature,
        kl_coef=config.kl_coef,
        kl_discount=config.kl_discount,
        seed=config.seed,
        prompts_hash=dataset.content_hash,
        teacher_hash=teacher.content_hash,
    )


DISTILLATION = register_workflow(
    Workflow(
        name=NAME,
        summary="Distillation: the student learns from a teacher, on-policy (reverse KL on the student's "
        "own samples) or off-policy (SFT on the teacher's samples).",
        config=DistillationConfig,
        sections=SECTIONS,
        load_dataset=load_prompts,
        build_plan=build_plan,
        evaluate=evaluate_distillation,
        default_learning_rate=learning_rate,
        train_inputs=("teacher_model", "dataset", "datums"),
        eval_inputs=("teacher_model",),
        assets_module="kitchen_assets.distillation",
        aliases=("distill",),
        smoke_config=smoke_run_config,
    )
)

__all__ = [
    "DEFAULT_TEACHER",
    "DEFAULT_TEACHER_NAME",
    "DISTILLATION",
    "MODES",
    "NAME",
    "DistillationConfig",
    "OnPolicyDistillationPlan",
    "evaluate_distillation",
    "load_prompts",
    "reverse_kl_advantages",
    "smoke_run_config",
]
