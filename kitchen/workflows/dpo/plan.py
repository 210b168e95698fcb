"""DPO as a plan: seeded epochs of preference pairs, each step one ``forward_backward_custom`` whose loss is
``kitchen.workflows.dpo.loss.dpo_loss`` against the stored reference log-probabilities.

A step's batch is whole pairs (``EpochBatches`` shuffles pair indices, and each pair contributes its
chosen and its rejected datum, adjacent), so a pair is never split across steps. The loss runs where the
SDK runs custom losses (the local engine's worker, or the Tinker client): no DPO code in any engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tinker import types

from kitchen.contract import CustomLossFn, ResultFuture, TrainingClient
from kitchen.training.batching import EpochBatches
from kitchen.training.plan import PlanBase, Policy, StepBatch
from kitchen.workflows.dpo.loss import dpo_loss, normalizes_length, sequence_logprob

METRICS = ("dpo_loss", "accuracy", "margin", "chosen_reward", "rejected_reward")


@dataclass(frozen=True)
class PairBatch:
    """What a step's loss needs beside the datums: the reference's sequence log-probabilities per pair."""

    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor


def reference_sequence_logprobs(
    datums: Sequence[types.Datum], reference: Sequence[np.ndarray], *, normalize: bool
) -> torch.Tensor:
    """Each datum's reference sequence log-probability (the loss's weighting, applied to the reference)."""
    if len(datums) != len(reference):
        raise ValueError(f"{len(reference)} reference rows for {len(datums)} datums")
    values = []
    for index, (datum, logprobs) in enumerate(zip(datums, reference, strict=True)):
        weights = datum.loss_fn_inputs["weights"].to_torch()
        if weights.shape[0] != len(logprobs):
            raise ValueError(
                f"datum {index}: {len(logprobs)} reference logprobs for {weights.shape[0]} targets"
            )
        values.append(sequence_logprob(torch.from_numpy(logprobs), weights, normalize=normalize))
    return torch.stack(values)


def dpo_loss_fn(batch: PairBatch, *, beta: float, loss_type: str) -> CustomLossFn:
    """The ``forward_backward_custom`` loss for one batch of interleaved (chosen, rejected) datums."""
    normalize = normalizes_length(loss_type)

    def loss_fn(
        data: list[types.Datum], logprobs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        policy = [
            sequence_logprob(lp, d.loss_fn_inputs["weights"].to_torch(), normalize=normalize)
            for d, lp in zip(data, logprobs, strict=True)
        ]
        return dpo_loss(
            torch.stack(policy[0::2]),
            torch.stack(policy[1::2]),
            batch.ref_chosen,
            batch.ref_rejected,
            beta=beta,
            loss_type=loss_type,
        )

    return loss_fn


@dataclass
class DPOPlan(PlanBase):
    """Off-policy (never samples), so the loop pipelines it fully."""

    datums: list[types.Datum]
    """Interleaved: pair i is datums[2i] (chosen) and datums[2i + 1] (rejected)."""
    reference: torch.Tensor
    """Each datum's reference sequence log-probability (length-normalised for IPO)."""
    batches: EpochBatches
    beta: float
    loss_type: str
    identity: Mapping[str, Any]
    """Data hashes and the reference's name: part of the fingerprint."""

    @classmethod
    def build(
        cls,
        datums: list[types.Datum],
        reference_logprobs: Sequence[np.ndarray],
        *,
        beta: float,
        loss_type: str,
        batch_size: int,
        epochs: int,
        seed: int,
        max_steps: int | None,
        identity: Mapping[str, Any],
    ) -> DPOPlan:
        if len(datums) % 2:
            raise ValueError(f"{len(datums)} datums cannot be (chosen, rejected) pairs")
        reference = reference_sequence_logprobs(
            datums, reference_logprobs, normalize=normalizes_length(loss_type)
        )
        batches = EpochBatches(len(datums) // 2, batch_size, epochs, seed, max_steps)
        return cls(
            batches.total_steps,
            datums=datums,
            reference=reference,
            batches=batches,
            beta=beta,
            loss_type=loss_type,
            identity=dict(identity),
            headline="accuracy",
        )

    def fingerprint(self) -> Mapping[str, Any]:
        b = self.batches
        return {
            "loss_fn": "dpo",
            "dpo_loss": self.loss_type,
            "dpo_beta": self.beta,
            **self.identity,
            "batch_size": b.batch_size,
            "epochs": b.epochs,
            "max_steps": b.max_steps,
        }

    def prepare(self, step: int, policy: Policy | None) -> StepBatch:
        pairs = self.batches.indices(step)
        datums = [self.datums[2 * i + side] for i in pairs for side in (0, 1)]
        chosen = torch.tensor([2 * i for i in pairs])
        extra = PairBatch(ref_chosen=self.reference[chosen], ref_rejected=self.reference[chosen + 1])
        return StepBatch(epoch=self.batches.epoch_of(step), datums=datums, extra=extra)

    def submit(self, client: TrainingClient, batch: StepBatch) -> ResultFuture[types.ForwardBackwardOutput]:
        return client.forward_backward_custom(
            batch.datums, dpo_loss_fn(batch.extra, beta=self.beta, loss_type=self.loss_type)
        )

    def metrics(self, batch: StepBatch, output: types.ForwardBackwardOutput) -> dict[str, float]:
        missing = [name for name in METRICS if name not in output.metrics]
        if missing:
            raise ValueError(
                f"forward_backward_custom returned no {missing}: the DPO loss's metrics are lost"
            )
        values = {name: float(output.metrics[name]) for name in METRICS}
        trained = sum(int(np.count_nonzero(d.loss_fn_inputs["weights"].to_numpy())) for d in batch.datums)
        return {
            "loss": values["dpo_loss"],
            **values,
            "num_pairs": float(len(batch.datums) // 2),
            "num_tokens": float(batch.tokens),
            "trained_tokens": float(trained),
        }
