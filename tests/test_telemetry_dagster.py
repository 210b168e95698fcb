"""Telemetry through real Dagster runs: lifecycle events, sinks, failures, the supervised group end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import telemetry_toy
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from test_supervised_workflow import tiny_run_config

import kitchen_assets.telemetry as dagster_telemetry
from kitchen import telemetry
from kitchen.telemetry import sinks
from kitchen.telemetry.sinks.jsonl import read_jsonl
from kitchen.telemetry.sinks.otel import OtelSink
from kitchen_assets.definitions import build_definitions

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

W = telemetry.WORKFLOW_START, telemetry.WORKFLOW_STOP, telemetry.WORKFLOW_EXCEPTION
S = telemetry.STAGE_START, telemetry.STAGE_STOP, telemetry.STAGE_EXCEPTION


@pytest.fixture(autouse=True)
def fresh_sinks() -> Iterator[None]:
    """Sinks are process-wide; give each test new instances and leave none attached afterwards."""
    sinks.SINK_INSTANCES.clear()
    yield
    for handler_id in telemetry.attached():
        if handler_id.startswith(sinks.SINK_HANDLER_PREFIX):
            telemetry.detach(handler_id)
    sinks.SINK_INSTANCES.clear()


@pytest.fixture
def collected() -> Iterator[list[telemetry.TelemetryEvent]]:
    events: list[telemetry.TelemetryEvent] = []
    with telemetry.attached_handler("test-collector", "kitchen", events.append):
        yield events


Run = tuple[dg.ExecuteInProcessResult, dict[str, str], list[str]]


def _run(defs: dg.Definitions, job: str, run_config: dict[str, Any]) -> Run:
    """The result, the run's tags, and every message in its event log."""
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def(job).execute_in_process(
            run_config=run_config, instance=instance, raise_on_error=False
        )
        run = instance.get_run_by_id(result.run_id)
        assert run is not None
        return result, dict(run.tags), [entry.user_message for entry in instance.all_logs(result.run_id)]


def _toy(fail: bool = False) -> Run:
    return _run(telemetry_toy.defs, "toy_job", {"ops": {"toy__source": {"config": {"fail": fail}}}})


def _outline(events: list[telemetry.TelemetryEvent]) -> list[tuple[str, Any]]:
    return [(e.name, e.metadata.get("stage")) for e in events]


def _assert_required_fields(event: telemetry.TelemetryEvent, run_id: str, workflow: str) -> None:
    spec = telemetry.catalogue()[event.name]
    assert set(spec.measurements) <= set(event.measurements), event
    assert set(spec.metadata) <= set(event.metadata), event
    assert event.metadata["run_id"] == run_id and event.metadata["workflow"] == workflow
    if event.name not in W:
        assert event.metadata["asset_key"], event


def test_lifecycle_events_come_from_dagster_for_every_step_including_checks(
    monkeypatch: pytest.MonkeyPatch, collected: list[telemetry.TelemetryEvent], kitchen_home: Path
) -> None:
    monkeypatch.setenv("KITCHEN_TELEMETRY_SINKS", "jsonl,dagster")
    result, tags, messages = _toy()
    assert result.success
    check = "toy__weights_weights_are_even"
    assert _outline(collected) == [
        (telemetry.WORKFLOW_START, None),
        (telemetry.STAGE_START, "toy__source"),
        (telemetry.STAGE_STOP, "toy__source"),
        (telemetry.STAGE_START, "toy__train"),
        (telemetry.TRAINING_STEP, "toy__train"),
        (telemetry.TRAINING_STEP, "toy__train"),
        (telemetry.TRAINING_EPOCH, "toy__train"),
        (telemetry.TRAINING_CHECKPOINT, "toy__train"),
        (telemetry.STAGE_STOP, "toy__train"),
        (telemetry.STAGE_START, check),  # the check is not wrapped: it comes from Dagster's own events
        (telemetry.STAGE_STOP, check),
        (telemetry.WORKFLOW_STOP, None),
    ]
    for event in collected:
        _assert_required_fields(event, result.run_id, "toy")
    by_stage = {e.metadata.get("stage"): e for e in collected if e.name == telemetry.STAGE_STOP}
    assert by_stage["toy__train"].metadata["asset_keys"] == ["toy/checkpoints", "toy/weights"]
    assert by_stage["toy__train"].metadata["asset_key"] == "toy/checkpoints"
    assert by_stage[check].metadata["asset_key"] == "toy/weights"
    assert by_stage[check].metadata["check_keys"] == ["toy/weights:weights_are_even"]
    assert all(e.metadata["status"] == "success" for e in by_stage.values())
    assert (
        collected[-1].metadata["status"] == "success" and collected[-1].measurements["duration_seconds"] > 0
    )

    # The JSONL sink's file is named on the run and holds what the collector saw.
    jsonl = Path(tags[dagster_telemetry.JSONL_TAG])
    assert jsonl == kitchen_home / "telemetry" / f"{result.run_id}.jsonl"
    assert collected[0].metadata["telemetry_jsonl"] == str(jsonl)
    assert [r["name"] for r in read_jsonl(jsonl)] == [e.name for e in collected]

    # The Dagster sink: structured lines in the run's log, training steps as observations on the asset.
    observations = [e for e in result.all_events if e.event_type == dg.DagsterEventType.ASSET_OBSERVATION]
    assert [o.asset_key for o in observations] == [dg.AssetKey(["toy", "checkpoints"])] * 2
    observed = observations[1].event_specific_data.asset_observation.metadata  # type: ignore[union-attr]
    assert observed["step"].value == 2 and observed["loss"].value == 0.5
    lines = [m for m in messages if m.startswith("kitchen.training.")]
    assert len(lines) == 4 and json.loads(lines[0].split(" ", 1)[1])["measurements"]["loss"] == 1.0


