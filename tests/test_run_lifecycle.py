"""Run lifecycle telemetry: the run status sensors on real runs of the toy workflow (model-free).

Each sensor is invoked as the daemon would, with ``build_run_status_sensor_context`` on the run's own
status event; the events reach a collector and the JSONL sink's file for the run, after the run's own.
"""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg
import pytest
import telemetry_toy

from jobs.lifecycle import RUN_EVENTS, run_lifecycle_sensors
from kitchen import telemetry
from kitchen.telemetry import sinks
from kitchen.telemetry.sinks.jsonl import jsonl_path, read_jsonl

SENSORS = {s.name: s for s in run_lifecycle_sensors()}


@pytest.fixture(autouse=True)
def jsonl_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Sinks are process-wide: fresh instances, and none left attached afterwards."""
    monkeypatch.setenv("KITCHEN_TELEMETRY_SINKS", "jsonl")
    sinks.SINK_INSTANCES.clear()
    yield
    for handler_id in telemetry.attached():
        if handler_id.startswith(sinks.SINK_HANDLER_PREFIX):
            telemetry.detach(handler_id)
    sinks.SINK_INSTANCES.clear()


EVENT_TYPES = {
    dg.DagsterRunStatus.STARTED: dg.DagsterEventType.RUN_START,
    dg.DagsterRunStatus.SUCCESS: dg.DagsterEventType.RUN_SUCCESS,
    dg.DagsterRunStatus.FAILURE: dg.DagsterEventType.RUN_FAILURE,
}


def _sense(
    instance: dg.DagsterInstance, result: dg.ExecuteInProcessResult, status: dg.DagsterRunStatus
) -> None:
    """Invoke ``status``'s sensor on the run's own event of that status."""
    [event] = [e for e in result.all_events if e.event_type == EVENT_TYPES[status]]
    name = f"kitchen_run_{status.value.lower()}_telemetry"
    context = dg.build_run_status_sensor_context(
        sensor_name=name, dagster_event=event, dagster_instance=instance, dagster_run=result.dagster_run
    )
    SENSORS[name](context)


def test_a_run_that_succeeds_and_one_that_fails() -> None:
    assert set(RUN_EVENTS) == {
        dg.DagsterRunStatus.QUEUED,
        dg.DagsterRunStatus.STARTED,
        dg.DagsterRunStatus.SUCCESS,
        dg.DagsterRunStatus.FAILURE,
        dg.DagsterRunStatus.CANCELED,
    }
    job = telemetry_toy.defs.resolve_job_def("toy_job")
    events: list[telemetry.TelemetryEvent] = []
    with (
        dg.DagsterInstance.ephemeral() as instance,
        telemetry.attached_handler("run-events", "kitchen.run", events.append),
    ):
        ok = job.execute_in_process(instance=instance)
        _sense(instance, ok, dg.DagsterRunStatus.STARTED)
        _sense(instance, ok, dg.DagsterRunStatus.SUCCESS)
        broken = job.execute_in_process(
            instance=instance,
            run_config={"ops": {"toy__source": {"config": {"fail": True}}}},
            raise_on_error=False,
        )
        _sense(instance, broken, dg.DagsterRunStatus.STARTED)
        _sense(instance, broken, dg.DagsterRunStatus.FAILURE)
        record = instance.get_run_record_by_id(ok.run_id)
        assert record is not None and record.start_time is not None and record.end_time is not None

    assert [(e.name, e.metadata["run_id"]) for e in events] == [
        (telemetry.RUN_CREATED, ok.run_id),  # never queued: created comes just before running
        (telemetry.RUN_RUNNING, ok.run_id),
        (telemetry.RUN_COMPLETED, ok.run_id),
        (telemetry.RUN_CREATED, broken.run_id),
        (telemetry.RUN_RUNNING, broken.run_id),
        (telemetry.RUN_FAILED, broken.run_id),
    ]
    created, running, completed = events[:3]
    assert created.timestamp == record.create_timestamp.timestamp()
    assert running.timestamp == record.start_time and completed.timestamp == record.end_time
    assert completed.measurements["duration_seconds"] == pytest.approx(record.end_time - record.start_time)
    assert all(e.metadata["job_name"] == "toy_job" and e.metadata["workflow"] == "toy" for e in events)
    failed = events[-1]
    assert failed.metadata["status"] == "failure" and "toy__source" in failed.metadata["error_message"]

    # The JSONL sink appends them to each run's own file, after the run's own events.
    for run_id, last in ((ok.run_id, telemetry.RUN_COMPLETED), (broken.run_id, telemetry.RUN_FAILED)):
        names = [row["name"] for row in read_jsonl(jsonl_path(run_id))]
        assert names[0] == telemetry.WORKFLOW_START
        assert names[-3:] == [telemetry.RUN_CREATED, telemetry.RUN_RUNNING, last]


def test_every_lifecycle_event_is_in_the_catalogue() -> None:
    catalogue = telemetry.catalogue()
    for name in (
        telemetry.RUN_CREATED,
        telemetry.RUN_RUNNING,
        telemetry.RUN_COMPLETED,
        telemetry.RUN_FAILED,
        telemetry.DEPLOYMENT_UPDATED,
        telemetry.FEEDBACK_RECEIVED,
        telemetry.FEEDBACK_BATCH,
    ):
        assert catalogue[name].metadata[:2] == ("run_id", "workflow"), name
    assert catalogue[telemetry.RUN_FAILED].metadata[2:] == ("job_name", "status", "error_message")
