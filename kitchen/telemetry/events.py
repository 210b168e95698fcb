"""Kitchen's telemetry events: a catalogue of names, ``emit``, and handlers attached by name or prefix.

The model is Erlang's ``:telemetry``: an event is a name, numeric *measurements* and descriptive
*metadata*; code emits events without knowing who listens, and handlers (the JSONL, MLflow, OpenTelemetry
and Dagster sinks, or a test's collector) attach to names or prefixes. A handler that raises is reported
and detached, so a broken sink can never fail a training run.

Dispatch rides on ``blinker`` signals with the attached pattern as the sender, so an event reaches the
handlers of its own name and of each of its prefixes. ``blinker``'s own ``send`` stops at the first
receiver that raises, so ``emit`` calls the receivers itself to isolate failures.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import blinker

from kitchen.secrets import REDACTED, is_secret_name, redact_text, secret_values

log = logging.getLogger("kitchen.telemetry")

Measurement = int | float
Handler = Callable[["TelemetryEvent"], None]

# Metadata every catalogue event carries: which Dagster run, which workflow.
RUN_METADATA = ("run_id", "workflow")


@dataclass(frozen=True)
class EventSpec:
    """What an event must carry; ``emit`` rejects an event that lacks any of it."""

    name: str
    measurements: tuple[str, ...] = ()
    metadata: tuple[str, ...] = RUN_METADATA
    description: str = ""


@dataclass(frozen=True)
class TelemetryEvent:
    name: str
    measurements: Mapping[str, Measurement]
    metadata: Mapping[str, Any]
    timestamp: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        """A strict-JSON-ready dict: non-finite floats become ``None`` (JSON has no NaN)."""
        return {
            "name": self.name,
            "timestamp": self.timestamp,
            "measurements": {k: _finite_or_none(v) for k, v in self.measurements.items()},
            "metadata": _json_ready(self.metadata),
        }


def _finite_or_none(value: Measurement) -> Measurement | None:
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _json_ready(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_ready(v) for v in value]
    if isinstance(value, float):
        return _finite_or_none(value)
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


_CATALOGUE: dict[str, EventSpec] = {}
_catalogue_lock = threading.Lock()


def register_event(
    name: str, *, measurements: Iterable[str] = (), metadata: Iterable[str] = (), description: str = ""
) -> EventSpec:
    """Add an event to the catalogue (later workflows add ``kitchen.dpo.step`` and the like this way).

    ``metadata`` lists required keys beyond ``run_id`` and ``workflow``, which every event carries.
    Registering the same spec twice is harmless (module reloads); a conflicting spec is an error.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+", name):
        raise ValueError(f"event name {name!r} must be dotted lower-case words, e.g. 'kitchen.dpo.step'")
    spec = EventSpec(
        name=name,
        measurements=tuple(measurements),
        metadata=RUN_METADATA + tuple(k for k in metadata if k not in RUN_METADATA),
        description=description,
    )
    with _catalogue_lock:
        existing = _CATALOGUE.get(name)
        if existing is not None and existing != spec:
            raise ValueError(f"event {name!r} is already registered with a different spec: {existing}")
        _CATALOGUE[name] = spec
    return spec


def catalogue() -> dict[str, EventSpec]:
    """A copy of every registered event spec, by name."""
    with _catalogue_lock:
        return dict(_CATALOGUE)


