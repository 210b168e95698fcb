"""Jobs, sensors and automation for each workflow (``supervised`` now; DPO, RL, distillation later)."""

import dagster as dg

from jobs.automation import automation_sensor, with_automation
from jobs.sensors import RetrainSettings, failure_settings_from_env, retraining_sensor, run_failure_recorder
from jobs.supervised import supervised_job
from kitchen_assets.supervised import WORKFLOW as SUPERVISED

WORKFLOWS = (SUPERVISED,)
JOBS = (supervised_job,)


def kitchen_sensors() -> list[dg.SensorDefinition]:
    """Retraining on dataset change, failure recording, and the automation after new weights; each is
    configured from the environment when the code location loads (see ``jobs.sensors``)."""
    return [
        retraining_sensor(supervised_job, RetrainSettings.from_env()),
        run_failure_recorder(**failure_settings_from_env()),
        automation_sensor(WORKFLOWS),
    ]


__all__ = ["JOBS", "WORKFLOWS", "kitchen_sensors", "supervised_job", "with_automation"]
