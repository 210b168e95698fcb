"""Run lifecycle telemetry from Dagster's run status: ``kitchen.run.created``, ``.running``, ``.completed``,
``.failed``.

Run status sensors rather than the in-step instrumentation (``kitchen_assets.telemetry``, which gives
``kitchen.workflow.*``): they read each run's status events from the instance, so they cover every run
of the code location however it was launched (the UI, a sensor, ``kitchen run`` on the same instance),
including a run that is queued and never starts or dies before its first step, which no step sees. They
run in the daemon (``dagster dev`` starts one) and hand the events to the sinks that
``KITCHEN_TELEMETRY_SINKS`` selects there; the JSONL sink appends them to the run's own file.

``created`` is the run being queued, or, for a run started without a queue (``kitchen run``,
``execute_in_process``), emitted just before ``running``; it carries the run's creation time either way.
``KITCHEN_RUN_EVENTS_SENSOR`` (``running``/``stopped``, default ``running``: they only emit events).
"""

import time
from typing import Any

import dagster as dg

from jobs.sensors import env_status
from jobs.workflow_jobs import WORKFLOW_TAG
from kitchen import telemetry
from kitchen.telemetry.events import RUN_COMPLETED, RUN_CREATED, RUN_FAILED, RUN_RUNNING
from kitchen_assets.telemetry import configure_sinks

STATUS_ENV = "KITCHEN_RUN_EVENTS_SENSOR"


def _base(run: dg.DagsterRun) -> dict[str, Any]:
    workflow = run.tags.get(WORKFLOW_TAG) or run.job_name.removesuffix("_job")
    return {"run_id": run.run_id, "workflow": workflow, "job_name": run.job_name}


def _times(context: dg.RunStatusSensorContext) -> tuple[float, float | None, float | None]:
    """The run's creation, start and end time (start and end None until known)."""
    record = context.instance.get_run_record_by_id(context.dagster_run.run_id)
    if record is None:
        return time.time(), None, None
    return record.create_timestamp.timestamp(), record.start_time, record.end_time


def emit_run_event(context: dg.RunStatusSensorContext, name: str) -> None:
    """Emit ``name`` for the context's run, with Dagster's times (``run.created`` first when due)."""
    configure_sinks()
    run, event = context.dagster_run, context.dagster_event
    base = _base(run)
    created, started, ended = _times(context)
    if name == RUN_CREATED:
        telemetry.emit(RUN_CREATED, {}, base, timestamp=created)
        return
    if name == RUN_RUNNING:
        queued = context.instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.RUN_ENQUEUED, limit=1
        ).records
        if not queued:  # never queued, so no run.created yet
            telemetry.emit(RUN_CREATED, {}, base, timestamp=created)
        telemetry.emit(RUN_RUNNING, {}, base, timestamp=started or time.time())
        return
    end = ended or time.time()
    duration = {"duration_seconds": max(0.0, end - started) if started is not None else 0.0}
    if name == RUN_COMPLETED:
        telemetry.emit(RUN_COMPLETED, duration, base, timestamp=end)
        return
    status = "canceled" if event.event_type == dg.DagsterEventType.RUN_CANCELED else "failure"
    message = " ".join((event.message or status).split())
    telemetry.emit(RUN_FAILED, duration, {**base, "status": status, "error_message": message}, timestamp=end)


#: Dagster run status -> the event its sensor emits.
RUN_EVENTS: dict[dg.DagsterRunStatus, str] = {
    dg.DagsterRunStatus.QUEUED: RUN_CREATED,
    dg.DagsterRunStatus.STARTED: RUN_RUNNING,
    dg.DagsterRunStatus.SUCCESS: RUN_COMPLETED,
    dg.DagsterRunStatus.FAILURE: RUN_FAILED,
    dg.DagsterRunStatus.CANCELED: RUN_FAILED,
}


def run_lifecycle_sensors(
    default_status: dg.DefaultSensorStatus | None = None,
) -> list[dg.SensorDefinition]:
    """One run status sensor per status in ``RUN_EVENTS``, named ``kitchen_run_<status>_telemetry``."""
    status = default_status or env_status(STATUS_ENV, dg.DefaultSensorStatus.RUNNING)
    sensors: list[dg.SensorDefinition] = []
    for run_status, name in RUN_EVENTS.items():
        sensors.append(
            dg.run_status_sensor(
                run_status=run_status,
                name=f"kitchen_run_{run_status.value.lower()}_telemetry",
                default_status=status,
                description=f"Emits {name} to the telemetry sinks when a run is {run_status.value.lower()}.",
            )(_emitter(name))
        )
    return sensors


def _emitter(name: str) -> Any:
    def emit(context: dg.RunStatusSensorContext) -> None:
        emit_run_event(context, name)

    return emit
