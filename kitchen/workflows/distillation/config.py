"""The distillation workflow's settings: the shared sections plus the teacher, sampling and KL settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

from kitchen.workflows.config import (
    MISSING_DEFAULT_HINT,
    BatchSection,
    DatasetSection,
    DatumsSection,
    EvalSection,
    ModelSection,
    RegistrySection,
    RunConfig,
    Section,
    TrainingSection,
)

#: What ``make run`` (``kitchen run supervised`` with defaults) registers: the SFT champion on the
#: built-in arithmetic set (``kitchen.registry.names.derive_model_name``; a test checks the two agree).
DEFAULT_TEACHER_NAME = "supervised-smollm2-135m-instruct-kitchen-arithmetic"
DEFAULT_TEACHER = f"models:/{DEFAULT_TEACHER_NAME}@champion"
#: Said when the default teacher is not registered (``kitchen run`` preflight and the teacher asset).
MISSING_TEACHER_HINT = (
    "The default teacher is the supervised champion that `make run` (or `kitchen run supervised`) "
    "registers: run that first, or name a teacher with --teacher"
)

Mode = Literal["on_policy", "off_policy"]
MODES: tuple[Mode, ...] = ("on_policy", "off_policy")


class TeacherSection(Section):
    teacher: str = Field(
        default=DEFAULT_TEACHER,
        description="The teacher: a registered model (models:/NAME@champion, models:/NAME/3), a local "
        "Hugging Face directory, a Hub id or a Tinker model name. Default: the supervised champion `make "
        "run` registers.",
        json_schema_extra={MISSING_DEFAULT_HINT: MISSING_TEACHER_HINT},
    )
    mode: Mode = Field(
        default="on_policy",
        description="on_policy: the student samples, the teacher scores every token (reverse KL; teacher "
        "and student must tokenize identically). off_policy: SFT on the teacher's sampled replies "
        "(text-level: also works across tokenizers).",
    )


class SamplingSection(Section):
    max_tokens: int = Field(
        default=8,
        ge=1,
        le=32768,
        description="Max new tokens per sampled completion (the student's on-policy, the teacher's "
        "off-policy).",
    )
    temperature: float = Field(
        default=1.0, ge=0.0, le=10.0, description="Sampling temperature (on-policy and teacher samples)."
    )


#: Optimizer steps by default: the embedded demo (on-policy, 16 prompts a step, SmolLM2-135M) in about 7
#: minutes on a quiet 2-core CPU; a full epoch of the built-in arithmetic set is 80.
DEFAULT_MAX_STEPS = 40


class StepBudget(BatchSection):
    """How many samples training takes: read by training and by the off-policy teacher samples, which
    samples only those."""

    max_steps: int | None = Field(
        default=DEFAULT_MAX_STEPS,
        ge=1,
        description="Stop after this many optimizer steps (the default keeps the embedded demo within its "
        "CPU budget; raise it to use more of a larger prompt set).",
    )


class DistillTrainingSection(StepBudget, TrainingSection, SamplingSection):
    group_size: int = Field(
        default=1,
        ge=1,
        le=256,
        description="On-policy: student completions sampled per prompt (--batch-size counts prompts). The "
        "advantages use no group baseline, so 1 spreads the samples over the most prompts.",
    )
    kl_coef: float = Field(
        default=1.0,
        gt=0.0,
        le=1e3,
        description="On-policy: per-token advantage = -kl_coef * (logp_student - logp_teacher).",
    )
    kl_discount: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="On-policy: discount of future per-token KL folded into each token's advantage "
        "(0: none).",
    )


class TeacherSamplesSection(StepBudget, SamplingSection):
    samples_per_prompt: int = Field(
        default=1, ge=1, le=64, description="Off-policy: teacher completions sampled per training prompt."
    )
    sample_seed: int = Field(default=0, ge=0, description="Off-policy: seed of the teacher's samples.")

    def prompts_to_sample(self, available: int) -> int:
        """How many training prompts (the first ones, in split order) the teacher answers: those
        ``max_steps`` steps of ``batch_size`` samples use, or all of them without ``max_steps``. Sampling
        the rest would cost teacher time (most of an off-policy run on a CPU) for replies never trained on."""
        if self.max_steps is None:
            return available
        return min(available, -(-self.max_steps * self.batch_size // self.samples_per_prompt))


class DistillEvalSection(EvalSection):
    REPORTED_METRICS: ClassVar[tuple[str, ...]] = (*EvalSection.REPORTED_METRICS, "teacher_kl")

    gate_min_gap_closed: float | None = Field(
        default=0.25,
        ge=0.0,
        le=1.0,
        description="Share of the student's gap to the teacher (on the gate metric) that training must "
        "close (unset: no gap rule).",
    )


SECTIONS: dict[str, type[BaseModel]] = {
    "base_model": ModelSection,
    "teacher_model": TeacherSection,
    "dataset": DatasetSection,
    "teacher_samples": TeacherSamplesSection,
    "datums": DatumsSection,
    "train": DistillTrainingSection,
    "eval_report": DistillEvalSection,
    "registered_model": RegistrySection,
}


class DistillationConfig(
    RunConfig,
    ModelSection,
    TeacherSection,
    DatasetSection,
    TeacherSamplesSection,
    DatumsSection,
    DistillTrainingSection,
    DistillEvalSection,
    RegistrySection,
):
    """Everything a distillation run takes, flat (``kitchen run distillation`` / ``distill`` and
    ``distillation_job``). ``--model`` is the student."""


def smoke_run_config(model_dir: str) -> dict[str, Any]:
    """A seconds-long on-policy run on the tiny model: the student is ``model_dir``, the teacher a second
    tiny model with the same tokenizer and other random weights, built beside it once (``-teacher``).

    Gated on the held-out reverse KL to the teacher, which a few steps toward the teacher lower (random
    models get no exact match right, and a random teacher's greedy replies are no target worth a strict
    NLL rule or a share of the gap)."""
    from kitchen.models.tiny import build_tiny_model

    teacher = Path(f"{str(model_dir).rstrip('/')}-teacher")
    build_tiny_model(teacher, seed=1)
    return {
        "model": str(model_dir),
        "teacher": str(teacher),
        "dataset": "kitchen/arithmetic",
        "max_rows": 48,
        "batch_size": 4,
        "group_size": 2,
        "max_tokens": 6,
        "max_steps": 4,
        "save_every": 2,
        "learning_rate": 1e-2,
        "lora_rank": 4,
        "max_length": 64,
        "eval_examples": 8,
        "eval_max_tokens": 6,
        "gate_metric": "teacher_kl",
        "gate_margin": 0.005,
        # explicit values rather than None (no rule): `kitchen run` flags cannot unset a setting
        "gate_max_nll_increase": 1.0,
        "gate_min_gap_closed": 0.0,
    }
