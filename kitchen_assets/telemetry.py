"""Kitchen telemetry on the Dagster side: workflow and stage events from Dagster's own run lifecycle.

Every Kitchen asset's compute function is wrapped by ``instrumented`` (applied in the asset factories).
The first wrapped step of a run subscribes to the run's Dagster event stream on the instance and replays
what was already logged, so ``kitchen.workflow.*`` and ``kitchen.stage.*`` are translated from RUN_START,
STEP_START, STEP_SUCCESS, STEP_FAILURE and RUN_SUCCESS/FAILURE/CANCELED in one place, with Dagster's
timestamps, for every step of the run (asset checks and steps that fail outside user code included).
This works the same under ``kitchen run`` and tests (``execute_in_process``), ``dagster asset materialize``
and ``dagster dev``, because it needs only the in-process executor and the instance the run uses.

Inside a step the wrapper also sets the telemetry scope (run id, workflow, stage, asset key), which is
where in-asset events such as ``kitchen.training.step`` get those fields from.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import dagster as dg
from dagster import DagsterEventType
from dagster._core.definitions.dependency import NodeHandle  # not re-exported; the asset layer is keyed by it

from kitchen import telemetry
from kitchen.telemetry import sinks
from kitchen.telemetry.events import (
    EVAL_COMPLETE,
    HANDLER_FAILED,
    STAGE_EXCEPTION,
    STAGE_START,
    STAGE_STOP,
    TRAINING_STEP,
    WORKFLOW_EXCEPTION,
    WORKFLOW_START,
    WORKFLOW_STOP,
    TelemetryEvent,
)
from kitchen.telemetry.sinks.jsonl import jsonl_path

log = logging.getLogger("kitchen.telemetry")

WORKFLOW_TAG = "kitchen/workflow"  # set by each workflow's job; otherwise the asset group names the workflow
JSONL_TAG = "kitchen/telemetry_jsonl"  # the run's JSONL event stream, on the Dagster run

_LIFECYCLE = {
    DagsterEventType.RUN_START,
    DagsterEventType.RUN_SUCCESS,
    DagsterEventType.RUN_FAILURE,
    DagsterEventType.RUN_CANCELED,
    DagsterEventType.STEP_START,
    DagsterEventType.STEP_SUCCESS,
    DagsterEventType.STEP_FAILURE,
    DagsterEventType.STEP_UP_FOR_RETRY,
}


# --- stage identity -------------------------------------------------------------------------------


def stage_keys(job_def: dg.JobDefinition, step_key: str) -> tuple[list[str], list[str]]:
    """A step's asset keys (in output order, selected ones only) and asset-check keys, as user strings."""
    node = NodeHandle(step_key.split(".")[0].split("[")[0], None)
    layer = job_def.asset_layer
    assets_def = layer.get_assets_def_for_node(node)
    if assets_def is None:
        return [], []
    selected = layer.selected_asset_keys
    assets = [k.to_user_string() for k in assets_def.keys_by_output_name.values() if k in selected]
    checks = [f"{k.asset_key.to_user_string()}:{k.name}" for k in sorted(assets_def.check_keys, key=str)]
    if not assets and assets_def.check_keys:
        assets = sorted({k.asset_key.to_user_string() for k in assets_def.check_keys})
    return assets, checks


def _stage_metadata(job_def: dg.JobDefinition, step_key: str) -> dict[str, Any]:
    assets, checks = stage_keys(job_def, step_key)
    metadata: dict[str, Any] = {"stage": step_key, "asset_keys": assets}
    if assets:
        metadata["asset_key"] = assets[0]
    if checks:
        metadata["check_keys"] = checks
    return metadata


def _workflow_name(context: dg.AssetExecutionContext, tags: Mapping[str, str]) -> str:
    if tags.get(WORKFLOW_TAG):
        return tags[WORKFLOW_TAG]
    groups = sorted(
        g for k, g in context.assets_def.group_names_by_key.items() if k in context.assets_def.keys
    )
    return groups[0] if groups else context.job_name


# --- run lifecycle -> workflow and stage events ---------------------------------------------------


def _error_fields(error: Any) -> dict[str, str]:
    """Type and message of the user's exception, unwrapped from Dagster's step-execution wrapper."""
    while error is not None and error.cls_name.startswith("Dagster") and error.cause is not None:
        error = error.cause
    if error is None:
        return {"error_type": "unknown", "error_message": ""}
    message = error.message.strip()
    prefix = f"{error.cls_name}: "
    if message.startswith(prefix):
        message = message[len(prefix) :]
    return {"error_type": error.cls_name, "error_message": message}


