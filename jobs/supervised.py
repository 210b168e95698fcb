"""``supervised_job``: the whole supervised group, configured by one flat, validated run config."""

import dagster as dg

from kitchen_assets.config import SupervisedRunConfig, split_run_config
from kitchen_assets.supervised import SUPERVISED_OP_CONFIGS, WORKFLOW

# Run-level retry: the training step retries transient backend errors itself (its RetryPolicy) and fails
# at once on anything else, so a *run* is retried only when it died without a step failing (worker
# killed, out of memory, code server lost), once, from the failure; training resumes from its ledger.
# Acts where the instance enables run retries (dagster.yaml, which `make ui` installs).
RUN_RETRY_TAGS = {
    "dagster/max_retries": "1",
    "dagster/retry_strategy": "FROM_FAILURE",
    "dagster/retry_on_asset_or_op_failure": "false",
}


@dg.config_mapping
def supervised_config(val: SupervisedRunConfig) -> dg.RunConfig:
    """Validate the flat config at launch (ranges included) and split it into per-asset config."""
    return dg.RunConfig(
        ops=split_run_config(val, SUPERVISED_OP_CONFIGS),
        loggers={"console": {"config": {"log_level": val.log_level}}},
    )


supervised_job = dg.define_asset_job(
    name="supervised_job",
    selection=dg.AssetSelection.groups(WORKFLOW),
    config=supervised_config,
    description="Supervised fine-tuning: base model + dataset -> datums -> LoRA training -> eval report.",
    tags={"kitchen/workflow": WORKFLOW, **RUN_RETRY_TAGS},
)
