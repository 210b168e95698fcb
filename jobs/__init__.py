"""Jobs, sensors and automation for each workflow (``supervised`` now; DPO, RL, distillation later)."""

import dagster as dg

from jobs.automation import evaluation_job, new_weights_sensor
from jobs.sensors import RetrainSettings, failure_settings_from_env, retraining_sensor, run_failure_recorder
from jobs.supervised import supervised_job
from kitchen_assets.config import SupervisedRunConfig
from kitchen_assets.supervised import SUPERVISED_OP_CONFIGS
from kitchen_assets.supervised import WORKFLOW as SUPERVISED

WORKFLOWS = (SUPERVISED,)
supervised_evaluation_job = evaluation_job(SUPERVISED)
JOBS = (supervised_job, supervised_evaluation_job)


def kitchen_sensors() -> list[dg.SensorDefinition]:
    """Retraining on dataset change, evaluation of new weights, failure recording; each configured from
    the environment when the code location loads (see ``jobs.sensors`` and ``jobs.automation``)."""
    return [
        retraining_sensor(supervised_job, RetrainSettings.from_env()),
        new_weights_sensor(
            SUPERVISED,
            supervised_evaluation_job,
            flat_schema=SupervisedRunConfig,
            op_configs=SUPERVISED_OP_CONFIGS,
        ),
        run_failure_recorder(**failure_settings_from_env()),
    ]


__all__ = ["JOBS", "WORKFLOWS", "kitchen_sensors", "supervised_evaluation_job", "supervised_job"]
