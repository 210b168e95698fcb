"""The telemetry library on its own: catalogue, handlers, scope, redaction, and each sink (no Dagster run)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from kitchen import telemetry
from kitchen.telemetry.events import REDACTED
from kitchen.telemetry.sinks import selected_sinks
from kitchen.telemetry.sinks.jsonl import JsonlSink, jsonl_path, read_jsonl
from kitchen.telemetry.sinks.otel import OtelSink, otel_requested
from kitchen.telemetry.training import CompositeObserver, TelemetryObserver
from kitchen.training.loop import Checkpoint, StepMetrics

RUN = {"run_id": "run-1", "workflow": "supervised"}


@pytest.fixture
def collected() -> Iterator[list[telemetry.TelemetryEvent]]:
    events: list[telemetry.TelemetryEvent] = []
    with telemetry.attached_handler("test-collector", "kitchen", events.append):
        yield events


def _step(step: int, loss: float = 1.0, grad_norm: float | None = 2.0) -> StepMetrics:
    return StepMetrics(
        step=step,
        epoch=0,
        loss=loss,
        learning_rate=1e-3,
        tokens=100,
        trained_tokens=40,
        step_seconds=0.5,
        tokens_per_second=200.0,
        elapsed_seconds=0.5 * step,
        eta_seconds=1.0,
        grad_norm=grad_norm,
    )


def _lifecycle(run_id: str = "run-1") -> list[tuple[str, dict[str, float], dict[str, object]]]:
    """A successful one-stage workflow as the Dagster translator would emit it."""
    run: dict[str, object] = {"run_id": run_id, "workflow": "supervised", "job_name": "supervised_job"}
    stage: dict[str, object] = {**run, "stage": "supervised__train", "asset_key": "supervised/checkpoints"}
    return [
        (telemetry.WORKFLOW_START, {}, run),
        (telemetry.STAGE_START, {}, stage),
        (
            telemetry.TRAINING_STEP,
            {"step": 1, "loss": 2.0, "learning_rate": 1e-3, "tokens": 10, "tokens_per_second": 5.0},
            {**stage, "total_steps": 1},
        ),
        (telemetry.STAGE_STOP, {"duration_seconds": 1.0}, {**stage, "status": "success"}),
        (telemetry.WORKFLOW_STOP, {"duration_seconds": 2.0}, {**run, "status": "success"}),
    ]


def test_emit_rejects_unknown_names_missing_fields_and_non_numbers() -> None:
    with pytest.raises(ValueError, match="unknown telemetry event"):
        telemetry.emit("kitchen.nope.never", {}, RUN)
    with pytest.raises(ValueError, match=r"missing required fields \['epoch', 'workflow'\]"):
        telemetry.emit(telemetry.TRAINING_EPOCH, {"step": 1}, {"run_id": "r"})
    with pytest.raises(TypeError, match="must be a number"):
        telemetry.emit(telemetry.TRAINING_EPOCH, {"step": "1", "epoch": 0}, RUN)  # type: ignore[dict-item]


def test_handlers_match_exact_names_and_dotted_prefixes_and_detach() -> None:
    exact: list[str] = []
    prefix: list[str] = []
    telemetry.attach("exact", telemetry.TRAINING_EPOCH, lambda e: exact.append(e.name))
    telemetry.attach("prefix", ["kitchen.training"], lambda e: prefix.append(e.name))
    try:
        with pytest.raises(ValueError, match="already attached"):
            telemetry.attach("exact", "kitchen", lambda e: None)
        telemetry.emit(telemetry.TRAINING_EPOCH, {"epoch": 0, "step": 3}, RUN)
        telemetry.emit(
            telemetry.TRAINING_CHECKPOINT, {"step": 3}, {**RUN, "uri": "file:///c", "kind": "state"}
        )
        telemetry.emit(telemetry.WORKFLOW_START, {}, {**RUN, "job_name": "j"})
    finally:
        assert telemetry.detach("exact") and telemetry.detach("prefix")
    assert exact == [telemetry.TRAINING_EPOCH]
    assert prefix == [telemetry.TRAINING_EPOCH, telemetry.TRAINING_CHECKPOINT]
    assert not telemetry.detach("exact")
    # "kitchen.train" is not a dotted prefix of "kitchen.training.epoch".
    partial: list[str] = []
    with telemetry.attached_handler("partial", "kitchen.train", lambda e: partial.append(e.name)):
        telemetry.emit(telemetry.TRAINING_EPOCH, {"epoch": 0, "step": 3}, RUN)
    assert partial == []


def test_a_raising_handler_is_detached_and_reported_and_others_still_run(
    collected: list[telemetry.TelemetryEvent],
) -> None:
    def broken(event: telemetry.TelemetryEvent) -> None:
        raise RuntimeError("sink down")

    telemetry.attach("broken", "kitchen.training", broken)
    event = telemetry.emit(telemetry.TRAINING_EPOCH, {"epoch": 0, "step": 1}, RUN)  # does not raise
    assert "broken" not in telemetry.attached()
    telemetry.emit(telemetry.TRAINING_EPOCH, {"epoch": 1, "step": 2}, RUN)
    names = [e.name for e in collected]
    assert names == [telemetry.TRAINING_EPOCH, telemetry.HANDLER_FAILED, telemetry.TRAINING_EPOCH]
    failure = collected[1].metadata
    assert failure["handler_id"] == "broken" and failure["event"] == event.name
    assert failure["error_type"] == "RuntimeError" and failure["error_message"] == "sink down"
    assert failure["run_id"] == "run-1"


def test_scope_metadata_is_inherited_and_overridable(collected: list[telemetry.TelemetryEvent]) -> None:
    with telemetry.scope(**RUN, asset_key="supervised/checkpoints"), telemetry.scope(stage="s"):
        telemetry.emit(telemetry.TRAINING_EPOCH, {"epoch": 0, "step": 1}, {"stage": "override"})
    assert telemetry.current_scope() == {}
    assert collected[0].metadata == {**RUN, "asset_key": "supervised/checkpoints", "stage": "override"}


def test_secrets_from_the_environment_never_reach_handlers(
    monkeypatch: pytest.MonkeyPatch, collected: list[telemetry.TelemetryEvent]
) -> None:
    monkeypatch.setenv("TINKER_API_KEY", "tml-very-secret-value")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer abcdef123")
    telemetry.emit(
        telemetry.WORKFLOW_START,
        {},
        {
            **RUN,
            "job_name": "j",
            "note": "key is tml-very-secret-value",
            "config": {"api_key": "x", "lr": 1},
            "sent": ["authorization=Bearer abcdef123"],
            "headers": "h",
            "asset_key": "supervised/dataset",
        },
    )
    metadata = collected[0].metadata
    assert "tml-very-secret-value" not in json.dumps(collected[0].to_dict())
    assert metadata["note"] == f"key is {REDACTED}"
    assert metadata["config"] == {"api_key": REDACTED, "lr": 1}
    assert metadata["sent"] == [REDACTED] and metadata["headers"] == REDACTED
    assert metadata["asset_key"] == "supervised/dataset"


def test_later_workflows_register_their_own_events(collected: list[telemetry.TelemetryEvent]) -> None:
    spec = telemetry.register_event("kitchen.testflow.step", measurements=("step", "reward_margin"))
    assert telemetry.register_event("kitchen.testflow.step", measurements=("step", "reward_margin")) == spec
    with pytest.raises(ValueError, match="different spec"):
        telemetry.register_event("kitchen.testflow.step", measurements=("step",))
    with pytest.raises(ValueError, match="dotted lower-case"):
        telemetry.register_event("DPO step")
    telemetry.emit("kitchen.testflow.step", {"step": 1, "reward_margin": 0.3}, RUN)
    assert collected[0].name == "kitchen.testflow.step"
    assert "kitchen.testflow.step" in telemetry.catalogue()


def test_model_registered_helper(collected: list[telemetry.TelemetryEvent]) -> None:
    with telemetry.scope(**RUN, asset_key="supervised/registered_model"):
        telemetry.emit_model_registered(
            "kitchen-supervised", 3, "champion", uri="models:/kitchen-supervised/3"
        )
    event = collected[0]
    assert event.name == telemetry.MODEL_REGISTERED
    assert event.metadata["model_name"] == "kitchen-supervised" and event.metadata["version"] == "3"
    assert (
        event.metadata["alias"] == "champion" and event.metadata["asset_key"] == "supervised/registered_model"
    )


def test_training_observer_emits_step_epoch_checkpoint_and_composes(
    collected: list[telemetry.TelemetryEvent],
) -> None:
    with pytest.raises(RuntimeError, match="telemetry scope"):
        TelemetryObserver()

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def on_step(self, metrics: StepMetrics, total_steps: int) -> None:
            self.calls.append(f"step {metrics.step}/{total_steps}")

        def on_checkpoint(self, checkpoint: Checkpoint) -> None:
            self.calls.append(f"ckpt {checkpoint.step}")

        def on_epoch(self, epoch: int, step: int) -> None:
            self.calls.append(f"epoch {epoch}")

    recorder = Recorder()
    with telemetry.scope(**RUN):
        observer = CompositeObserver(recorder, TelemetryObserver())
        observer.on_step(_step(1), 2)
        observer.on_step(_step(2, grad_norm=None), 2)
        observer.on_checkpoint(Checkpoint(2, "file:///ckpt", "state"))
        observer.on_epoch(0, 2)
    assert recorder.calls == ["step 1/2", "step 2/2", "ckpt 2", "epoch 0"]
    first, second, checkpoint, epoch = collected
    assert first.measurements["grad_norm"] == 2.0 and first.metadata["total_steps"] == 2
    assert "grad_norm" not in second.measurements
    assert checkpoint.metadata["uri"] == "file:///ckpt" and checkpoint.measurements["step"] == 2
    assert epoch.name == telemetry.TRAINING_EPOCH and epoch.measurements == {"epoch": 0, "step": 2}


def test_jsonl_sink_writes_one_strict_json_file_per_run(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path)
    events = []
    for run_id in ("run-a", "run-b"):
        for name, measurements, metadata in _lifecycle(run_id):
            events.append(telemetry.TelemetryEvent(name, measurements, metadata))
    events.insert(
        3,
        telemetry.TelemetryEvent(
            telemetry.EVAL_COMPLETE,
            {"accuracy": math.nan, "f1": 0.5, "precision": 1.0, "recall": 1.0, "nll": 2.0},
            {**RUN, "run_id": "run-a", "model": "trained", "tasks": ["heldout:x"]},
        ),
    )
    for event in events:
        sink(event)
    assert sink._files == {}  # closed at each run's workflow.stop
    lines = (tmp_path / "run-a.jsonl").read_text().splitlines()
    assert all("NaN" not in line for line in lines)
    rows = read_jsonl(tmp_path / "run-a.jsonl")
    assert [r["name"] for r in rows] == [e.name for e in events if e.metadata["run_id"] == "run-a"]
    assert rows[3]["measurements"]["accuracy"] is None and rows[3]["metadata"]["tasks"] == ["heldout:x"]
    assert len(read_jsonl(tmp_path / "run-b.jsonl")) == 5
    with pytest.raises(ValueError, match="file name"):
        jsonl_path("../escape", tmp_path)


def test_sink_selection_from_the_environment() -> None:
    assert selected_sinks({}) == ("jsonl", "dagster", "mlflow")
    assert selected_sinks({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}) == (
        "jsonl",
        "dagster",
        "mlflow",
        "otel",
    )
    assert selected_sinks({"KITCHEN_TELEMETRY_SINKS": " JSONL, otel ,jsonl"}) == ("jsonl", "otel")
    assert selected_sinks({"KITCHEN_TELEMETRY_SINKS": "none"}) == ()
    with pytest.raises(ValueError, match="unknown sink"):
        selected_sinks({"KITCHEN_TELEMETRY_SINKS": "jsonl,kafka"})
    assert not otel_requested({})
    assert otel_requested({"OTEL_TRACES_EXPORTER": "console"})
    assert not otel_requested({"OTEL_TRACES_EXPORTER": "none"})
    assert not otel_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"})


def test_otel_sink_turns_workflow_and_stages_into_spans() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sink = OtelSink(provider)
    events = _lifecycle()
    failing_stage = {
        **events[1][2],
        "stage": "supervised__eval_report",
        "asset_key": "supervised/eval_report",
    }
    events[4:4] = [
        (telemetry.STAGE_START, {}, failing_stage),
        (
            telemetry.STAGE_EXCEPTION,
            {"duration_seconds": 0.1},
            {**failing_stage, "error_type": "ValueError", "error_message": "boom"},
        ),
        (telemetry.STAGE_STOP, {"duration_seconds": 0.1}, {**failing_stage, "status": "failure"}),
    ]
    for i, (name, measurements, metadata) in enumerate(events):
        sink(telemetry.TelemetryEvent(name, measurements, metadata, timestamp=1000.0 + i))
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"workflow supervised", "stage supervised__train", "stage supervised__eval_report"}
    workflow, train, evaluation = (
        spans["workflow supervised"],
        spans["stage supervised__train"],
        spans["stage supervised__eval_report"],
    )
    assert workflow.parent is None
    assert train.parent is not None and train.parent.span_id == workflow.context.span_id
    assert train.context.trace_id == evaluation.context.trace_id == workflow.context.trace_id
    assert [e.name for e in train.events] == [telemetry.TRAINING_STEP]
    assert train.events[0].attributes is not None and train.events[0].attributes["loss"] == 2.0
    assert train.start_time == 1001 * 10**9 and train.end_time == 1003 * 10**9
    assert evaluation.status.status_code == StatusCode.ERROR
    assert evaluation.events[0].attributes is not None
    assert evaluation.events[0].attributes["exception.type"] == "ValueError"
    assert workflow.attributes is not None and workflow.attributes["kitchen.status"] == "success"


def test_mlflow_sink_logs_step_metrics_on_the_run_tagged_with_the_dagster_run(
    monkeypatch: pytest.MonkeyPatch, kitchen_home: Path
) -> None:
    from kitchen.telemetry.sinks.mlflow import MlflowSink, mlflow_client, mlflow_run_for_dagster_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sink = MlflowSink()
    for name, measurements, metadata in _lifecycle("dagster-run-7"):
        sink(telemetry.TelemetryEvent(name, measurements, metadata))
    run_id = mlflow_run_for_dagster_run("dagster-run-7")
    client = mlflow_client()
    assert client.tracking_uri == f"sqlite:///{kitchen_home / 'mlflow.db'}"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert (
        run.data.tags["dagster.run_id"] == "dagster-run-7"
        and run.data.tags["kitchen.workflow"] == "supervised"
    )
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0)]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location == (kitchen_home / "mlruns").as_uri()
    assert mlflow_run_for_dagster_run("another-run") != run_id
