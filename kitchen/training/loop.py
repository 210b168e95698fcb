"""The one training loop: pipelined requests, LR schedule, checkpoints with optimizer state, resume.

Every workflow (supervised now; DPO, RL and distillation later) hands this loop a list of batches and a
loss-function name; the loop talks only to the training-client contract, so it runs unchanged on the
local engine and on Tinker.

Pipelining follows tinker-cookbook: forward_backward and optim_step for batch N+1 are submitted before
batch N's results are awaited (``max_in_flight`` steps outstanding), which hides request latency. Every
future is awaited and recorded, none dropped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tinker import types

from kitchen.contract import ResultFuture, ServiceClient, TrainingClient
from kitchen.training.schedule import LRSchedule, learning_rate_at

LEDGER_FILE = "ledger.json"
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class TrainingSpec:
    """Everything that determines a training run's result (its hash keys resume)."""

    base_model: str
    lora_rank: int
    learning_rate: float
    lr_schedule: LRSchedule
    warmup_steps: int
    total_steps: int
    save_every: int
    seed: int
    loss_fn: str = "cross_entropy"
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0
    max_in_flight: int = 8

    def adam(self, learning_rate: float) -> types.AdamParams:
        return types.AdamParams(
            learning_rate=learning_rate,
            beta1=self.beta1,
            beta2=self.beta2,
            eps=self.eps,
            weight_decay=self.weight_decay,
            grad_clip_norm=self.grad_clip_norm,
        )


@dataclass(frozen=True)
class Batch:
    """One optimizer step's data."""

    epoch: int
    datums: list[types.Datum]


@dataclass(frozen=True)
class StepMetrics:
    step: int
    epoch: int
    loss: float
    learning_rate: float
    tokens: int
    trained_tokens: int
    step_seconds: float
    tokens_per_second: float
    elapsed_seconds: float
    eta_seconds: float
    grad_norm: float | None = None


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: str
    kind: str  # "state" (weights + optimizer) or "sampler" (weights for sampling)


@dataclass
class TrainingResult:
    steps: int
    final_loss: float
    state_path: str
    sampler_path: str
    checkpoints: list[Checkpoint]
    metrics: list[StepMetrics]
    resumed_from: str | None = None
    metrics_path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class TrainingObserver(Protocol):
    """Receives progress; telemetry, Dagster logs and the CLI's progress line hang off this."""

    def on_step(self, metrics: StepMetrics, total_steps: int) -> None: ...

    def on_checkpoint(self, checkpoint: Checkpoint) -> None: ...

    def on_epoch(self, epoch: int, step: int) -> None: ...


class NullObserver:
    def on_step(self, metrics: StepMetrics, total_steps: int) -> None:
        pass

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        pass

    def on_epoch(self, epoch: int, step: int) -> None:
        pass


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


class Ledger:
    """What a training run has durably written, so an interrupted run resumes instead of restarting.

    A checkpoint enters the ledger only after its save future resolved, so the ledger never names a
    half-written checkpoint.
    """

    def __init__(self, run_dir: Path, key: str) -> None:
        self.path = run_dir / LEDGER_FILE
        self.key = key
        self.checkpoints: list[Checkpoint] = []
        self.complete = False

    @classmethod
    def open(cls, run_dir: Path, key: str) -> Ledger:
        ledger = cls(run_dir, key)
        if ledger.path.is_file():
            data = json.loads(ledger.path.read_text())
            if data.get("key") == key:
                ledger.checkpoints = [Checkpoint(**c) for c in data.get("checkpoints", [])]
                ledger.complete = bool(data.get("complete"))
        return ledger

    def latest_state(self) -> Checkpoint | None:
        states = [c for c in self.checkpoints if c.kind == "state"]
        return max(states, key=lambda c: c.step) if states else None

    def add(self, checkpoint: Checkpoint) -> None:
        self.checkpoints.append(checkpoint)
        self.save()

    def reset(self) -> None:
        self.checkpoints, self.complete = [], False
        self.save()

    def save(self) -> None:
        _write_json_atomic(
            self.path,
            {
                "key": self.key,
                "complete": self.complete,
                "checkpoints": [asdict(c) for c in self.checkpoints],
            },
        )


def _batch_counts(datums: Sequence[types.Datum]) -> tuple[int, int]:
    tokens = trained = 0
    for datum in datums:
        tokens += datum.model_input.length
        weights = datum.loss_fn_inputs["weights"].tolist()
        trained += int(sum(1 for w in weights if w > 0))
    return tokens, trained


def _batch_weight_sum(datums: Sequence[types.Datum]) -> float:
    return float(sum(sum(d.loss_fn_inputs["weights"].tolist()) for d in datums))


@dataclass
class _InFlight:
    step: int
    batch: Batch
    learning_rate: float
    forward_backward: ResultFuture[types.ForwardBackwardOutput]
    optim: ResultFuture[types.OptimStepResponse]
    save: ResultFuture[types.SaveWeightsResponse] | None = None


