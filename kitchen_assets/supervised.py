"""The supervised (SFT) workflow's asset group: ``supervised/{base_model,dataset,datums,checkpoints,
trained_weights,eval_report}``."""

from __future__ import annotations

import dagster as dg

from kitchen_assets.checks import eval_gate_check
from kitchen_assets.common import base_model_asset, dataset_asset, datums_asset
from kitchen_assets.config import (
    DatasetConfig,
    DatumsConfig,
    EvalConfig,
    ModelConfig,
    RegistryConfig,
    TrainingConfig,
)
from kitchen_assets.evaluation import eval_report_asset
from kitchen_assets.registry import registered_model_asset
from kitchen_assets.training import sft_batches, training_multi_asset

WORKFLOW = "supervised"

supervised_assets: list[dg.AssetsDefinition] = [
    base_model_asset(WORKFLOW),
    dataset_asset(WORKFLOW),
    datums_asset(WORKFLOW),
    training_multi_asset(WORKFLOW, loss_fn="cross_entropy", batch_builder=sft_batches),
    eval_report_asset(WORKFLOW),
    eval_gate_check(WORKFLOW),  # blocking: a failing gate stops registration in the same run
    registered_model_asset(WORKFLOW),
]

# Op name -> the config class it takes; the job's config mapping splits the flat run config with it.
SUPERVISED_OP_CONFIGS: dict[str, type[dg.Config]] = {
    f"{WORKFLOW}__base_model": ModelConfig,
    f"{WORKFLOW}__dataset": DatasetConfig,
    f"{WORKFLOW}__datums": DatumsConfig,
    f"{WORKFLOW}__train": TrainingConfig,
    f"{WORKFLOW}__eval_report": EvalConfig,
    f"{WORKFLOW}__registered_model": RegistryConfig,
}
