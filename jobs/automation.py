"""Evaluation follows new weights; registration follows only behind the eval gate.

A re-run of training alone (``checkpoints`` + ``trained_weights`` from the UI, or after a failure) leaves
the eval report describing older weights. ``<workflow>_new_weights_sensor`` watches ``trained_weights``
and, for a materialisation whose run did not also plan the eval report (a full workflow run evaluates
its own weights), launches ``<workflow>_evaluation_job``: the eval report, its blocking quality-gate
check, and everything downstream of the report (registration), in one run, so a failing gate stops
registration in that run.

Why a sensor rather than declarative automation: the gate's metric and margin, the eval tasks and the
registered model's name are run config, and an automation-condition run can carry none, so it would judge
new weights by the *default* gate. This sensor launches with the eval and registration config of the
run that produced the current eval report, so the gate in force is the one the team last ran.

Default status ``running`` (``KITCHEN_NEW_WEIGHTS_SENSOR=stopped`` to change) and interval 30 s
(``KITCHEN_NEW_WEIGHTS_INTERVAL``): it only launches work when weights appear outside a full run. Its
runs are tagged ``kitchen/trigger=new-weights`` and ``kitchen/weights_run=<run that trained them>``.
"""

from collections.abc import Mapping
from typing import Any

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from jobs.sensors import TRIGGER_TAG, env_number, env_status
from kitchen.workflows import Workflow, split_run_config
from kitchen.workflows.config import flatten_run_config
from kitchen_assets.factory import asset_key, op_configs

WEIGHTS_RUN_TAG = "kitchen/weights_run"


def evaluation_job(workflow: Workflow) -> UnresolvedAssetJobDefinition:
    """The eval report and everything downstream of it; asset jobs include the assets' checks."""
    return dg.define_asset_job(
        name=f"{workflow.name}_evaluation_job",
        selection=dg.AssetSelection.assets(asset_key(workflow, "eval_report")).downstream(),
        description="Evaluate the current trained weights; the blocking quality gate decides registration.",
        tags={"kitchen/workflow": workflow.name},
    )


def run_planned(instance: dg.DagsterInstance, run_id: str, key: dg.AssetKey) -> bool:
    """Whether run ``run_id`` planned to materialise ``key`` (known from the run's start)."""
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED, limit=1000
    ).records
    return any(
        r.event_log_entry.dagster_event is not None and r.event_log_entry.dagster_event.asset_key == key
        for r in records
    )


def op_config_from_run(
    run_config: Mapping[str, Any], op_names: set[str], workflow: Workflow
) -> dict[str, Any]:
    """The config of ``op_names`` in a stored run config: per-op (``ops:``, from asset jobs and
    ``dagster asset materialize``) or the workflow job's flat form, validated and split by its schema."""
    ops = run_config.get("ops")
    if isinstance(ops, Mapping):
        return {op: dict(section) for op, section in ops.items() if op in op_names}
    flat = workflow.config(**flatten_run_config(run_config))
    return {
        op: section for op, section in split_run_config(flat, op_configs(workflow)).items() if op in op_names
    }


def new_weights_sensor(workflow: Workflow, job: UnresolvedAssetJobDefinition) -> dg.SensorDefinition:
    """Launch ``job`` once per ``trained_weights`` materialisation made outside a full workflow run."""
    weights, report = asset_key(workflow, "trained_weights"), asset_key(workflow, "eval_report")

    @dg.asset_sensor(
        asset_key=weights,
        job=job,
        name=f"{workflow.name}_new_weights_sensor",
        default_status=env_status("KITCHEN_NEW_WEIGHTS_SENSOR", dg.DefaultSensorStatus.RUNNING),
        minimum_interval_seconds=int(env_number("KITCHEN_NEW_WEIGHTS_INTERVAL", 30)),
        description="Evaluates trained weights made outside a full run; the gate decides registration.",
    )
    def _sensor(
        context: dg.SensorEvaluationContext, asset_event: dg.EventLogEntry
    ) -> dg.RunRequest | dg.SkipReason:
        if run_planned(context.instance, asset_event.run_id, report):
            return dg.SkipReason(f"run {asset_event.run_id} evaluates the weights it trained")
        op_names = set(context.repository_def.get_job(job.name).graph.node_dict)  # type: ignore[union-attr]
        run_config: dict[str, Any] = {}
        last_report = context.instance.get_latest_materialization_event(report)
        last_run = context.instance.get_run_by_id(last_report.run_id) if last_report else None
        if last_run is not None:
            ops = op_config_from_run(last_run.run_config or {}, op_names, workflow)
            run_config = {"ops": ops} if ops else {}
            context.log.info(
                f"evaluating with the config of run {last_run.run_id}, which made the eval report"
            )
        return dg.RunRequest(
            run_key=f"weights-from-{asset_event.run_id}",
            run_config=run_config,
            tags={TRIGGER_TAG: "new-weights", WEIGHTS_RUN_TAG: asset_event.run_id},
        )

    return _sensor