def test_an_exception_in_an_asset_gives_stage_and_workflow_exception(
    monkeypatch: pytest.MonkeyPatch, collected: list[telemetry.TelemetryEvent]
) -> None:
    monkeypatch.setenv("KITCHEN_TELEMETRY_SINKS", "jsonl")
    result, tags, _ = _toy(fail=True)
    assert not result.success
    assert _outline(collected) == [
        (telemetry.WORKFLOW_START, None),
        (telemetry.STAGE_START, "toy__source"),
        (telemetry.STAGE_EXCEPTION, "toy__source"),
        (telemetry.STAGE_STOP, "toy__source"),
        (telemetry.WORKFLOW_EXCEPTION, None),
        (telemetry.WORKFLOW_STOP, None),
    ]
    for event in collected:
        _assert_required_fields(event, result.run_id, "toy")
    for event in (collected[2], collected[4]):
        assert event.metadata["error_type"] == "ValueError"
        assert event.metadata["error_message"] == "the toy source is broken"
    assert collected[3].metadata["status"] == collected[5].metadata["status"] == "failure"
    assert [r["name"] for r in read_jsonl(Path(tags[dagster_telemetry.JSONL_TAG]))] == [
        e.name for e in collected
    ]


def test_a_failing_handler_does_not_fail_the_run(
    monkeypatch: pytest.MonkeyPatch, collected: list[telemetry.TelemetryEvent]
) -> None:
    monkeypatch.setenv("KITCHEN_TELEMETRY_SINKS", "jsonl,dagster")

    def broken(event: telemetry.TelemetryEvent) -> None:
        raise RuntimeError("handler bug")

    telemetry.attach("broken-on-steps", telemetry.TRAINING_STEP, broken)
    telemetry.attach("broken-on-stages", telemetry.STAGE_START, broken)
    result, _, messages = _toy()
    assert result.success
    failures = [e for e in collected if e.name == telemetry.HANDLER_FAILED]
    assert {e.metadata["handler_id"] for e in failures} == {"broken-on-steps", "broken-on-stages"}
    assert not {"broken-on-steps", "broken-on-stages"} & set(telemetry.attached())
    # Every other event still arrived, and each failure is a warning in the run's event log.
    assert [e.name for e in collected].count(telemetry.TRAINING_STEP) == 2
    assert collected[-1].name == telemetry.WORKFLOW_STOP and collected[-1].metadata["status"] == "success"
    warnings = [m for m in messages if m.startswith(telemetry.HANDLER_FAILED)]
    assert len(warnings) == 2 and "broken-on-stages" in warnings[0] and "broken-on-steps" in warnings[1]


def test_otel_sink_exports_a_trace_for_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KITCHEN_TELEMETRY_SINKS", "otel")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sinks.SINK_INSTANCES["otel"] = OtelSink(provider)
    result, _, _ = _toy()
    assert result.success
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {
        "workflow toy",
        "stage toy__source",
        "stage toy__train",
        "stage toy__weights_weights_are_even",
    }
    root = spans["workflow toy"]
    assert root.attributes is not None and root.attributes["kitchen.run_id"] == result.run_id
    for name, span in spans.items():
        if name != "workflow toy":
            assert span.parent is not None and span.parent.span_id == root.context.span_id
    train = spans["stage toy__train"]
    assert [e.name for e in train.events] == [telemetry.TRAINING_STEP] * 2 + [
        telemetry.TRAINING_EPOCH,
        telemetry.TRAINING_CHECKPOINT,
    ]

    exporter.clear()
    _toy(fail=True)
    failed = {span.name: span for span in exporter.get_finished_spans()}
    assert failed["stage toy__source"].status.status_code == StatusCode.ERROR
    assert failed["workflow toy"].status.status_code == StatusCode.ERROR


