"""The registry of workflows: the ``Definitions``, jobs, sensors and the CLI iterate it.

A workflow is one ``Workflow`` object, built in its own folder (``kitchen/workflows/<name>/``): its flat
run config and the section each asset reads, how its dataset is normalised, the plan the one training
loop drives, and how its trained model is evaluated. The Dagster layer makes the standard assets of every
registered workflow (``<name>/base_model``, ``dataset``, ``checkpoints`` + ``trained_weights``,
``eval_report`` with its blocking gate, ``registered_model``); assets that only one workflow has (SFT's
``datums``, DPO's ``reference_logprobs``) live in the Dagster module the workflow names.

Built-in workflows are listed in ``BUILTIN``; more are loaded from the modules named in
``KITCHEN_WORKFLOW_MODULES`` (comma-separated), each of which calls ``register_workflow``. Adding a workflow
therefore touches no shared file beyond that one registration.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from kitchen.workflows.config import RunConfig

if TYPE_CHECKING:
    from kitchen.data.sources import LoadedDataset
    from kitchen.manifests import BaseModelManifest
    from kitchen.training.plan import TrainingPlan
    from kitchen.workflows.context import EvalContext, Evaluation, PlanContext

#: Modules that register Kitchen's own workflows, in the order the CLI and the UI list them.
BUILTIN: tuple[str, ...] = (
    "kitchen.workflows.supervised",
    "kitchen.workflows.rl",
    "kitchen.workflows.distillation",
    "kitchen.workflows.dpo",
)
PLUGINS_ENV = "KITCHEN_WORKFLOW_MODULES"

#: Asset kinds every workflow has; the training step is the ``train`` op (outputs checkpoints and weights).
STANDARD_KINDS = ("base_model", "dataset", "train", "eval_report", "registered_model")


@dataclass(frozen=True)
class Workflow:
    name: str
    """Asset key prefix, group name, ``kitchen run <name>``, ``<name>_job``."""
    summary: str
    config: type[RunConfig]
    """The flat run config: CLI flags, job schema, launchpad."""
    sections: Mapping[str, type[BaseModel]]
    """Op kind (``base_model``, ``dataset``, ``train``, ..., the workflow's own) -> the section it reads."""
    load_dataset: Callable[[Any], LoadedDataset]
    """The ``dataset`` section -> rows normalised to this workflow's schema (split, skips counted)."""
    build_plan: Callable[[PlanContext], TrainingPlan]
    evaluate: Callable[[EvalContext], Evaluation]
    default_learning_rate: Callable[[BaseModelManifest], float]
    """The learning rate when ``--learning-rate`` is not given (each workflow states its rule)."""
    train_inputs: tuple[str, ...] = ()
    """Asset kinds of this workflow the training step reads besides ``base_model``."""
    train_outputs: Mapping[str, str] = field(default_factory=dict)
    """Extra outputs of the training step (kind -> description), written by the plan (RL's rollouts)."""
    eval_inputs: tuple[str, ...] = ()
    """Asset kinds the evaluation reads besides base model, dataset, checkpoints and weights."""
    assets_module: str | None = None
    """Dagster module whose ``assets(workflow)`` returns this workflow's own assets."""
    aliases: tuple[str, ...] = ()
    """Other names ``kitchen run`` accepts (``distill`` for ``distillation``)."""
    smoke_config: Callable[[str], dict[str, Any]] | None = None
    """A seconds-long flat config on a tiny model directory (tests and CI)."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"workflow name {self.name!r} must be lower-case letters, digits and _")
        missing = [k for k in STANDARD_KINDS if k not in self.sections]
        if missing:
            raise ValueError(f"workflow {self.name!r}: no config section for {missing}")
        fields = {name for cls in self.sections.values() for name in cls.model_fields}
        fields |= set(RunConfig.model_fields)
        flat = set(self.config.model_fields)
        if flat != fields:
            raise ValueError(
                f"workflow {self.name!r}: {self.config.__name__} must combine exactly its sections' fields; "
                f"missing {sorted(fields - flat)}, extra {sorted(flat - fields)}"
            )

    @property
    def kinds(self) -> tuple[str, ...]:
        """Every asset kind of the workflow's own (beyond the standard ones)."""
        return tuple(k for k in self.sections if k not in STANDARD_KINDS)


_REGISTRY: dict[str, Workflow] = {}
_LOCK = threading.RLock()
_LOADED = False


def register_workflow(workflow: Workflow) -> Workflow:
    """Add ``workflow`` (re-registering the same object is harmless: module reloads)."""
    with _LOCK:
        for key in (workflow.name, *workflow.aliases):
            existing = _REGISTRY.get(key)
            if existing is not None and existing.name != workflow.name:
                raise ValueError(f"workflow name {key!r} is already taken by {existing.name!r}")
        _REGISTRY[workflow.name] = workflow
    return workflow


def _load() -> None:
    global _LOADED
    with _LOCK:
        if _LOADED:
            return
        _LOADED = True
        plugins = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
        for module in (*BUILTIN, *plugins):
            try:
                importlib.import_module(module)
            except ImportError as err:
                _LOADED = False
                raise ImportError(f"{PLUGINS_ENV}: cannot import workflow module {module!r}: {err}") from err


def _builtin_rank(workflow: Workflow) -> int:
    """Its module's place in ``BUILTIN`` (plugins after): importing a workflow's module directly registers
    it before the registry loads the others, and the listing must not depend on that."""
    module = workflow.config.__module__
    for rank, name in enumerate(BUILTIN):
        if module == name or module.startswith(name + "."):
            return rank
    return len(BUILTIN)


def workflows() -> list[Workflow]:
    """Every registered workflow, built-ins first in ``BUILTIN``'s order, then plugins as registered."""
    _load()
    with _LOCK:
        return sorted(_REGISTRY.values(), key=_builtin_rank)


def get_workflow(name: str) -> Workflow:
    """The workflow called ``name`` or one of its aliases, or an error listing what exists."""
    for workflow in workflows():
        if name == workflow.name or name in workflow.aliases:
            return workflow
    known = ", ".join(w.name for w in workflows())
    raise KeyError(f"unknown workflow {name!r}; known: {known}")
