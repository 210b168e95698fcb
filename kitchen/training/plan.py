"""What a workflow hands the one training loop: a *plan*, not a list of batches.

A plan says how many steps there are, how to prepare step N's batch (given the current policy, for
workflows that sample from the weights being trained), how to submit it (a built-in loss with its
``loss_fn_config``, or ``forward_backward_custom``), and how to turn the result into that workflow's
metrics, named as the reference implementations name them (SFT: loss per trained token; DPO:
``dpo_loss``, ``accuracy``; RL: ``env/reward/total``). The loop owns everything else: pipelining, the LR
schedule, checkpoints, the ledger, resume, observers.

Plans should make ``prepare(step, ...)`` a pure function of the step, the seed and the policy (seeded
shuffles, per-step sampling seeds): then an interrupted run resumes to the same result. Anything a plan
cannot recompute goes in ``state()``, which the loop stores with every checkpoint and hands back to
``begin`` when a run resumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tinker import types

from kitchen.contract import ResultFuture, SamplingClient, TrainingClient
from kitchen.manifests import Manifest


@dataclass(frozen=True)
class Policy:
    """A sampling client on the weights being trained, and how many optimizer steps those weights have."""

    client: SamplingClient
    version: int


@dataclass(frozen=True)
class StepBatch:
    """One optimizer step's data: the datums the loss sees, and whatever the plan needs to score them."""

    epoch: int
    datums: list[types.Datum]
    extra: Any = None
    """Plan-specific (preference pairs, rollouts with rewards): read back by ``metrics``."""
    policy_version: int | None = None
    """Which weights the batch was sampled from (None: the batch does not depend on the policy)."""

    @property
    def tokens(self) -> int:
        return sum(d.model_input.length for d in self.datums)


@runtime_checkable
class TrainingPlan(Protocol):
    """One workflow's training, step by step. ``PlanBase`` supplies the optional parts."""

    total_steps: int
    max_staleness: int | None
    """``None``: the plan never samples from the policy (SFT, DPO; full pipelining). ``0``: on-policy,
    step N samples from the weights after step N - 1. ``K``: samples may be up to K steps stale."""
    headline: str
    """The metric the progress line shows beside the loss (``loss`` itself for SFT)."""

    def fingerprint(self) -> Mapping[str, Any]:
        """Everything besides the optimizer settings that shapes the result (data hashes under keys ending
        in ``_hash``, the loss and its hyperparameters): part of the key an interrupted run resumes under;
        the scalar non-hash entries are also recorded as the run's hyperparameters."""
        ...

    def prepare(self, step: int, policy: Policy | None) -> StepBatch: ...

    def submit(self, client: TrainingClient, batch: StepBatch) -> ResultFuture[types.ForwardBackwardOutput]:
        """Submit the step's forward-backward (do not await it: the loop pipelines)."""
        ...

    def metrics(self, batch: StepBatch, output: types.ForwardBackwardOutput) -> dict[str, float]:
        """The step's metrics; must include ``loss`` (the objective, as the plan normalises it) and may
        include ``trained_tokens``."""
        ...

    def begin(self, run_dir: Path, step: int, state: Mapping[str, Any]) -> None:
        """Called once before the first ``prepare``: the run's directory (for per-step artefacts), the step
        training starts at, and the ``state()`` recorded with that step's checkpoint ({} when fresh)."""
        ...

    def state(self) -> dict[str, Any]: ...

    def on_step_complete(
        self, step: int, batch: StepBatch, output: types.ForwardBackwardOutput, metrics: Mapping[str, float]
    ) -> None:
        """A step's results arrived and were recorded (a plan may persist rollouts here)."""
        ...

    def outputs(self) -> dict[str, PlanOutput]:
        """Assets the plan produced besides the weights (``Workflow.train_outputs``), after the last step."""
        ...


@dataclass(frozen=True)
class PlanOutput:
    """One extra output of the training step: its manifest and what the UI shows about it."""

    manifest: Manifest
    metadata: dict[str, Any] = field(default_factory=dict)
    markdown: dict[str, str] = field(default_factory=dict)
    """Metadata entries rendered as Markdown (tables of rollouts, say)."""


@dataclass
class PlanBase:
    """Defaults for the optional parts of a plan: stateless, off-policy, no per-step artefacts."""

    total_steps: int
    max_staleness: int | None = field(default=None, kw_only=True)
    headline: str = field(default="loss", kw_only=True)
    run_dir: Path | None = field(default=None, kw_only=True, repr=False)

    def begin(self, run_dir: Path, step: int, state: Mapping[str, Any]) -> None:
        self.run_dir = run_dir

    def state(self) -> dict[str, Any]:
        return {}

    def outputs(self) -> dict[str, PlanOutput]:
        return {}

    def on_step_complete(
        self, step: int, batch: StepBatch, output: types.ForwardBackwardOutput, metrics: Mapping[str, float]
    ) -> None:
        pass


def weighted_nll_metrics(batch: StepBatch, output: types.ForwardBackwardOutput) -> dict[str, float]:
    """Cross-entropy's metrics: mean NLL per unit of weight (per trained token for 0/1 weights)."""
    weight_sum = trained = 0.0
    for datum in batch.datums:
        weights = datum.loss_fn_inputs["weights"].tolist()
        weight_sum += float(sum(weights))
        trained += sum(1 for w in weights if w > 0)
    loss_sum = float(output.metrics.get("loss:sum", float("nan")))
    return {
        "loss": loss_sum / weight_sum if weight_sum > 0 else float("nan"),
        "trained_tokens": trained,
    }