def test_dagster_asset_materialize_emits_too(kitchen_home: Path, tmp_path: Path) -> None:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster"), "KITCHEN_TELEMETRY_SINKS": "jsonl"}
    (tmp_path / "dagster").mkdir()
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            "asset",
            "materialize",
            "-f",
            str(TESTS / "telemetry_toy.py"),
            "--select",
            "group:toy",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = (kitchen_home / "telemetry").glob("*.jsonl")
    rows = read_jsonl(path)
    names = [r["name"] for r in rows]
    assert names[0] == telemetry.WORKFLOW_START and names[-1] == telemetry.WORKFLOW_STOP
    assert names.count(telemetry.STAGE_START) == names.count(telemetry.STAGE_STOP) == 3
    assert names.count(telemetry.TRAINING_STEP) == 2
    # No job tag on the implicit asset job: the asset group names the workflow.
    assert {r["metadata"]["workflow"] for r in rows} == {"toy"}


def test_supervised_group_emits_every_catalogue_event_in_order(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, collected: list[telemetry.TelemetryEvent]
) -> None:
    from kitchen.telemetry.sinks.mlflow import mlflow_client, mlflow_run_for_dagster_run

    monkeypatch.setenv("KITCHEN_TELEMETRY_SINKS", "jsonl,dagster,mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result, tags, _ = _run(build_definitions("local"), "supervised_job", tiny_run_config(tiny_model_dir))
    assert result.success
    for event in collected:
        _assert_required_fields(event, result.run_id, "supervised")

    outline = _outline(collected)
    stages = [
        "supervised__base_model",
        "supervised__dataset",
        "supervised__datums",
        "supervised__train",
        "supervised__eval_report",
        "supervised__eval_report_quality_gate",  # the blocking check: a stage too
        "supervised__registered_model",
    ]
    assert outline[0] == (telemetry.WORKFLOW_START, None) and outline[-1] == (telemetry.WORKFLOW_STOP, None)
    assert [s for n, s in outline if n == telemetry.STAGE_START] == stages
    assert [s for n, s in outline if n == telemetry.STAGE_STOP] == stages
    inside = {}
    for stage in stages:  # each stage's own events sit between its start and its stop
        start, stop = (
            outline.index((telemetry.STAGE_START, stage)),
            outline.index((telemetry.STAGE_STOP, stage)),
        )
        assert all(s == stage for _, s in outline[start : stop + 1])
        inside[stage] = [n for n, _ in outline[start + 1 : stop]]
    # max_steps=4, save_every=2: the start, steps 1-2, the step-2 checkpoint, steps 3-4, the epoch, final
    # state, sampler.
    step, checkpoint = telemetry.TRAINING_STEP, telemetry.TRAINING_CHECKPOINT
    epoch, start = telemetry.TRAINING_EPOCH, telemetry.TRAINING_START
    assert inside["supervised__train"] == [
        start,
        step,
        step,
        checkpoint,
        step,
        step,
        epoch,
        checkpoint,
        checkpoint,
    ]
    assert inside["supervised__eval_report"] == [telemetry.EVAL_COMPLETE] * 2
    assert inside["supervised__registered_model"] == [telemetry.MODEL_REGISTERED]
    # Every success-path event of the catalogue (the exception events are the next tests').
    assert {n for n, _ in outline} == {
        telemetry.WORKFLOW_START,
        telemetry.WORKFLOW_STOP,
        telemetry.STAGE_START,
        telemetry.STAGE_STOP,
        telemetry.TRAINING_START,
        telemetry.TRAINING_STEP,
        telemetry.TRAINING_EPOCH,
        telemetry.TRAINING_CHECKPOINT,
        telemetry.EVAL_COMPLETE,
        telemetry.MODEL_REGISTERED,
    }
    start_event = next(e for e in collected if e.name == telemetry.TRAINING_START)
    assert start_event.measurements == {"total_steps": 4, "start_step": 0}
    assert start_event.metadata["resumed_from"] is None and start_event.metadata["headline"] == "loss"

    steps = [e for e in collected if e.name == telemetry.TRAINING_STEP]
    assert [e.measurements["step"] for e in steps] == [1, 2, 3, 4]
    assert all(e.measurements["tokens_per_second"] > 0 and "grad_norm" in e.measurements for e in steps)
    assert {e.metadata["asset_key"] for e in steps} == {"supervised/checkpoints"}
    checkpoints = [e for e in collected if e.name == telemetry.TRAINING_CHECKPOINT]
    assert [(e.measurements["step"], e.metadata["kind"]) for e in checkpoints] == [
        (2, "state"),
        (4, "state"),
        (4, "sampler"),
    ]
    assert all(str(e.metadata["uri"]).startswith("file://") for e in checkpoints)
    evals = [e for e in collected if e.name == telemetry.EVAL_COMPLETE]
    assert [e.metadata["model"] for e in evals] == ["base", "trained"]
    assert "kitchen_arithmetic" in evals[0].metadata["tasks"]
    assert evals[0].measurements["nll"] != evals[1].measurements["nll"]
    assert evals[0].metadata["asset_key"] == "supervised/eval_report"
    [registered] = [e for e in collected if e.name == telemetry.MODEL_REGISTERED]
    assert registered.metadata["asset_key"] == "supervised/registered_model"
    assert registered.metadata["version"] == "1" and registered.metadata["alias"] == "champion"

    # The JSONL stream is the collector's, event for event.
    rows = read_jsonl(Path(tags[dagster_telemetry.JSONL_TAG]))
    assert rows == [json.loads(json.dumps(e.to_dict())) for e in collected]

    # MLflow: one run tagged with the Dagster run, the step metrics at their steps, eval metrics, FINISHED.
    client = mlflow_client()
    run = client.get_run(mlflow_run_for_dagster_run(result.run_id))
    assert run.info.status == "FINISHED"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in loss] == [
        (e.measurements["step"], e.measurements["loss"]) for e in steps
    ]
    assert run.data.metrics["eval/trained/nll"] == evals[1].measurements["nll"]