class RunTelemetry:
    """Translates one run's Dagster lifecycle events into Kitchen telemetry (one per run, per process)."""

    def __init__(
        self, run_id: str, workflow: str, job_def: dg.JobDefinition, extra: Mapping[str, Any]
    ) -> None:
        self.run_id, self.workflow, self.job_def = run_id, workflow, job_def
        self.extra = dict(extra)  # e.g. the JSONL path, on workflow.start
        self.run_started: float | None = None
        self.step_started: dict[str, float] = {}
        self.first_failure: dict[str, str] | None = None
        self.seen: set[tuple[str, str | None, float]] = set()
        self.done = False
        self._lock = threading.Lock()

    def _base(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "workflow": self.workflow, "job_name": self.job_def.name}

    def handle(self, entry: Any) -> None:
        """Dagster instance listener: called synchronously for each event of the run."""
        try:
            self._handle(entry)
        except Exception:  # telemetry must never fail the run; the error is logged
            log.exception("kitchen telemetry could not translate a Dagster event for run %s", self.run_id)

    def _handle(self, entry: Any) -> None:
        event = entry.dagster_event
        if event is None or event.event_type not in _LIFECYCLE:
            return
        key = (event.event_type_value, event.step_key, entry.timestamp)
        with self._lock:
            if self.done or key in self.seen:
                return
            self.seen.add(key)
        kind, ts, base = event.event_type, entry.timestamp, self._base()
        if kind == DagsterEventType.RUN_START:
            self.run_started = ts
            telemetry.emit(WORKFLOW_START, {}, {**base, **self.extra}, timestamp=ts)
        elif kind == DagsterEventType.STEP_START:
            self.step_started[event.step_key] = ts
            telemetry.emit(
                STAGE_START, {}, {**base, **_stage_metadata(self.job_def, event.step_key)}, timestamp=ts
            )
        elif kind in (
            DagsterEventType.STEP_SUCCESS,
            DagsterEventType.STEP_FAILURE,
            DagsterEventType.STEP_UP_FOR_RETRY,
        ):
            stage = {**base, **_stage_metadata(self.job_def, event.step_key)}
            duration = {"duration_seconds": ts - self.step_started.pop(event.step_key, ts)}
            status = "success"
            if kind != DagsterEventType.STEP_SUCCESS:
                status = "failure" if kind == DagsterEventType.STEP_FAILURE else "retry"
                error = _error_fields(event.event_specific_data.error if event.event_specific_data else None)
                if status == "failure" and self.first_failure is None:
                    self.first_failure = error
                telemetry.emit(STAGE_EXCEPTION, duration, {**stage, **error}, timestamp=ts)
            telemetry.emit(STAGE_STOP, duration, {**stage, "status": status}, timestamp=ts)
        else:
            duration = {"duration_seconds": ts - self.run_started if self.run_started is not None else 0.0}
            status = {
                DagsterEventType.RUN_SUCCESS: "success",
                DagsterEventType.RUN_FAILURE: "failure",
                DagsterEventType.RUN_CANCELED: "canceled",
            }[kind]
            if status == "failure":
                data = event.event_specific_data
                error = self.first_failure or _error_fields(data.error if data else None)
                telemetry.emit(WORKFLOW_EXCEPTION, duration, {**base, **error}, timestamp=ts)
            with self._lock:
                self.done = True
            telemetry.emit(WORKFLOW_STOP, duration, {**base, "status": status}, timestamp=ts)
            with _runs_lock:
                _runs.pop(self.run_id, None)


_runs: dict[str, RunTelemetry] = {}
_runs_lock = threading.Lock()


def ensure_run_telemetry(context: dg.AssetExecutionContext) -> RunTelemetry | None:
    """Subscribe to this run's Dagster events (once per run and process) and replay those already logged.

    None when the asset is invoked directly (a unit test calling it with ``build_asset_context``): there
    is no run to follow.
    """
    run_id = context.run_id
    with _runs_lock:
        existing = _runs.get(run_id)
        if existing is not None:
            return existing
        dagster_run = context.instance.get_run_by_id(run_id)
        if dagster_run is None:
            return None
        sinks = configure_sinks()
        extra: dict[str, Any] = {}
        if "jsonl" in sinks:
            path = str(jsonl_path(run_id))
            extra["telemetry_jsonl"] = path
            context.instance.add_run_tags(run_id, {JSONL_TAG: path})
        run = _runs[run_id] = RunTelemetry(
            run_id, _workflow_name(context, dagster_run.tags), context.job_def, extra
        )
    context.instance.add_event_listener(run_id, run.handle)
    for entry in context.instance.all_logs(run_id, of_type=_LIFECYCLE):
        run.handle(entry)
    return run


