"""Run configuration: one Config class per asset, and a flat per-workflow config that combines them.

The flat ``SupervisedRunConfig`` is the job's config schema (through a config mapping), so every range
check runs when a run is launched, before any asset does work. Per-asset classes stay usable on their own
for ``dagster asset materialize`` and the UI's asset launcher.
"""

from __future__ import annotations

from typing import Any, Literal

import dagster as dg
from pydantic import Field

from kitchen.models.base import DEFAULT_MODEL

DEFAULT_DATASET = "kitchen/arithmetic"


class ModelConfig(dg.Config):  # type: ignore[misc]
    model: str = Field(
        default=DEFAULT_MODEL,
        description="Base model: the packaged SmolLM2-135M-Instruct, a local HF directory, or a Hub id.",
    )


class DatasetConfig(dg.Config):  # type: ignore[misc]
    dataset: str = Field(
        default=DEFAULT_DATASET,
        description="A built-in dataset, a JSONL/CSV/Parquet file, a local dataset directory, or a Hub id.",
    )
    dataset_revision: str | None = Field(default=None, description="Hub revision (branch, tag or sha).")
    test_size: float = Field(default=0.1, gt=0.0, lt=1.0, description="Held-out fraction when no test split.")
    max_rows: int | None = Field(default=None, ge=1, description="Cap on training rows (after normalising).")
    data_seed: int = Field(default=0, ge=0, description="Seed for splitting and built-in generation.")


class DatumsConfig(dg.Config):  # type: ignore[misc]
    max_length: int = Field(default=256, ge=8, le=131072, description="Tokens per datum; longer rows are cut.")
    train_on: Literal["last_assistant", "all_assistant", "all"] = Field(
        default="all_assistant", description="Which tokens carry loss (tinker-cookbook's TrainOnWhat)."
    )


class TrainingConfig(dg.Config):  # type: ignore[misc]
    epochs: int = Field(default=1, ge=1, le=1000)
    batch_size: int = Field(default=16, ge=1, le=8192)
    learning_rate: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="Adam learning rate; default: tinker-cookbook's recommended LoRA rate for the model.",
    )
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = Field(default=0, ge=0)
    lora_rank: int = Field(default=32, ge=1, le=1024)
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps.")
    save_every: int = Field(default=20, ge=0, description="Checkpoint (with optimizer state) every N steps.")
    seed: int = Field(default=0, ge=0)
    max_in_flight: int = Field(default=2, ge=1, le=64, description="Steps submitted before awaiting results.")
    weight_decay: float = Field(default=0.0, ge=0.0)
    grad_clip_norm: float = Field(default=0.0, ge=0.0)
    resume: bool = Field(default=True, description="Resume an interrupted run from its last checkpoint.")


class EvalConfig(dg.Config):  # type: ignore[misc]
    eval_examples: int = Field(default=100, ge=0, le=100000, description="Test rows generated and scored.")
    eval_max_tokens: int = Field(default=16, ge=1, le=4096, description="Max new tokens per generation.")


class SupervisedRunConfig(ModelConfig, DatasetConfig, DatumsConfig, TrainingConfig, EvalConfig):
    """Everything a supervised run takes, flat (what ``kitchen run supervised`` and the job accept)."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


def split_run_config(flat: SupervisedRunConfig, op_names: dict[str, type[dg.Config]]) -> dict[str, Any]:
    """Per-op config for each op name from the flat config (each class keeps only its own fields)."""
    values = flat.model_dump()
    return {
        op: {"config": {name: values[name] for name in cls.model_fields}} for op, cls in op_names.items()
    }
