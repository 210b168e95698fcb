"""Supervised fine-tuning (plain and chat SFT): ``supervised/{base_model, dataset, datums, checkpoints,
trained_weights, eval_report, registered_model}``.

The dataset is normalised to chat messages, rendered through the chat template into datums (the
``datums`` asset, in ``kitchen_assets.supervised``), and trained with ``cross_entropy`` on the assistant
tokens; evaluation is lm-eval on the held-out split.
"""

from __future__ import annotations

from pathlib import Path

from kitchen.data import read_datums
from kitchen.data.sources import LoadedDataset
from kitchen.manifests import BaseModelManifest, DatumsManifest
from kitchen.models.base import hidden_size
from kitchen.training.schedule import recommended_lora_lr
from kitchen.training.supervised import SupervisedPlan
from kitchen.workflows.config import DatasetSection
from kitchen.workflows.context import PlanContext
from kitchen.workflows.registry import Workflow, register_workflow
from kitchen.workflows.supervised.config import SECTIONS, SupervisedConfig, smoke_run_config
from kitchen.workflows.supervised.evaluate import evaluate_supervised

NAME = "supervised"


def load_chat_dataset(config: DatasetSection) -> LoadedDataset:
    """Any accepted chat/SFT schema, normalised to messages (see ``kitchen.data.schemas``)."""
    return config.load()


def build_plan(ctx: PlanContext) -> SupervisedPlan:
    datums = ctx.inputs["datums"]
    assert isinstance(datums, DatumsManifest)
    config = ctx.config
    return SupervisedPlan.build(
        read_datums(Path(datums.train_path)),
        datums_hash=datums.content_hash,
        batch_size=config.batch_size,
        epochs=config.epochs,
        seed=config.seed,
        max_steps=config.max_steps,
    )


def lora_learning_rate(base_model: BaseModelManifest) -> float:
    """tinker-cookbook's LoRA rule (``hyperparam_utils.get_lr``) from the model's hidden size."""
    return recommended_lora_lr(hidden_size(base_model), base_model.architecture)


SUPERVISED = register_workflow(
    Workflow(
        name=NAME,
        summary="Supervised fine-tuning (SFT) on chat or prompt/completion data: cross-entropy on replies.",
        config=SupervisedConfig,
        sections=SECTIONS,
        load_dataset=load_chat_dataset,
        build_plan=build_plan,
        evaluate=evaluate_supervised,
        default_learning_rate=lora_learning_rate,
        train_inputs=("datums",),
        assets_module="kitchen_assets.supervised",
        smoke_config=smoke_run_config,
    )
)

__all__ = [
    "NAME",
    "SUPERVISED",
    "SupervisedConfig",
    "SupervisedPlan",
    "load_chat_dataset",
    "smoke_run_config",
]
