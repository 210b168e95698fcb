"""Which sinks a run gets: ``KITCHEN_TELEMETRY_SINKS`` when set, otherwise JSONL, Dagster and MLflow, plus
OpenTelemetry when the standard ``OTEL_*`` variables ask for it."""

from __future__ import annotations

import os
from collections.abc import Mapping

from kitchen.telemetry.sinks.otel import otel_requested

SINKS_ENV = "KITCHEN_TELEMETRY_SINKS"
ALL_SINKS = ("jsonl", "dagster", "mlflow", "otel")
DEFAULT_SINKS = ("jsonl", "dagster", "mlflow")


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