def test_supervised_failure_names_the_failing_stage(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, collected: list[telemetry.TelemetryEvent]
) -> None:
    monkeypatch.setenv("KITCHEN_TELEMETRY_SINKS", "jsonl")
    config = tiny_run_config(tiny_model_dir, dataset="no/such-dataset-anywhere")
    result, _, _ = _run(build_definitions("local"), "supervised_job", config)
    assert not result.success
    exceptions = [e for e in collected if e.name in (telemetry.STAGE_EXCEPTION, telemetry.WORKFLOW_EXCEPTION)]
    assert [(e.name, e.metadata.get("stage")) for e in exceptions] == [
        (telemetry.STAGE_EXCEPTION, "supervised__dataset"),
        (telemetry.WORKFLOW_EXCEPTION, None),
    ]
    assert all("no/such-dataset-anywhere" in str(e.metadata["error_message"]) for e in exceptions)
    assert exceptions[0].metadata["asset_key"] == "supervised/dataset"
    assert collected[-1].name == telemetry.WORKFLOW_STOP and collected[-1].metadata["status"] == "failure"


def test_kitchen_run_writes_the_jsonl_stream_and_mlflow_step_metrics(
    tiny_model_dir: Path, tmp_path: Path, kitchen_home: Path
) -> None:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster")}
    env.pop("KITCHEN_TELEMETRY_SINKS")  # the CLI's defaults: JSONL, Dagster, MLflow
    env.pop("MLFLOW_TRACKING_URI", None)
    args = ["--model", str(tiny_model_dir), "--max-rows", "32", "--batch-size", "8", "--max-steps", "2",
            "--learning-rate", "0.005", "--lora-rank", "4", "--max-length", "64", "--eval-examples", "4",
            "--eval-max-tokens", "4", "--gate-metric", "nll", "--gate-margin", "0.01"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "kitchen.cli", "run", "supervised", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from dagster._core.instance.ref import InstanceRef

    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(tmp_path / "dagster"))) as instance:
        [run] = instance.get_runs()
        rows = read_jsonl(Path(run.tags[dagster_telemetry.JSONL_TAG]))
    names = {r["name"] for r in rows}
    assert {
        telemetry.WORKFLOW_START,
        telemetry.WORKFLOW_STOP,
        telemetry.STAGE_START,
        telemetry.STAGE_STOP,
        telemetry.TRAINING_STEP,
        telemetry.TRAINING_EPOCH,
        telemetry.TRAINING_CHECKPOINT,
        telemetry.EVAL_COMPLETE,
    } <= names
    assert {r["metadata"]["run_id"] for r in rows} == {run.run_id}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{kitchen_home / 'mlflow.db'}")
    [mlflow_run] = client.search_runs(
        [client.get_experiment_by_name("kitchen").experiment_id],  # type: ignore[union-attr]
        filter_string=f"tags.`dagster.run_id` = '{run.run_id}'",
    )
    assert mlflow_run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "train/loss")] == [1, 2]
