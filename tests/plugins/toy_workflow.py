"""A throwaway workflow registered from outside Kitchen's tree: SFT whose datums are rendered inside the
plan (no assets module of its own), to show that registering is all a new workflow needs."""

from __future__ import annotations

from pydantic import BaseModel

from kitchen.data import build_datums, load_saved_dataset
from kitchen.manifests import DatasetManifest
from kitchen.training.supervised import SupervisedPlan
from kitchen.workflows import PlanContext, Workflow, register_workflow
from kitchen.workflows.config import (
    DatasetSection,
    EvalSection,
    ModelSection,
    RegistrySection,
    RunConfig,
    TrainingSection,
)
from kitchen.workflows.supervised import load_chat_dataset, smoke_run_config
from kitchen.workflows.supervised.evaluate import evaluate_supervised

SECTIONS: dict[str, type[BaseModel]] = {
    "base_model": ModelSection,
    "dataset": DatasetSection,
    "train": TrainingSection,
    "eval_report": EvalSection,
    "registered_model": RegistrySection,
}


class ToyConfig(RunConfig, ModelSection, DatasetSection, TrainingSection, EvalSection, RegistrySection):
    """Everything the toy workflow takes."""


def build_plan(ctx: PlanContext) -> SupervisedPlan:
    from transformers import AutoTokenizer

    dataset = ctx.inputs["dataset"]
    assert isinstance(dataset, DatasetManifest)
    tokenizer = AutoTokenizer.from_pretrained(ctx.base_model.tokenizer_path)
    built = build_datums(load_saved_dataset(dataset.path), tokenizer, train_on="all_assistant", max_length=64)
    config = ctx.config
    return SupervisedPlan.build(
        built.train,
        datums_hash=dataset.content_hash,
        batch_size=config.batch_size,
        epochs=config.epochs,
        seed=config.seed,
        max_steps=config.max_steps,
    )


def smoke(model_dir: str) -> dict[str, object]:
    values = smoke_run_config(model_dir)
    for key in ("max_length",):  # the toy has no datums section
        values.pop(key)
    return values


TOY = register_workflow(
    Workflow(
        name="toy",
        summary="A throwaway workflow for the registry tests.",
        config=ToyConfig,
        sections=SECTIONS,
        load_dataset=load_chat_dataset,
        build_plan=build_plan,
        evaluate=evaluate_supervised,
        default_learning_rate=lambda _: 1e-3,
        train_inputs=("dataset",),
        smoke_config=smoke,
    )
)