WORKFLOW_START = register_event(
    "kitchen.workflow.start", metadata=("job_name",), description="A Dagster run of a workflow began."
).name
WORKFLOW_STOP = register_event(
    "kitchen.workflow.stop",
    measurements=("duration_seconds",),
    metadata=("job_name", "status"),
    description="The run ended; status is success, failure or canceled. Always follows start.",
).name
WORKFLOW_EXCEPTION = register_event(
    "kitchen.workflow.exception",
    measurements=("duration_seconds",),
    metadata=("job_name", "error_type", "error_message"),
    description="The run failed; emitted just before the workflow.stop that has status failure.",
).name
STAGE_START = register_event(
    "kitchen.stage.start", metadata=("stage",), description="An asset or asset-check step began."
).name
STAGE_STOP = register_event(
    "kitchen.stage.stop",
    measurements=("duration_seconds",),
    metadata=("stage", "status"),
    description="A step ended; status is success, failure or retry. Always follows start.",
).name
STAGE_EXCEPTION = register_event(
    "kitchen.stage.exception",
    measurements=("duration_seconds",),
    metadata=("stage", "error_type", "error_message"),
    description="A step raised; emitted just before its stage.stop.",
).name
TRAINING_STEP = register_event(
    "kitchen.training.step",
    measurements=("step", "loss", "learning_rate", "tokens", "tokens_per_second"),
    metadata=("total_steps",),
    description="One optimizer step completed (grad_norm too when the backend reports it).",
).name
TRAINING_START = register_event(
    "kitchen.training.start",
    measurements=("total_steps", "start_step"),
    metadata=("resumed_from", "headline"),
    description="Training began; start_step > 0 and resumed_from (a checkpoint URI) when it resumed; "
    "headline names the plan's main metric besides the loss.",
).name
TRAINING_EPOCH = register_event(
    "kitchen.training.epoch", measurements=("epoch", "step"), description="A pass over the data completed."
).name
TRAINING_CHECKPOINT = register_event(
    "kitchen.training.checkpoint",
    measurements=("step",),
    metadata=("uri", "kind"),
    description="A checkpoint was durably written (kind: state or sampler).",
).name
EVAL_COMPLETE = register_event(
    "kitchen.eval.complete",
    measurements=("accuracy", "f1", "precision", "recall", "nll"),
    metadata=("model", "tasks"),
    description="One model's held-out evaluation finished (model: base or trained).",
).name
MODEL_REGISTERED = register_event(
    "kitchen.model.registered",
    metadata=("model_name", "version", "alias"),
    description="A model version was registered (alias may be None).",
).name
RUN_CREATED = register_event(
    "kitchen.run.created",
    metadata=("job_name",),
    description="A Dagster run was created: queued, or started directly (then just before run.running); "
    "from Dagster's run status, timestamped when the run was created.",
).name
RUN_RUNNING = register_event(
    "kitchen.run.running", metadata=("job_name",), description="A Dagster run started executing."
).name
RUN_COMPLETED = register_event(
    "kitchen.run.completed",
    measurements=("duration_seconds",),
    metadata=("job_name",),
    description="A Dagster run succeeded; duration from its start.",
).name
RUN_FAILED = register_event(
    "kitchen.run.failed",
    measurements=("duration_seconds",),
    metadata=("job_name", "status", "error_message"),
    description="A Dagster run ended without success: status failure, or canceled.",
).name
DEPLOYMENT_UPDATED = register_event(
    "kitchen.deployment.updated",
    metadata=("url", "served_version", "registered_version", "current"),
    description="The deployment asset recorded which version a kitchen serve serves (current: the one "
    "the run registered).",
).name
FEEDBACK_RECEIVED = register_event(
    "kitchen.feedback.received",
    measurements=("seq", "choice_index"),
    metadata=("feedback_id", "completion_id", "model_version", "rating", "corrected"),
    description="kitchen serve stored one POST /v1/feedback (score among the measurements when given; "
    "never the texts). run_id is the serving session (serve-...), workflow 'serve'.",
).name
FEEDBACK_BATCH = register_event(
    "kitchen.feedback.batch",
    measurements=("feedback", "pairs", "sft_rows", "skipped"),
    metadata=("batch", "after_seq", "last_seq", "by_version"),
    description="A batch of feedback on served replies was taken in as training data (the feedback asset).",
).name
HANDLER_FAILED = register_event(
    "kitchen.telemetry.handler_failed",
    metadata=("handler_id", "event", "error_type", "error_message"),
    description="A handler raised while handling an event and was detached.",
).name


# --- scope: metadata that every event emitted inside a stage inherits -------------------------------

_scope: ContextVar[Mapping[str, Any]] = ContextVar("kitchen_telemetry_scope", default=MappingProxyType({}))


@contextlib.contextmanager
def scope(**metadata: Any) -> Iterator[Mapping[str, Any]]:
    """Metadata (run id, workflow, asset key, ...) merged into every event emitted inside the block."""
    merged = {**_scope.get(), **metadata}
    token = _scope.set(merged)
    try:
        yield merged
    finally:
        _scope.reset(token)


def current_scope() -> Mapping[str, Any]:
    return _scope.get()


# --- secrets never leave the process ----------------------------------------------------------------

# Which names and values are secrets is kitchen.secrets' rule (TINKER_API_KEY, HF_TOKEN, passwords in
# URLs, webhook URLs, OTEL_EXPORTER_OTLP_HEADERS, ...; not asset_key or tokens), shared with the registry.


def _secret_values() -> list[str]:
    return secret_values()


