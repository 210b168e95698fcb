"""The DPO workflow's settings: the shared sections and DPO's own, flat (``kitchen run dpo`` takes all)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, Field

from kitchen.workflows.config import (
    DatasetSection,
    EvalSection,
    ModelSection,
    RegistrySection,
    RunConfig,
    Section,
    TrainingSection,
)
from kitchen.workflows.dpo.builtin import NAME as BUILTIN_DATASET
from kitchen.workflows.dpo.builtin import TERSE_NAME
from kitchen.workflows.dpo.loss import LossType


class PreferenceDatasetSection(DatasetSection):
    dataset: str = Field(
        default=BUILTIN_DATASET,
        description="Preference pairs: the built-in kitchen/arithmetic-preferences, a JSONL/CSV/Parquet "
        "file or directory (hh-rlhf chosen/rejected transcripts, UltraFeedback-binarized, or "
        "prompt/chosen/rejected), a save_to_disk directory, or a Hub id.",
    )


class ComparisonsSection(Section):
    max_length: int = Field(
        default=512,
        ge=8,
        le=131072,
        description="Tokens per side of a pair (prompt + reply); longer sides are cut, and a pair whose "
        "reply is cut away entirely is dropped.",
    )


class ReferenceSection(Section):
    """The reference is the model training starts from (tinker-cookbook's default); nothing to set."""


class DPOTrainingSection(TrainingSection):
    batch_size: int = Field(default=8, ge=1, le=8192, description="Preference pairs per optimizer step.")
    dpo_beta: float = Field(
        default=0.1,
        gt=0.0,
        le=1000.0,
        description="DPO's beta: how strongly the policy is held to the reference (larger: closer).",
    )
    dpo_loss: LossType = Field(
        default="sigmoid",
        description="sigmoid (DPO, tinker-cookbook), ipo or hinge (TRL's variants).",
    )


class DPOEvalSection(EvalSection):
    REPORTED_METRICS: ClassVar[tuple[str, ...]] = (
        "preference_accuracy",
        "logprob_accuracy",
        "margin",
        "chosen_logratio",
        "rejected_logratio",
        "nll",
        "exact_match",
        "f1",
        "precision",
        "recall",
    )

    gate_metric: str = Field(
        default="preference_accuracy",
        description="The quality gate's primary metric: preference_accuracy, logprob_accuracy, margin, "
        "nll, exact_match, f1, ... or '<task>/<metric>' from an eval task.",
    )
    gate_margin: float = Field(
        default=0.1,
        ge=0.0,
        le=1e6,
        description="How much the trained model must beat the starting model by (preference accuracy: the "
        "starting model, being the reference, scores 0.5).",
    )
    gate_max_nll_increase: float | None = Field(
        default=None,
        ge=0.0,
        le=1e6,
        description="How much the chosen replies' held-out NLL may rise before the gate fails (unset: no "
        "NLL rule; DPO usually lowers both replies' likelihood).",
    )


SECTIONS: dict[str, type[BaseModel]] = {
    "base_model": ModelSection,
    "dataset": PreferenceDatasetSection,
    "comparisons": ComparisonsSection,
    "reference_logprobs": ReferenceSection,
    "train": DPOTrainingSection,
    "eval_report": DPOEvalSection,
    "registered_model": RegistrySection,
}


class DPOConfig(
    RunConfig,
    ModelSection,
    PreferenceDatasetSection,
    ComparisonsSection,
    ReferenceSection,
    DPOTrainingSection,
    DPOEvalSection,
    RegistrySection,
):
    """Everything a DPO run takes, flat (``kitchen run dpo`` and ``dpo_job``)."""


def smoke_run_config(model_dir: str) -> dict[str, Any]:
    """A seconds-long flat config on a tiny model (tests and CI): 4 steps of 4 pairs of the built-in
    style preference (a random tiny model cannot learn which arithmetic answer is right, but it learns to
    prefer the bare number to chatter in a few steps), gated on held-out preference accuracy."""
    return {
        "model": str(model_dir),
        "dataset": TERSE_NAME,
        "max_rows": 32,
        "batch_size": 4,
        "max_steps": 4,
        "save_every": 2,
        "learning_rate": 1e-2,
        "lora_rank": 4,
        "max_length": 64,
        "eval_examples": 16,
        "eval_max_tokens": 4,
    }
