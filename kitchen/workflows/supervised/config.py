"""The supervised workflow's settings: the shared sections, flat (``kitchen run supervised`` takes all)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from kitchen.workflows.config import (
    DatasetSection,
    DatumsSection,
    EvalSection,
    ModelSection,
    RegistrySection,
    RunConfig,
    TrainingSection,
)

SECTIONS: dict[str, type[BaseModel]] = {
    "base_model": ModelSection,
    "dataset": DatasetSection,
    "datums": DatumsSection,
    "train": TrainingSection,
    "eval_report": EvalSection,
    "registered_model": RegistrySection,
}


class SupervisedConfig(
    RunConfig, ModelSection, DatasetSection, DatumsSection, TrainingSection, EvalSection, RegistrySection
):
    """Everything a supervised run takes, flat (``kitchen run supervised`` and ``supervised_job``)."""


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
