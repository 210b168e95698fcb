"""Which sinks a run gets: ``KITCHEN_TELEMETRY_SINKS`` when set, otherwise JSONL, Dagster and MLflow, plus
OpenTelemetry when the standard ``OTEL_*`` variables ask for it."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from kitchen import telemetry
from kitchen.telemetry.sinks.otel import otel_requested

SINKS_ENV = "KITCHEN_TELEMETRY_SINKS"
ALL_SINKS = ("jsonl", "dagster", "mlflow", "otel")
DEFAULT_SINKS = ("jsonl", "dagster", "mlflow")
#: Handler ids of attached sinks: ``kitchen.sink.<name>``.
SINK_HANDLER_PREFIX = "kitchen.sink."
#: One instance per sink and process, so open files and spans survive re-attachment between runs.
SINK_INSTANCES: dict[str, telemetry.Handler] = {}


def selected_sinks(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Sink names for this process, e.g. ``KITCHEN_TELEMETRY_SINKS=jsonl,otel``; ``none`` for none."""
    env = os.environ if env is None else env
    raw = env.get(SINKS_ENV)
    if raw is None:
        return DEFAULT_SINKS + (("otel",) if otel_requested(env) else ())
    names = tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in ALL_SINKS]
    if unknown:
        raise ValueError(
            f"{SINKS_ENV}: unknown sink(s) {unknown}; choose from {', '.join(ALL_SINKS)} or none"
        )
    return names


def _library_sink(name: str) -> telemetry.Handler | None:
    if name == "jsonl":
        from kitchen.telemetry.sinks.jsonl import JsonlSink

        return JsonlSink()
    if name == "mlflow":
        from kitchen.telemetry.sinks.mlflow import MlflowSink

        return MlflowSink()
    if name == "otel":
        from kitchen.telemetry.sinks.otel import OtelSink

        return OtelSink()
    return None


def configure_sinks(extra: Mapping[str, Callable[[], telemetry.Handler]] | None = None) -> tuple[str, ...]:
    """Attach the sinks ``KITCHEN_TELEMETRY_SINKS`` selects (re-attaching any detached after a failure) and
    detach the rest; returns the names attached. ``extra`` makes the sinks only a host provides (the
    Dagster layer's ``dagster`` sink); a selected sink nobody here can make, ``dagster`` outside a Dagster
    run such as in ``kitchen serve``, is left out."""
    extra = extra or {}
    names = selected_sinks()
    current = {h for h in telemetry.attached() if h.startswith(SINK_HANDLER_PREFIX)}
    attached = []
    for name in names:
        if name not in SINK_INSTANCES:
            made = extra[name]() if name in extra else _library_sink(name)
            if made is None:
                continue
            SINK_INSTANCES[name] = made
        attached.append(name)
        if SINK_HANDLER_PREFIX + name not in current:
            telemetry.attach(SINK_HANDLER_PREFIX + name, "kitchen", SINK_INSTANCES[name])
    for handler_id in current - {SINK_HANDLER_PREFIX + n for n in attached}:
        telemetry.detach(handler_id)
    return tuple(attached)
