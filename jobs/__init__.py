"""Jobs, sensors and automation for every registered workflow (``kitchen.workflows``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from jobs.automation import evaluation_job, new_weights_sensor
from jobs.sensors import RetrainSettings, failure_settings_from_env, retraining_sensor, run_failure_recorder
from jobs.workflow_jobs import job_name, workflow_job
from kitchen.workflows import Workflow


@dataclass(frozen=True)
class Automation:
    jobs: list[UnresolvedAssetJobDefinition]
    sensors: list[dg.SensorDefinition]


def kitchen_automation(workflows: Sequence[Workflow]) -> Automation:
    """Per workflow: ``<name>_job`` (the whole group), ``<name>_evaluation_job``, retraining on dataset
    change and evaluation of new weights; one failure recorder for every job. Sensors are configured from
    the environment when the code location loads (``jobs.sensors``, ``jobs.automation``)."""
    jobs: list[UnresolvedAssetJobDefinition] = []
    sensors: list[dg.SensorDefinition] = []
    for workflow in workflows:
        job, evaluation = workflow_job(workflow), evaluation_job(workflow)
        jobs += [job, evaluation]
        sensors.append(retraining_sensor(job, RetrainSettings.from_env(workflow)))
        sensors.append(new_weights_sensor(workflow, evaluation))
    sensors.append(run_failure_recorder(**failure_settings_from_env()))
    return Automation(jobs, sensors)


__all__ = ["Automation", "job_name", "kitchen_automation"]
