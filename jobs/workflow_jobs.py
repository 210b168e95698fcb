"""``<workflow>_job``: a workflow's whole asset group, configured by its one flat, validated run config."""

from __future__ import annotations

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from kitchen.workflows import Workflow, split_run_config
from kitchen_assets.factory import dagster_config, op_configs
from kitchen_assets.sweep import SWEEP_TAG, report_key, sweep_keys, sweep_name

WORKFLOW_TAG = "kitchen/workflow"
# Run-level retry: the training step retries transient backend errors itself (its RetryPolicy) and fails
# at once on anything else, so a *run* is retried only when it died without a step failing (worker
# killed, out of memory, code server lost), once, from the failure; training resumes from its ledger.
# Acts where the instance enables run retries (dagster.yaml, which `make ui` installs).
RUN_RETRY_TAGS = {
    "dagster/max_retries": "1",
    "dagster/retry_strategy": "FROM_FAILURE",
    "dagster/retry_on_asset_or_op_failure": "false",
}


def job_name(workflow: Workflow) -> str:
    return f"{workflow.name}_job"


def run_config_mapping(workflow: Workflow) -> dg.ConfigMapping:
    """Validate the flat config at launch (ranges included) and split it into per-asset config."""
    flat = dagster_config(workflow.config)
    sections = op_configs(workflow)

    def mapping(val: dg.Config) -> dg.RunConfig:
        return dg.RunConfig(
            ops=split_run_config(val, sections),
            loggers={"console": {"config": {"log_level": val.log_level}}},  # type: ignore[attr-defined]
        )

    mapping.__annotations__["val"] = flat
    return dg.config_mapping(mapping)


def workflow_job(workflow: Workflow) -> UnresolvedAssetJobDefinition:
    return dg.define_asset_job(
        name=job_name(workflow),
        selection=dg.AssetSelection.groups(workflow.name),
        config=run_config_mapping(workflow),
        description=workflow.summary,
        tags={WORKFLOW_TAG: workflow.name, **RUN_RETRY_TAGS},
    )


def sweep_job(workflow: Workflow) -> UnresolvedAssetJobDefinition:
    """``<workflow>_sweep_job``: one configuration's training, evaluation and registration per partition
    (each partition's settings come from its key, so a backfill needs no config). Runs of a backfill queue
    like any run: ``run_queue`` in ``dagster.yaml`` limits how many train at once (README: Sweeps)."""
    return dg.define_asset_job(
        name=f"{sweep_name(workflow)}_job",
        selection=dg.AssetSelection.assets(*sweep_keys(workflow)),
        description=f"{workflow.name}: one configuration of a sweep per partition",
        tags={WORKFLOW_TAG: workflow.name, SWEEP_TAG: workflow.name},
    )


def sweep_report_job(workflow: Workflow) -> UnresolvedAssetJobDefinition:
    """``<workflow>_sweep_report_job``: compare the sweep's configurations and promote the best."""
    return dg.define_asset_job(
        name=f"{sweep_name(workflow)}_report_job",
        selection=dg.AssetSelection.assets(report_key(workflow)),
        description=f"{workflow.name}: compare a sweep's configurations, promote the best",
        tags={WORKFLOW_TAG: workflow.name},
    )
