"""The supervised workflow's settings: the shared sections, flat (``kitchen run supervised`` takes all)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, Field, model_validator

from kitchen.workflows.config import (
    DatasetSection,
    DatumsSection,
    EvalSection,
    ModelSection,
    RegistrySection,
    RunConfig,
    TrainingSection,
)


class SupervisedEvalSection(EvalSection):
    REPORTED_METRICS: ClassVar[tuple[str, ...]] = (*EvalSection.REPORTED_METRICS, "judge_win_rate")

    judge: bool = Field(
        default=False,
        description="Add a pairwise LLM judge (the llm resource: KITCHEN_LLM_URL, else the packaged model "
        "sampled locally): base vs trained replies in both orders, win rate with a 95% CI.",
    )
    judge_examples: int = Field(
        default=20, ge=1, le=100000, description="Held-out prompts the judge compares (the first ones)."
    )
    judge_max_tokens: int = Field(default=8, ge=1, le=4096, description="Max tokens of one judge verdict.")

    @model_validator(mode="after")
    def _judge_metric_needs_judge(self) -> SupervisedEvalSection:
        if self.gate_metric == "judge_win_rate" and not self.judge:
            raise ValueError("gate_metric judge_win_rate needs the judge: add --judge")
        return self


SECTIONS: dict[str, type[BaseModel]] = {
    "base_model": ModelSection,
    "dataset": DatasetSection,
    "datums": DatumsSection,
    "train": TrainingSection,
    "eval_report": SupervisedEvalSection,
    "registered_model": RegistrySection,
}


class SupervisedConfig(
    RunConfig,
    ModelSection,
    DatasetSection,
    DatumsSection,
    TrainingSection,
    SupervisedEvalSection,
    RegistrySection,
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
