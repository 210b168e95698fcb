"""The RL workflow's settings: one section per asset, flat for ``kitchen run rl`` and ``rl_job``.

Defaults follow tinker-cookbook's ``math_rl`` recipe where it states one (group size 4, temperature 1,
``max_tokens`` 5, ``importance_sampling``, constant learning rate, format coefficient 0.1, synchronous
sampling), scaled to a 2-core CPU where it must be (8 problems per step rather than 100; the built-in
environment's operands in [0, 10], which SmolLM2-135M answers often enough for groups to disagree, rather
than [0, 100], where it answers almost none and every group's reward is constant).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from kitchen.workflows.config import (
    DatasetSection,
    EvalSection,
    LoopSection,
    ModelSection,
    RegistrySection,
    RunConfig,
    Section,
)
from kitchen.workflows.rl.problems import ADDITION, ADDITION_SMALL
from kitchen.workflows.rl.rewards import validate_reward

LossName = Literal["importance_sampling", "ppo", "cispo"]
CLIPPED_LOSSES = ("ppo", "cispo")
#: tinker-cookbook's math_rl ``max_tokens``: a sum and the stop token fit.
DEFAULT_MAX_TOKENS = 5


class RewardChoice(Section):
    reward: str = Field(
        default="integer",
        description="How a reply is checked against the answer: integer (its last integer), math_verify "
        "(Hugging Face math-verify, gold first), boxed (its last \\boxed{}), or module:function (yours: "
        "function(reply, answer) -> correct in [0, 1], or (correct, format)).",
    )

    @field_validator("reward")
    @classmethod
    def _known_or_importable(cls, value: str) -> str:
        return validate_reward(value)


class RewardSection(RewardChoice):
    format_coef: float = Field(
        default=0.1,
        ge=0.0,
        le=10.0,
        description="Reward = correct + format_coef * (format - 1): the penalty for a reply that did not "
        "end with the stop token or lacks the checked form (tinker-cookbook's 0.1).",
    )
    reward_timeout: float = Field(
        default=5.0,
        gt=0.0,
        le=600.0,
        description="Seconds one reply's check may take; a check that fails or takes longer scores 0 and "
        "is counted (math_verify and user functions run in a worker process that is killed then).",
    )


class RLDatasetSection(DatasetSection, RewardChoice):
    dataset: str = Field(
        default=ADDITION_SMALL,
        description="Problems with checkable answers: a built-in environment (kitchen/addition-10, "
        "kitchen/addition: the cookbook's [0, 100]), or a "
        "JSONL/CSV/Parquet file, directory or Hub id with question/answer (GSM8K), prompt/answer, "
        "problem/answer, problem/solution (\\boxed{}) or messages(+answer) rows.",
    )
    dedup: Literal["all", "heldout", "off"] = Field(
        default="heldout",
        description="Exact duplicates (normalised text) to remove: 'heldout' (within held-out, and held-out "
        "problems seen in training; training repeats are kept, as the cookbook's i.i.d. draws have them), "
        "'all' (training repeats too), 'off'.",
    )
    fewshot: bool = Field(
        default=True,
        description="Start each prompt with one worked example in the answer format the reward checks "
        "(tinker-cookbook's prefix: 'What is 4 + 5?' -> '9' for integer; a \\boxed{} example for boxed "
        "and math_verify).",
    )
    format_instruction: bool = Field(
        default=True,
        description="Append the reward's format instruction to each question (boxed and math_verify: "
        "' Write your answer in \\boxed{} format.', as tinker-cookbook's math environments).",
    )
    system_prompt: str | None = Field(
        default=None,
        description="A system message for every prompt (default: the row's own, else the chat template's).",
    )


class RLTrainSection(LoopSection, RewardSection):
    lr_schedule: Literal["linear", "cosine", "constant"] = Field(
        default="constant",
        description="Learning-rate schedule after warmup (tinker-cookbook's RL: constant).",
    )
    group_size: int = Field(
        default=4,
        le=1024,
        description="Completions sampled per problem; advantages are relative to the group's mean reward.",
    )
    groups_per_batch: int = Field(default=8, ge=1, le=8192, description="Problems per optimizer step.")
    max_tokens: int = Field(
        default=DEFAULT_MAX_TOKENS, ge=1, le=32768, description="Max tokens sampled per completion."
    )
    temperature: float = Field(
        default=1.0,
        gt=0.0,
        le=10.0,
        description="Sampling temperature (the sampler's logprobs are the policy's at temperature 1, so "
        "other values make training off-policy).",
    )
    loss: LossName = Field(
        default="importance_sampling",
        description="Policy-gradient loss: importance_sampling (tinker-cookbook's default), ppo or cispo.",
    )
    clip_low_threshold: float | None = Field(
        default=None, ge=0.0, description="ppo/cispo: lower clip of the importance ratio (default 0.8 / 0.0)."
    )
    clip_high_threshold: float | None = Field(
        default=None, gt=0.0, description="ppo/cispo: upper clip of the importance ratio (default 1.2 / 4.0)."
    )
    advantage_norm: Literal["none", "group"] = Field(
        default="none",
        description="none: reward minus the group mean (tinker-cookbook); group: also divided by the group's "
        "standard deviation + 1e-4 (TRL's GRPO).",
    )
    remove_constant_reward_groups: bool = Field(
        default=False,
        description="Leave out of the step the groups whose completions all got the same reward (their "
        "advantages are 0).",
    )
    max_steps_off_policy: int = Field(
        default=0,
        ge=0,
        le=64,
        description="0: every step samples from the current weights. K: samples may come from weights up to "
        "K steps old (tinker-cookbook's async mode; staleness is recorded per rollout).",
    )

    @field_validator("group_size")
    @classmethod
    def _a_group_to_compare(cls, value: int) -> int:
        if value < 2:
            raise ValueError(
                f"advantages are relative to the group (reward minus the group mean; --advantage-norm group "
                f"also divides by its std), so a group of {value} has no signal: use --group-size 2 or more"
            )
        return value

    @model_validator(mode="after")
    def _clips_belong_to_clipped_losses(self) -> Any:
        clips = {k: v for k, v in self.loss_fn_config().items()}
        if clips and self.loss not in CLIPPED_LOSSES:
            raise ValueError(
                f"--clip-low-threshold/--clip-high-threshold apply to ppo and cispo, not {self.loss}"
            )
        low, high = self.clip_low_threshold, self.clip_high_threshold
        if low is not None and high is not None and low > high:
            raise ValueError(f"clip_low_threshold {low} is above clip_high_threshold {high}")
        return self

    def loss_fn_config(self) -> dict[str, float]:
        """The ``loss_fn_config`` the loss is called with (unset thresholds: Tinker's defaults)."""
        return {
            k: float(v)
            for k, v in (
                ("clip_low_threshold", self.clip_low_threshold),
                ("clip_high_threshold", self.clip_high_threshold),
            )
            if v is not None
        }


class RLEvalSection(EvalSection, RewardSection):
    REPORTED_METRICS: ClassVar[tuple[str, ...]] = ("accuracy", "format", "reward")

    eval_examples: int = Field(
        default=200, ge=1, le=100000, description="Held-out problems answered greedily by each model."
    )
    eval_max_tokens: int = Field(
        default=DEFAULT_MAX_TOKENS, ge=1, le=32768, description="Max new tokens per held-out answer."
    )
    gate_metric: str = Field(
        default="accuracy",
        description="The quality gate's primary metric: accuracy (by the reward function), format, reward.",
    )
    gate_max_nll_increase: float | None = Field(
        default=None, description="Not used by RL (its evaluation has no held-out NLL)."
    )

    @field_validator("eval_tasks")
    @classmethod
    def _no_lm_eval_tasks(cls, value: list[str]) -> list[str]:
        if value:
            raise ValueError(
                "rl scores its own held-out problems with the reward function; extra lm-eval tasks are not "
                "supported by this workflow (evaluate the registered model with the supervised workflow's "
                "evaluation job instead)"
            )
        return value

    @field_validator("gate_max_nll_increase")
    @classmethod
    def _no_nll_rule(cls, value: float | None) -> float | None:
        if value is not None:
            raise ValueError("rl's evaluation reports no held-out NLL, so there is no NLL rule to set")
        return value


SECTIONS: dict[str, type[BaseModel]] = {
    "base_model": ModelSection,
    "dataset": RLDatasetSection,
    "train": RLTrainSection,
    "eval_report": RLEvalSection,
    "registered_model": RegistrySection,
}


class RLConfig(RunConfig, ModelSection, RLDatasetSection, RLTrainSection, RLEvalSection, RegistrySection):
    """Everything an RL run takes, flat (``kitchen run rl`` and ``rl_job``)."""


def smoke_run_config(model_dir: str) -> dict[str, Any]:
    """A seconds-long flat config on a tiny model (``kitchen.models.tiny``), for CI and the tests.

    A random tiny model never answers a sum, so under a real check every reward is the same and RL has
    nothing to learn from. The smoke run therefore uses the toy reward ``digit_share`` (the share of the
    reply that is digits; see ``kitchen.workflows.rl.rewards``), which such a model does climb in a few
    steps: it exercises sampling, the user-function worker, learning, the accuracy gate and registration.
    """
    return {
        "model": str(model_dir),
        "dataset": ADDITION,
        "reward": "kitchen.workflows.rl.rewards:digit_share",
        "max_rows": 64,
        "group_size": 8,
        "groups_per_batch": 4,
        "max_steps": 10,
        "save_every": 5,
        "learning_rate": 0.1,
        "lora_rank": 4,
        "max_tokens": 4,
        "eval_examples": 16,
        "eval_max_tokens": 4,
        "gate_margin": 0.05,
    }
