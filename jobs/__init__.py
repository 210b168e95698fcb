"""Jobs, sensors and automation for every registered workflow (``kitchen.workflows``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from jobs.automation import evaluation_job, new_weights_sensor
from jobs.feedback import FeedbackRetrainSettings, feedback_job, feedback_sensor, feedback_target
from jobs.lifecycle import run_lifecycle_sensors
from jobs.sensors import RetrainSettings, failure_settings_from_env, retraining_sensor, run_failure_recorder
from jobs.workflow_jobs import job_name, sweep_job, sweep_report_job, workflow_job
from kitchen.workflows import Workflow
from kitchen_assets.feedback import feedback_settings


@dataclass(frozen=True)
class Automation:
    jobs: list[UnresolvedAssetJobDefinition]
    sensors: list[dg.SensorDefinition]


def kitchen_automation(workflows: Sequence[Workflow]) -> Automation:
    """Per workflow: ``<name>_job`` (the whole group), ``<name>_evaluation_job``, the sweep's
    ``<name>_sweep_job`` (partitioned) and ``<name>_sweep_report_job``, retraining on dataset
    change and evaluation of new weights; for every job, one failure recorder and the run lifecycle
    telemetry sensors; with ``KITCHEN_FEEDBACK=on``, ``feedback_job`` and retraining on served feedback.
    Sensors are configured from the environment when the code location loads (``jobs.sensors``,
    ``jobs.automation``, ``jobs.feedback``, ``jobs.lifecycle``)."""
    jobs: list[UnresolvedAssetJobDefinition] = []
    sensors: list[dg.SensorDefinition] = []
    by_name: dict[str, UnresolvedAssetJobDefinition] = {}
    for workflow in workflows:
        job, evaluation = workflow_job(workflow), evaluation_job(workflow)
        jobs += [job, evaluation, sweep_job(workflow), sweep_report_job(workflow)]
        by_name[workflow.name] = job
        sensors.append(retraining_sensor(job, RetrainSettings.from_env(workflow)))
        sensors.append(new_weights_sensor(workflow, evaluation))
    store = feedback_settings()
    if store is not None:
        target, feedback = feedback_target(), feedback_job()
        jobs.append(feedback)
        if target.name in by_name:
            settings = FeedbackRetrainSettings.from_env(target)
            sensors.append(feedback_sensor(settings, store, [feedback, by_name[target.name]]))
    sensors.append(run_failure_recorder(**failure_settings_from_env()))
    sensors += run_lifecycle_sensors()
    return Automation(jobs, sensors)


__all__ = ["Automation", "job_name", "kitchen_automation"]