def _redact(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        return redact_text(value, secrets)
    if isinstance(value, Mapping):
        return {
            k: REDACTED if isinstance(k, str) and is_secret_name(k) else _redact(v, secrets)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(v, secrets) for v in value]
    return value


# --- handlers ---------------------------------------------------------------------------------------

_signal = blinker.Signal("kitchen.telemetry")
_handlers: dict[str, tuple[Callable[..., None], tuple[str, ...]]] = {}
_handlers_lock = threading.Lock()


def attach(handler_id: str, events: str | Iterable[str], handler: Handler) -> None:
    """Call ``handler(event)`` for every event whose name equals, or starts with ``<pattern>.``, a pattern.

    ``attach("mine", "kitchen.training", h)`` receives ``kitchen.training.step``, ``.epoch`` and
    ``.checkpoint``; ``attach("all", "kitchen", h)`` receives everything. Handler ids are unique.
    """
    patterns = (events,) if isinstance(events, str) else tuple(events)
    if not patterns or any(not p or p.endswith(".") for p in patterns):
        raise ValueError(f"attach({handler_id!r}): give event names or prefixes without a trailing dot")

    def receiver(sender: str, *, event: TelemetryEvent) -> None:
        handler(event)

    with _handlers_lock:
        if handler_id in _handlers:
            raise ValueError(f"a telemetry handler with id {handler_id!r} is already attached")
        for pattern in patterns:
            _signal.connect(receiver, sender=pattern, weak=False)
        _handlers[handler_id] = (receiver, patterns)


def detach(handler_id: str) -> bool:
    """Detach a handler; False when none had that id."""
    with _handlers_lock:
        entry = _handlers.pop(handler_id, None)
        if entry is None:
            return False
        _signal.disconnect(entry[0])
    return True


def attached() -> dict[str, tuple[str, ...]]:
    """Attached handler ids and the patterns each listens to."""
    with _handlers_lock:
        return {handler_id: patterns for handler_id, (_, patterns) in _handlers.items()}


@contextlib.contextmanager
def attached_handler(handler_id: str, events: str | Iterable[str], handler: Handler) -> Iterator[None]:
    """``attach`` for the duration of a block (tests, one-off collectors)."""
    attach(handler_id, events, handler)
    try:
        yield
    finally:
        detach(handler_id)


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def emit(
    name: str,
    measurements: Mapping[str, Measurement] | None = None,
    metadata: Mapping[str, Any] | None = None,
    *,
    timestamp: float | None = None,
) -> TelemetryEvent:
    """Validate an event against the catalogue and hand it to every matching handler.

    Metadata is the current ``scope`` overlaid with ``metadata``; secrets found in the environment are
    redacted before any handler sees it. A missing required field or an unknown name raises (that is a
    bug in the emitter); a handler that raises is detached and reported, never propagated.
    """
    spec = catalogue().get(name)
    if spec is None:
        raise ValueError(f"unknown telemetry event {name!r}; register it with register_event first")
    values = dict(measurements or {})
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name}: measurement {key!r} must be a number, got {value!r}")
    merged = _redact({**current_scope(), **(metadata or {})}, _secret_values())
    missing = [k for k in spec.measurements if k not in values] + [
        k for k in spec.metadata if k not in merged
    ]
    if missing:
        raise ValueError(f"{name}: missing required fields {missing}")
    event = TelemetryEvent(name, values, merged, time.time() if timestamp is None else timestamp)
    _dispatch(event)
    return event


def _dispatch(event: TelemetryEvent) -> None:
    with _handlers_lock:
        ids = {entry[0]: handler_id for handler_id, entry in _handlers.items()}
    called: set[int] = set()
    for prefix in _prefixes(event.name):
        for receiver in _signal.receivers_for(prefix):
            if id(receiver) in called or receiver not in ids:
                continue
            called.add(id(receiver))
            try:
                receiver(prefix, event=event)
            except Exception as err:  # a handler must never break the emitter
                _handler_failed(ids[receiver], event, err)


def _handler_failed(handler_id: str, event: TelemetryEvent, err: Exception) -> None:
    detach(handler_id)
    log.error("telemetry handler %r raised on %s and was detached", handler_id, event.name, exc_info=err)
    if event.name == HANDLER_FAILED:
        return
    context = {
        k: event.metadata[k] for k in ("run_id", "workflow", "asset_key", "stage") if k in event.metadata
    }
    emit(
        HANDLER_FAILED,
        metadata={
            **context,
            "handler_id": handler_id,
            "event": event.name,
            "error_type": type(err).__name__,
            "error_message": str(err),
        },
    )


def emit_model_registered(
    model_name: str, version: str | int, alias: str | None = None, **metadata: Any
) -> TelemetryEvent:
    """``kitchen.model.registered`` for a registry asset (run id, workflow, asset key come from the scope)."""
    return emit(
        MODEL_REGISTERED,
        metadata={**metadata, "model_name": model_name, "version": str(version), "alias": alias},
    )