# --- the wrapper the asset factories apply --------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


def instrumented(fn: F) -> F:
    """Wrap an asset's compute function: start the run's telemetry and scope in-asset events to the stage.

    Place it directly under ``@dg.asset``/``@dg.multi_asset``. The wrapper advertises the original
    signature with annotations resolved, because Dagster reads config and resource types from it.
    """

    def stage_scope(context: dg.AssetExecutionContext) -> dict[str, Any]:
        run = ensure_run_telemetry(context)
        if run is None:
            keys = [k.to_user_string() for k in context.assets_def.keys]
            return {"run_id": context.run_id, "workflow": _workflow_name(context, {}), "asset_key": keys[0]}
        step_key = context.get_step_execution_context().step.key
        return {"run_id": run.run_id, "workflow": run.workflow, **_stage_metadata(run.job_def, step_key)}

    signature = inspect.signature(fn, eval_str=True)
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator_wrapper(context: dg.AssetExecutionContext, *args: Any, **kwargs: Any) -> Iterator[Any]:
            metadata = stage_scope(context)
            inner = fn(context, *args, **kwargs)
            # The scope is set around each resumption only, so it never leaks into Dagster's own work
            # between yields.
            try:
                while True:
                    with telemetry.scope(**metadata):
                        try:
                            item = next(inner)
                        except StopIteration as stop:
                            return stop.value
                    yield item
            finally:
                inner.close()

        generator_wrapper.__signature__ = signature  # type: ignore[attr-defined]
        return generator_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    def function_wrapper(context: dg.AssetExecutionContext, *args: Any, **kwargs: Any) -> Any:
        with telemetry.scope(**stage_scope(context)):
            return fn(context, *args, **kwargs)

    function_wrapper.__signature__ = signature  # type: ignore[attr-defined]
    return function_wrapper  # type: ignore[return-value]


# --- in-asset events that need Dagster-side knowledge ---------------------------------------------


def emit_eval_complete(
    model: str, metrics: Mapping[str, float], *, tasks: list[str], examples: int
) -> TelemetryEvent:
    """``kitchen.eval.complete`` for one evaluated model: every metric it reports, plus the five the catalogue
    requires under their catalogue names (``accuracy`` is exact match, else the workflow's own accuracy, as
    RL's); ones not computed are NaN."""
    measurements = {
        **metrics,
        "accuracy": metrics.get("exact_match", metrics.get("accuracy", math.nan)),
        "f1": metrics.get("f1", math.nan),
        "precision": metrics.get("precision", math.nan),
        "recall": metrics.get("recall", math.nan),
        "nll": metrics.get("nll", math.nan),
        "examples": examples,
    }
    return telemetry.emit(EVAL_COMPLETE, measurements, {"model": model, "tasks": tasks})


# --- sinks ----------------------------------------------------------------------------------------


class DagsterSink:
    """Structured lines (``<event name> <JSON>``) in the run's event log, and each training step as an
    observation on its asset.

    Workflow and stage events are skipped: they are Dagster's own RUN_* and STEP_* events already, and
    arrive while Dagster is dispatching a log record, when it drops log calls.
    """

    def __call__(self, event: TelemetryEvent) -> None:
        if event.name.startswith(("kitchen.workflow.", "kitchen.stage.")):
            return
        context = _current_context()
        if context is None or context.run_id != event.metadata.get("run_id"):
            return
        payload = event.to_dict()
        skip = {"run_id", "workflow", "asset_keys"}  # already on every line of the run's log
        metadata = {k: v for k, v in payload["metadata"].items() if k not in skip}
        line = f"{event.name} {json.dumps({'measurements': payload['measurements'], 'metadata': metadata})}"
        if event.name == HANDLER_FAILED:
            context.log.warning(line)
        else:
            context.log.debug(line)
        asset_key = event.metadata.get("asset_key")
        if event.name == TRAINING_STEP and asset_key:
            context.log_event(
                dg.AssetObservation(
                    asset_key=dg.AssetKey.from_user_string(str(asset_key)),
                    metadata={k: float(v) for k, v in event.measurements.items()},
                )
            )


def _current_context() -> dg.AssetExecutionContext | None:
    try:
        return dg.AssetExecutionContext.get()
    except dg.DagsterInvariantViolationError:  # outside an asset's compute function (or in a check)
        return None


def configure_sinks() -> tuple[str, ...]:
    """The selected sinks, the Dagster sink included; called when each run's telemetry starts."""
    return sinks.configure_sinks({"dagster": DagsterSink})