def run_training(
    service: ServiceClient,
    spec: TrainingSpec,
    batches: Sequence[Batch],
    run_dir: Path,
    *,
    key: str,
    observer: TrainingObserver | None = None,
    resume: bool = True,
) -> TrainingResult:
    """Train for ``spec.total_steps`` steps over ``batches`` (one per step), checkpointing and resuming."""
    if spec.total_steps != len(batches):
        raise ValueError(f"spec.total_steps={spec.total_steps} but {len(batches)} batches were given")
    if spec.max_in_flight < 1:
        raise ValueError("max_in_flight must be at least 1")
    observer = observer or NullObserver()
    run_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger.open(run_dir, key)
    metrics_path = run_dir / METRICS_FILE

    start_step, client, resumed_from = 0, None, None
    latest = ledger.latest_state() if resume and not ledger.complete else None
    if latest is not None:
        client = service.create_training_client_from_state_with_optimizer(latest.path).result()
        start_step, resumed_from = latest.step, latest.path
        history = _read_metrics(metrics_path)[:start_step]
        ledger.checkpoints = [c for c in ledger.checkpoints if c.step <= start_step]
    else:
        ledger.reset()
        history = []
        client = service.create_lora_training_client(
            spec.base_model, rank=spec.lora_rank, seed=spec.seed
        ).result()
    _rewrite_metrics(metrics_path, history)

    metrics = _drive(client, spec, batches, start_step, ledger, observer, metrics_path, history)

    final_state = client.save_state("final").result().path
    final_sampler = client.save_weights_for_sampler("final").result().path
    for checkpoint in (
        Checkpoint(spec.total_steps, final_state, "state"),
        Checkpoint(spec.total_steps, final_sampler, "sampler"),
    ):
        ledger.add(checkpoint)
        observer.on_checkpoint(checkpoint)
    ledger.complete = True
    ledger.save()
    return TrainingResult(
        steps=spec.total_steps,
        final_loss=metrics[-1].loss if metrics else math.nan,
        state_path=final_state,
        sampler_path=final_sampler,
        checkpoints=list(ledger.checkpoints),
        metrics=metrics,
        resumed_from=resumed_from,
        metrics_path=str(metrics_path),
    )


def _drive(
    client: TrainingClient,
    spec: TrainingSpec,
    batches: Sequence[Batch],
    start_step: int,
    ledger: Ledger,
    observer: TrainingObserver,
    metrics_path: Path,
    history: list[StepMetrics],
) -> list[StepMetrics]:
    metrics = list(history)
    pending: deque[_InFlight] = deque()
    started = last_done = time.perf_counter()
    done_this_run = 0

    def complete_oldest() -> None:
        nonlocal last_done, done_this_run
        item = pending.popleft()
        output = item.forward_backward.result()
        optim = item.optim.result()
        now = time.perf_counter()
        step_seconds, last_done = now - last_done, now
        done_this_run += 1
        tokens, trained = _batch_counts(item.batch.datums)
        weight_sum = _batch_weight_sum(item.batch.datums)
        loss_sum = float(output.metrics.get("loss:sum", math.nan))
        elapsed = now - started
        remaining = spec.total_steps - (item.step + 1)
        record = StepMetrics(
            step=item.step + 1,
            epoch=item.batch.epoch,
            loss=loss_sum / weight_sum if weight_sum > 0 else math.nan,
            learning_rate=item.learning_rate,
            tokens=tokens,
            trained_tokens=trained,
            step_seconds=step_seconds,
            tokens_per_second=tokens / step_seconds if step_seconds > 0 else math.nan,
            elapsed_seconds=elapsed,
            eta_seconds=elapsed / done_this_run * remaining,
            grad_norm=(optim.metrics or {}).get("grad_norm") if optim is not None else None,
        )
        metrics.append(record)
        with metrics_path.open("a") as handle:
            handle.write(json.dumps(asdict(record)) + "\n")
        observer.on_step(record, spec.total_steps)
        if item.save is not None:
            checkpoint = Checkpoint(item.step + 1, item.save.result().path, "state")
            ledger.add(checkpoint)
            observer.on_checkpoint(checkpoint)
        next_batch = batches[item.step + 1] if item.step + 1 < len(batches) else None
        if next_batch is None or next_batch.epoch != item.batch.epoch:
            observer.on_epoch(item.batch.epoch, item.step + 1)

    try:
        for step in range(start_step, spec.total_steps):
            batch = batches[step]
            lr = learning_rate_at(
                step,
                total_steps=spec.total_steps,
                base_lr=spec.learning_rate,
                schedule=spec.lr_schedule,
                warmup_steps=spec.warmup_steps,
            )
            fb = client.forward_backward(batch.datums, spec.loss_fn)
            opt = client.optim_step(spec.adam(lr))
            is_save_step = (
                spec.save_every > 0 and (step + 1) % spec.save_every == 0 and step + 1 < spec.total_steps
            )
            save = client.save_state(f"step-{step + 1:06d}") if is_save_step else None
            pending.append(_InFlight(step, batch, lr, fb, opt, save))
            while len(pending) >= spec.max_in_flight:
                complete_oldest()
        while pending:
            complete_oldest()
    except BaseException:
        # Finish what was already submitted before re-raising: steps whose results arrive are recorded
        # and their checkpoints enter the ledger, so a retry resumes as late as possible. Nothing is
        # abandoned mid-flight; the first error wins.
        while pending:
            try:
                complete_oldest()
            except Exception:
                for item in pending:
                    for future in (item.forward_backward, item.optim, item.save):
                        if future is not None:
                            with contextlib.suppress(Exception):
                                future.result()
                pending.clear()
        raise
    return metrics


def _read_metrics(path: Path) -> list[StepMetrics]:
    if not path.is_file():
        return []
    return [StepMetrics(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def _rewrite_metrics(path: Path, metrics: list[StepMetrics]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(asdict(m)) + "\n" for m in metrics))
    os.replace(tmp, path)
