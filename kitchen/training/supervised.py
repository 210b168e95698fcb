"""Supervised fine-tuning as a plan: seeded epochs of datums, ``cross_entropy``, loss per trained token.

Shared by every workflow that trains with cross-entropy on fixed datums: SFT, and off-policy distillation
(SFT on a teacher's samples).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tinker import types

from kitchen.contract import ResultFuture, TrainingClient
from kitchen.training.batching import EpochBatches
from kitchen.training.plan import PlanBase, Policy, StepBatch, weighted_nll_metrics


@dataclass
class SupervisedPlan(PlanBase):
    """Off-policy (never samples), so the loop pipelines it fully."""

    datums: list[types.Datum]
    batches: EpochBatches
    datums_hash: str

    @classmethod
    def build(
        cls,
        datums: list[types.Datum],
        *,
        datums_hash: str,
        batch_size: int,
        epochs: int,
        seed: int,
        max_steps: int | None,
    ) -> SupervisedPlan:
        batches = EpochBatches(len(datums), batch_size, epochs, seed, max_steps)
        return cls(batches.total_steps, datums=datums, batches=batches, datums_hash=datums_hash)

    def fingerprint(self) -> Mapping[str, Any]:
        b = self.batches
        return {
            "loss_fn": "cross_entropy",
            "datums_hash": self.datums_hash,
            "batch_size": b.batch_size,
            "epochs": b.epochs,
            "max_steps": b.max_steps,
        }

    def prepare(self, step: int, policy: Policy | None) -> StepBatch:
        datums = [self.datums[i] for i in self.batches.indices(step)]
        return StepBatch(epoch=self.batches.epoch_of(step), datums=datums)

    def submit(self, client: TrainingClient, batch: StepBatch) -> ResultFuture[types.ForwardBackwardOutput]:
        return client.forward_backward(batch.datums, "cross_entropy")

    def metrics(self, batch: StepBatch, output: types.ForwardBackwardOutput) -> dict[str, float]:
        return weighted_nll_metrics(batch, output)
