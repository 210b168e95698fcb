"""Training events through the loop's ``TrainingObserver`` seam, so the loop knows nothing of telemetry."""

from __future__ import annotations

import math

from kitchen.telemetry.events import (
    RUN_METADATA,
    TRAINING_CHECKPOINT,
    TRAINING_EPOCH,
    TRAINING_START,
    TRAINING_STEP,
    current_scope,
    emit,
)
from kitchen.training.loop import BaseObserver, Checkpoint, StepMetrics, TrainingObserver


class TelemetryObserver(BaseObserver):
    """Emits ``kitchen.training.step``, ``.epoch`` and ``.checkpoint``.

    Construct it inside a telemetry scope (a Kitchen asset provides one): it checks for the run id and
    workflow up front, so a misuse fails before training starts rather than at step one.
    """

    def __init__(self, headline: str = "loss") -> None:
        self.headline = headline
        missing = [k for k in RUN_METADATA if k not in current_scope()]
        if missing:
            raise RuntimeError(
                f"TelemetryObserver needs a telemetry scope with {missing} (see kitchen.telemetry.scope)"
            )

    def on_start(self, total_steps: int, resumed_from: Checkpoint | None) -> None:
        emit(
            TRAINING_START,
            {"total_steps": total_steps, "start_step": resumed_from.step if resumed_from else 0},
            {"resumed_from": resumed_from.path if resumed_from else None, "headline": self.headline},
        )

    def on_step(self, metrics: StepMetrics, total_steps: int) -> None:
        measurements: dict[str, float | int] = {
            "step": metrics.step,
            "epoch": metrics.epoch,
            "loss": metrics.loss,
            "learning_rate": metrics.learning_rate,
            "tokens": metrics.tokens,
            "trained_tokens": metrics.trained_tokens,
            "tokens_per_second": metrics.tokens_per_second,
            "step_seconds": metrics.step_seconds,
            "elapsed_seconds": metrics.elapsed_seconds,
            "eta_seconds": metrics.eta_seconds,
        }
        if metrics.grad_norm is not None and math.isfinite(metrics.grad_norm):
            measurements["grad_norm"] = metrics.grad_norm
        # The plan's own metrics under their reference names (dpo_loss, env/reward/total, teacher_kl).
        for name, value in metrics.metrics.items():
            measurements.setdefault(name, value)
        emit(TRAINING_STEP, measurements, {"total_steps": total_steps})

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        emit(
            TRAINING_CHECKPOINT, {"step": checkpoint.step}, {"uri": checkpoint.path, "kind": checkpoint.kind}
        )

    def on_epoch(self, epoch: int, step: int) -> None:
        emit(TRAINING_EPOCH, {"epoch": epoch, "step": step})


class CompositeObserver:
    """Fans each callback out to several observers, in order (Dagster log lines and telemetry together)."""

    def __init__(self, *observers: TrainingObserver) -> None:
        self.observers = observers

    def on_start(self, total_steps: int, resumed_from: Checkpoint | None) -> None:
        for observer in self.observers:
            observer.on_start(total_steps, resumed_from)

    def on_step(self, metrics: StepMetrics, total_steps: int) -> None:
        for observer in self.observers:
            observer.on_step(metrics, total_steps)

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        for observer in self.observers:
            observer.on_checkpoint(checkpoint)

    def on_epoch(self, epoch: int, step: int) -> None:
        for observer in self.observers:
            observer.on_epoch(epoch, step)
