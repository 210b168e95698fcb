"""The one training loop: a workflow's plan driven through the training-client contract.

Every workflow (supervised, DPO, RL, distillation) hands this loop a ``TrainingPlan``; the loop talks only
to ``kitchen.contract``, so it runs unchanged on the local engine and on Tinker. It owns:

- **Pipelining** (as tinker-cookbook does): step N+1's forward-backward and optimizer step are submitted
  before step N's results are awaited, up to ``max_in_flight`` steps outstanding. A plan that samples
  from the policy caps that at ``max_staleness + 1``, and its policy is a
  ``save_weights_and_get_sampling_client`` snapshot submitted in order after the steps before it, so an
  on-policy step N samples from exactly the weights after step N - 1.
- **The LR schedule** and Adam settings of ``TrainingSpec``.
- **Checkpoints and the ledger**: periodic ``save_state`` (weights + optimizer) recorded, with the plan's
  state, only once it resolved and every step before it succeeded. After a failed step nothing later
  enters the ledger or ``metrics.jsonl``, so a retry resumes at or before the failed batch and trains it.
- **Resume**: a run with the same key continues from its latest checkpoint, the plan restored to it.
- **Observers**: progress for telemetry, Dagster logs and the CLI.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from tinker import types

from kitchen.contract import ResultFuture, ServiceClient, TrainingClient
from kitchen.locks import file_lock
from kitchen.training.ledger import Checkpoint, Ledger
from kitchen.training.plan import Policy, StepBatch, TrainingPlan
from kitchen.training.schedule import LRSchedule, learning_rate_at

if TYPE_CHECKING:
    from kitchen.manifests import BaseModelManifest, CheckpointsManifest, WeightsManifest

METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".training.lock"

__all__ = [
    "METRICS_FILE",
    "BaseObserver",
    "Checkpoint",
    "Ledger",
    "RunDirInUseError",
    "StepMetrics",
    "TrainingObserver",
    "TrainingResult",
    "TrainingSpec",
    "read_metrics",
    "run_training",
]


@dataclass(frozen=True)
class TrainingSpec:
    """The optimizer and checkpoint settings of a run (with the plan's fingerprint, they key resume)."""

    base_model: str
    lora_rank: int
    learning_rate: float
    lr_schedule: LRSchedule
    warmup_steps: int
    save_every: int
    seed: int
    init_state: str | None = None
    """Start from these weights (a state checkpoint, fresh optimizer) instead of a new LoRA adapter."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0
    max_in_flight: int = 8

    @classmethod
    def from_section(cls, section: Any, base_model: BaseModelManifest, learning_rate: float) -> TrainingSpec:
        """The settings of a workflow's ``train`` section; a registered starting model fixes the LoRA rank
        and the weights to start from."""
        return cls(
            base_model=base_model.backend_model,
            lora_rank=base_model.lora_rank or section.lora_rank,
            learning_rate=learning_rate,
            lr_schedule=section.lr_schedule,
            warmup_steps=section.warmup_steps,
            save_every=section.save_every,
            seed=section.seed,
            init_state=base_model.init_state,
            weight_decay=section.weight_decay,
            grad_clip_norm=section.grad_clip_norm,
            max_in_flight=section.max_in_flight,
        )

    def adam(self, learning_rate: float) -> types.AdamParams:
        return types.AdamParams(
            learning_rate=learning_rate,
            beta1=self.beta1,
            beta2=self.beta2,
            eps=self.eps,
            weight_decay=self.weight_decay,
            grad_clip_norm=self.grad_clip_norm,
        )

    def resume_fields(self) -> dict[str, Any]:
        """What determines the result: pipelining depth does not, so changing it still resumes."""
        return {k: v for k, v in asdict(self).items() if k != "max_in_flight"}


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
    metrics: dict[str, float] = field(default_factory=dict)
    """The plan's metrics for the step, named as the reference implementation names them."""
    policy_version: int | None = None


@dataclass
class TrainingResult:
    steps: int
    final_loss: float
    state_path: str
    sampler_path: str
    checkpoints: list[Checkpoint]
    metrics: list[StepMetrics]
    headline: str = "loss"
    resumed_from: Checkpoint | None = None
    metrics_path: str = ""

    def manifests(
        self,
        spec: TrainingSpec,
        *,
        backend: str,
        run_name: str,
        epochs: int,
        hyperparameters: dict[str, float | int | str] | None = None,
    ) -> tuple[CheckpointsManifest, WeightsManifest]:
        """What the train step returns: the checkpoints it wrote and the final weights, hashed."""
        from kitchen.hashing import weights_content_hash
        from kitchen.manifests import CheckpointRef, CheckpointsManifest, WeightsManifest

        refs = [CheckpointRef(step=c.step, path=c.path, kind=c.kind) for c in self.checkpoints]  # type: ignore[arg-type]
        checkpoints = CheckpointsManifest(
            checkpoints=refs,
            steps=self.steps,
            epochs=epochs,
            final_loss=self.final_loss,
            metrics_path=self.metrics_path,
            backend=backend,
            run_name=run_name,
        )
        weights = WeightsManifest(
            sampler_path=self.sampler_path,
            state_path=self.state_path,
            base_model=spec.base_model,
            backend=backend,
            lora_rank=spec.lora_rank,
            steps=self.steps,
            final_loss=self.final_loss,
            content_hash=weights_content_hash(self.sampler_path),
            hyperparameters=hyperparameters or {},
        )
        return checkpoints, weights


class TrainingObserver(Protocol):
    """Receives progress; telemetry, Dagster logs and the CLI's progress line hang off this."""

    def on_start(self, total_steps: int, resumed_from: Checkpoint | None) -> None: ...

    def on_step(self, metrics: StepMetrics, total_steps: int) -> None: ...

    def on_checkpoint(self, checkpoint: Checkpoint) -> None: ...

    def on_epoch(self, epoch: int, step: int) -> None: ...


class BaseObserver:
    """No-op callbacks: subclass and override what you need."""

    def on_start(self, total_steps: int, resumed_from: Checkpoint | None) -> None:
        pass

    def on_step(self, metrics: StepMetrics, total_steps: int) -> None:
        pass

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        pass

    def on_epoch(self, epoch: int, step: int) -> None:
        pass


@dataclass
class _InFlight:
    step: int
    batch: StepBatch
    learning_rate: float
    forward_backward: ResultFuture[types.ForwardBackwardOutput]
    optim: ResultFuture[types.OptimStepResponse]
    save: ResultFuture[types.SaveWeightsResponse] | None = None
    plan_state: dict[str, Any] = field(default_factory=dict)

    def futures(self) -> list[ResultFuture[Any]]:
        return [f for f in (self.forward_backward, self.optim, self.save) if f is not None]


class RunDirInUseError(RuntimeError):
    """Another process is training in the same run directory (the same inputs)."""


@contextmanager
def _claim(run_dir: Path) -> Iterator[None]:
    with ExitStack() as held:
        try:
            held.enter_context(file_lock(run_dir / LOCK_FILE, timeout_s=0))
        except TimeoutError:  # only the claim's: a timeout while training is the backend's to judge
            raise RunDirInUseError(
                f"another training run with the same inputs is running in {run_dir}; wait for it to finish "
                "(rerunning then resumes from its checkpoints) or change an input"
            ) from None
        yield


_Train = TypeVar("_Train", bound=Callable[..., "TrainingResult"])


def _one_run_per_dir(train: _Train) -> _Train:
    """Hold the run directory's claim for the whole of ``train``, released however the process ends."""

    @functools.wraps(train)
    def claimed(
        service: ServiceClient, spec: TrainingSpec, plan: TrainingPlan, run_dir: Path, **kw: Any
    ) -> Any:
        with _claim(run_dir):
            return train(service, spec, plan, run_dir, **kw)

    return cast(_Train, claimed)


@_one_run_per_dir
def run_training(
    service: ServiceClient,
    spec: TrainingSpec,
    plan: TrainingPlan,
    run_dir: Path,
    *,
    key: str,
    observer: TrainingObserver | None = None,
    resume: bool = True,
) -> TrainingResult:
    """Train ``plan.total_steps`` steps, checkpointing into ``run_dir`` and resuming a run with ``key``.

    One run at a time per ``run_dir``: a second run with the same inputs started meanwhile fails at once
    (``RunDirInUseError``) instead of interleaving its ledger with the first's.
    """
    if plan.total_steps < 1:
        raise ValueError(f"the plan has {plan.total_steps} steps; there is nothing to train")
    if spec.max_in_flight < 1:
        raise ValueError("max_in_flight must be at least 1")
    if plan.max_staleness is not None and plan.max_staleness < 0:
        raise ValueError(f"max_staleness must be None or >= 0, got {plan.max_staleness}")
    observer = observer or BaseObserver()
    run_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger.open(run_dir, key)
    metrics_path = run_dir / METRICS_FILE

    latest = ledger.latest_state() if resume and not ledger.complete else None
    if latest is not None:
        client = service.create_training_client_from_state_with_optimizer(latest.path).result()
        history = read_metrics(metrics_path)[: latest.step]
        ledger.truncate(latest.step)
    else:
        ledger.reset()
        history = []
        if spec.init_state is not None:
            client = service.create_training_client_from_state(spec.init_state).result()
        else:
            client = service.create_lora_training_client(
                spec.base_model, rank=spec.lora_rank, seed=spec.seed
            ).result()
    _rewrite_metrics(metrics_path, history)
    start_step = latest.step if latest is not None else 0
    plan.begin(run_dir, start_step, latest.plan_state if latest is not None else {})
    observer.on_start(plan.total_steps, latest)

    driver = _Driver(client, spec, plan, ledger, observer, metrics_path, history)
    metrics = driver.run(start_step)

    final_state = client.save_state("final").result().path
    final_sampler = client.save_weights_for_sampler("final").result().path
    for checkpoint in (
        Checkpoint(plan.total_steps, final_state, "state", plan.state()),
        Checkpoint(plan.total_steps, final_sampler, "sampler"),
    ):
        ledger.add(checkpoint)
        observer.on_checkpoint(checkpoint)
    ledger.mark_complete()
    return TrainingResult(
        steps=plan.total_steps,
        final_loss=metrics[-1].loss if metrics else math.nan,
        state_path=final_state,
        sampler_path=final_sampler,
        checkpoints=list(ledger.checkpoints),
        metrics=metrics,
        headline=plan.headline,
        resumed_from=latest,
        metrics_path=str(metrics_path),
    )


class _Driver:
    """Submits steps ahead, records them in order, and stops recording at the first failure."""

    def __init__(
        self,
        client: TrainingClient,
        spec: TrainingSpec,
        plan: TrainingPlan,
        ledger: Ledger,
        observer: TrainingObserver,
        metrics_path: Path,
        history: list[StepMetrics],
    ) -> None:
        self.client, self.spec, self.plan = client, spec, plan
        self.ledger, self.observer, self.metrics_path = ledger, observer, metrics_path
        self.metrics = list(history)
        self.pending: deque[_InFlight] = deque()
        self.policy: Policy | None = None
        self.started = self.last_done = time.perf_counter()
        self.done_this_run = 0
        self.last_epoch: int | None = history[-1].epoch if history else None
        in_flight = spec.max_in_flight
        if plan.max_staleness is not None:
            in_flight = min(in_flight, plan.max_staleness + 1)
        self.max_in_flight = in_flight

    def run(self, start_step: int) -> list[StepMetrics]:
        try:
            for step in range(start_step, self.plan.total_steps):
                try:
                    item = self._submit(step)
                except Exception:
                    # Preparing or submitting step N failed: the steps already in flight come before it,
                    # so their results are recorded (a retry resumes as late as it truthfully can).
                    self._drain_earlier()
                    raise
                self.pending.append(item)
                while len(self.pending) >= self.max_in_flight:
                    self._complete_oldest()
            while self.pending:
                self._complete_oldest()
        except BaseException:
            # A step's result failed (or the run was interrupted): nothing after it is recorded; the
            # remaining steps (and any checkpoint taken after the failed step) are abandoned and what
            # has not started is cancelled, so an interrupt does not wait for outstanding requests.
            self._abandon()
            raise
        if self.last_epoch is not None:
            self.observer.on_epoch(self.last_epoch, self.plan.total_steps)
        return self.metrics

    def _policy_for(self, step: int) -> Policy | None:
        staleness = self.plan.max_staleness
        if staleness is None:
            return None
        if self.policy is None or self.policy.version < step - staleness:
            # Ordered after every step submitted so far: its weights are those after `step` steps.
            sampler = self.client.save_weights_and_get_sampling_client().result()
            self.policy = Policy(sampler, version=step)
        return self.policy

    def _submit(self, step: int) -> _InFlight:
        batch = self.plan.prepare(step, self._policy_for(step))
        spec = self.spec
        lr = learning_rate_at(
            step,
            total_steps=self.plan.total_steps,
            base_lr=spec.learning_rate,
            schedule=spec.lr_schedule,
            warmup_steps=spec.warmup_steps,
        )
        fb = self.plan.submit(self.client, batch)
        opt = self.client.optim_step(spec.adam(lr))
        is_save_step = spec.save_every > 0 and (step + 1) % spec.save_every == 0
        is_save_step = is_save_step and step + 1 < self.plan.total_steps
        save = self.client.save_state(f"step-{step + 1:06d}") if is_save_step else None
        plan_state = self.plan.state() if save is not None else {}
        return _InFlight(step, batch, lr, fb, opt, save, plan_state)

    def _complete_oldest(self) -> None:
        item = self.pending.popleft()
        output = item.forward_backward.result()
        optim = item.optim.result()
        now = time.perf_counter()
        step_seconds, self.last_done = now - self.last_done, now
        self.done_this_run += 1
        values = self.plan.metrics(item.batch, output)
        if "loss" not in values:
            raise ValueError(f"{type(self.plan).__name__}.metrics must report 'loss'; got {sorted(values)}")
        elapsed = now - self.started
        remaining = self.plan.total_steps - (item.step + 1)
        tokens = item.batch.tokens
        record = StepMetrics(
            step=item.step + 1,
            epoch=item.batch.epoch,
            loss=float(values["loss"]),
            learning_rate=item.learning_rate,
            tokens=tokens,
            trained_tokens=int(values.get("trained_tokens", 0)),
            step_seconds=step_seconds,
            tokens_per_second=tokens / step_seconds if step_seconds > 0 else math.nan,
            elapsed_seconds=elapsed,
            eta_seconds=elapsed / self.done_this_run * remaining,
            grad_norm=(optim.metrics or {}).get("grad_norm") if optim is not None else None,
            metrics={k: float(v) for k, v in values.items()},
            policy_version=item.batch.policy_version,
        )
        checkpoint = None
        if item.save is not None:
            checkpoint = Checkpoint(item.step + 1, item.save.result().path, "state", item.plan_state)
        if self.last_epoch is not None and item.batch.epoch != self.last_epoch:
            self.observer.on_epoch(self.last_epoch, item.step)
        self.last_epoch = item.batch.epoch
        self.metrics.append(record)
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(asdict(record)) + "\n")
        self.plan.on_step_complete(item.step, item.batch, output, record.metrics)
        self.observer.on_step(record, self.plan.total_steps)
        if checkpoint is not None:
            self.ledger.add(checkpoint)
            self.observer.on_checkpoint(checkpoint)

    def _drain_earlier(self) -> None:
        """Record the in-flight steps in order, stopping silently at the first that fails (the error the
        caller is raising is the one to report)."""
        while self.pending:
            try:
                self._complete_oldest()
            except Exception:
                return

    def _abandon(self) -> None:
        for item in self.pending:
            for future in item.futures():
                cancel = getattr(future, "cancel", None)
                if callable(cancel):
                    cancel()
        self.pending.clear()


def read_metrics(path: Path | str) -> list[StepMetrics]:
    """The step records a run wrote (``metrics.jsonl``), oldest first."""
    path = Path(path)
    if not path.is_file():
        return []
    return [_step_metrics(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def _step_metrics(data: Mapping[str, Any]) -> StepMetrics:
    return StepMetrics(**{k: v for k, v in data.items() if k in StepMetrics.__dataclass_fields__})


def _rewrite_metrics(path: Path, metrics: list[StepMetrics]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(asdict(m)) + "\n" for m in metrics))
    os.replace(tmp, path)
