"""The OpenTelemetry sink: a workflow is a trace, each stage a child span, other events span events.

Configured only through the standard ``OTEL_*`` variables and off unless they name an exporter
(``OTEL_TRACES_EXPORTER``, ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``);
``OTEL_SDK_DISABLED=true`` turns it off. The sink keeps its own ``TracerProvider`` rather than installing a
global one, so it cannot change what other libraries (MLflow tracing among them) do with OpenTelemetry.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, Status, StatusCode

from kitchen.telemetry.events import (
    STAGE_EXCEPTION,
    STAGE_START,
    STAGE_STOP,
    WORKFLOW_EXCEPTION,
    WORKFLOW_START,
    WORKFLOW_STOP,
    TelemetryEvent,
)

_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def _exporter_names(env: Mapping[str, str]) -> list[str]:
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if raw:
        return [n.strip().lower() for n in raw.split(",") if n.strip() and n.strip().lower() != "none"]
    return ["otlp"] if any(env.get(v) for v in _ENDPOINT_VARS) else []


def otel_requested(env: Mapping[str, str] | None = None) -> bool:
    """Whether the standard ``OTEL_*`` variables ask for trace export."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(_exporter_names(env))


def _exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={name!r} is not supported here; use otlp, console or none")
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if protocol != "http/protobuf":
        raise ValueError(
            f"OTLP protocol {protocol!r} is not installed; Kitchen ships the http/protobuf exporter (set "
            "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf or install opentelemetry-exporter-otlp-proto-grpc)"
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # Endpoint, headers, timeout, compression and certificates come from OTEL_EXPORTER_OTLP_* itself.
    return OTLPSpanExporter()


def tracer_provider_from_env(env: Mapping[str, str] | None = None) -> TracerProvider:
    """A provider that exports as ``OTEL_TRACES_EXPORTER`` and ``OTEL_EXPORTER_OTLP_*`` say."""
    env = os.environ if env is None else env
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "kitchen"}))
    provider = TracerProvider(resource=resource)
    for name in _exporter_names(env):
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
    return provider


def _attribute(value: Any) -> Any:
    if isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    return str(value)


def _attributes(event: TelemetryEvent) -> dict[str, Any]:
    attrs = {f"kitchen.{k}": _attribute(v) for k, v in event.metadata.items() if v is not None}
    attrs.update({k: v for k, v in event.measurements.items()})
    return attrs


def _ns(timestamp: float) -> int:
    return int(timestamp * 1e9)


class OtelSink:
    """Turns workflow/stage start-stop pairs into spans and every other event into a span event."""

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        self.provider = tracer_provider or tracer_provider_from_env()
        self.tracer = self.provider.get_tracer("kitchen.telemetry")
        self._workflows: dict[str, Span] = {}
        self._stages: dict[tuple[str, str], Span] = {}
        self._lock = threading.Lock()

    def __call__(self, event: TelemetryEvent) -> None:
        run_id = str(event.metadata["run_id"])
        with self._lock:
            if event.name == WORKFLOW_START:
                self._workflows[run_id] = self.tracer.start_span(
                    f"workflow {event.metadata['workflow']}",
                    start_time=_ns(event.timestamp),
                    attributes=_attributes(event),
                )
            elif event.name == STAGE_START:
                parent = self._workflows.get(run_id)
                context = trace.set_span_in_context(parent) if parent is not None else None
                self._stages[(run_id, str(event.metadata["stage"]))] = self.tracer.start_span(
                    f"stage {event.metadata['stage']}",
                    context=context,
                    start_time=_ns(event.timestamp),
                    attributes=_attributes(event),
                )
            elif event.name in (STAGE_EXCEPTION, WORKFLOW_EXCEPTION):
                span = self._span_for(event)
                if span is not None:
                    message = str(event.metadata["error_message"])
                    span.set_status(Status(StatusCode.ERROR, message))
                    span.add_event(
                        "exception",
                        {"exception.type": str(event.metadata["error_type"]), "exception.message": message},
                        timestamp=_ns(event.timestamp),
                    )
            elif event.name == STAGE_STOP:
                span = self._stages.pop((run_id, str(event.metadata["stage"])), None)
                if span is not None:
                    span.set_attribute("kitchen.status", str(event.metadata["status"]))
                    span.end(end_time=_ns(event.timestamp))
            elif event.name == WORKFLOW_STOP:
                span = self._workflows.pop(run_id, None)
                for key in [k for k in self._stages if k[0] == run_id]:
                    self._stages.pop(key).end(end_time=_ns(event.timestamp))
                if span is not None:
                    span.set_attribute("kitchen.status", str(event.metadata["status"]))
                    span.end(end_time=_ns(event.timestamp))
            else:
                span = self._span_for(event)
                if span is not None:
                    span.add_event(event.name, _attributes(event), timestamp=_ns(event.timestamp))
                else:
                    # An event outside any open workflow (a script using the library directly) stands alone.
                    self.tracer.start_span(
                        event.name, start_time=_ns(event.timestamp), attributes=_attributes(event)
                    ).end(end_time=_ns(event.timestamp))
        if event.name == WORKFLOW_STOP:
            # The CLI exits right after the run: export now rather than at interpreter shutdown.
            self.provider.force_flush()

    def _span_for(self, event: TelemetryEvent) -> Span | None:
        run_id = str(event.metadata["run_id"])
        stage = event.metadata.get("stage")
        if stage is not None and (run_id, str(stage)) in self._stages:
            return self._stages[(run_id, str(stage))]
        return self._workflows.get(run_id)
