"""Run configuration: one Config class per asset, and a flat per-workflow config that combines them.

The flat ``SupervisedRunConfig`` is the job's config schema (through a config mapping), so every range
check runs when a run is launched, before any asset does work. Per-asset classes stay usable on their own
for ``dagster asset materialize`` and the UI's asset launcher.
"""

from __future__ import annotations

from typing import Any, Literal

import dagster as dg
from pydantic import Field, field_validator

from kitchen.models.base import DEFAULT_MODEL

DEFAULT_DATASET = "kitchen/arithmetic"


class ModelConfig(dg.Config):
    model: str = Field(
        default=DEFAULT_MODEL,
        description="Base model: the packaged SmolLM2-135M-Instruct, a local HF directory, or a Hub id.",
    )


class DatasetConfig(dg.Config):
    dataset: str = Field(
        default=DEFAULT_DATASET,
        description="A built-in dataset, a JSONL/CSV/Parquet file, a local dataset directory, or a Hub id.",
    )
    dataset_revision: str | None = Field(default=None, description="Hub revision (branch, tag or sha).")
    test_size: float = Field(default=0.1, gt=0.0, lt=1.0, description="Held-out fraction when no test split.")
    max_rows: int | None = Field(default=None, ge=1, description="Cap on training rows (after normalising).")
    data_seed: int = Field(default=0, ge=0, description="Seed for splitting and built-in generation.")


class DatumsConfig(dg.Config):
    max_length: int = Field(
        default=256, ge=8, le=131072, description="Tokens per datum; longer rows are cut."
    )
    train_on: Literal["last_assistant", "all_assistant", "all"] = Field(
        default="all_assistant", description="Which tokens carry loss (tinker-cookbook's TrainOnWhat)."
    )


class TrainingConfig(dg.Config):
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
    max_in_flight: int = Field(default=8, ge=1, le=64, description="Steps submitted before awaiting results.")
    weight_decay: float = Field(default=0.0, ge=0.0)
    grad_clip_norm: float = Field(default=0.0, ge=0.0)
    resume: bool = Field(default=True, description="Resume an interrupted run from its last checkpoint.")


class EvalConfig(dg.Config):
    eval_examples: int = Field(
        default=100, ge=1, le=100000, description="Documents scored per task (lm-eval's limit)."
    )
    eval_max_tokens: int = Field(default=16, ge=1, le=4096, description="Max new tokens per generation.")
    eval_tasks: list[str] = Field(
        default=[],
        description="Extra lm-eval tasks (gsm8k, hellaswag, ...) or Kitchen tasks (kitchen_arithmetic), "
        "scored for base and trained model; the held-out tasks always run. Unknown names fail at launch.",
    )
    gate_metric: str = Field(
        default="exact_match",
        description="The quality gate's primary metric: a held-out one (exact_match, f1, precision, recall, "
        "nll, perplexity) or '<task>/<metric>' from an eval task.",
    )
    gate_margin: float = Field(
        default=0.02, ge=0.0, le=1e6, description="How much the trained model must beat the base by."
    )
    gate_max_nll_increase: float = Field(
        default=0.0, ge=0.0, le=1e6, description="How much held-out NLL may rise before the gate fails."
    )

    @field_validator("eval_tasks", mode="before")
    @classmethod
    def _split_task_list(cls, value: Any) -> Any:
        """``"gsm8k,hellaswag"`` (the CLI's form) becomes a list."""
        return [t for t in value.split(",") if t.strip()] if isinstance(value, str) else value

    @field_validator("eval_tasks")
    @classmethod
    def _known_tasks(cls, value: list[str]) -> list[str]:
        from kitchen.eval.harness import EvalTaskError, check_task_names

        try:
            return check_task_names(value)
        except EvalTaskError as err:
            raise ValueError(str(err)) from err

    @field_validator("gate_metric")
    @classmethod
    def _heldout_or_qualified(cls, value: str) -> str:
        from kitchen.eval.harness import HELDOUT_METRICS

        if "/" not in value and value not in HELDOUT_METRICS:
            known = ", ".join(HELDOUT_METRICS)
            raise ValueError(f"unknown held-out metric {value!r}; use one of {known} or <task>/<metric>")
        return value


class RegistryConfig(dg.Config):
    registered_model_name: str | None = Field(
        default=None,
        description="MLflow registered model to add a version to; default <workflow>-<base model>-<dataset>.",
    )
    mlflow_run_name: str | None = Field(
        default=None, description="Name of the run's MLflow run (default <workflow>-<Dagster run id prefix>)."
    )

    @field_validator("registered_model_name")
    @classmethod
    def _mlflow_accepts_name(cls, value: str | None) -> str | None:
        """Checked at launch, so a name MLflow would refuse fails before training, naming the rule."""
        from kitchen.registry.names import validate_model_name

        return None if value is None else validate_model_name(value)


class SupervisedRunConfig(
    ModelConfig, DatasetConfig, DatumsConfig, TrainingConfig, EvalConfig, RegistryConfig
):
    """Everything a supervised run takes, flat (what ``kitchen run supervised`` and the job accept)."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


def split_run_config(flat: SupervisedRunConfig, op_names: dict[str, type[dg.Config]]) -> dict[str, Any]:
    """Per-op config for each op name from the flat config (each class keeps only its own fields)."""
    values = flat.model_dump()
    return {op: {"config": {name: values[name] for name in cls.model_fields}} for op, cls in op_names.items()}


def smoke_run_config(model_dir: str) -> dict[str, Any]:
    """The flat config of a seconds-long smoke run on a tiny model (``kitchen.models.tiny``): CI's
    ``dagster asset materialize`` and the tests use it.

    4 optimizer steps on 48 built-in rows, gated on held-out NLL, which a few steps do move (a random
    model gets no arithmetic right, so exact match cannot pass a gate); the gate still fails a run that
    did not lower NLL by 0.01.
    """
    return {
        "model": str(model_dir),
        "dataset": "kitchen/arithmetic",
        "max_rows": 48,
        "batch_size": 8,
        "max_steps": 4,
        "save_every": 2,
        "learning_rate": 5e-3,
        "lora_rank": 4,
        "max_length": 64,
        "eval_examples": 6,
        "eval_max_tokens": 4,
        "gate_metric": "nll",
        "gate_margin": 0.01,
    }
