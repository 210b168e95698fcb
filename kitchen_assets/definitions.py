"""The Dagster ``Definitions`` that ``workspace.yaml``, ``dagster dev`` and the ``kitchen`` CLI load.

Every registered workflow (``kitchen.workflows``) contributes its asset group, job, evaluation job and
sensors. ``KITCHEN_BACKEND`` (``local`` by default) picks the training resource bound as ``training``; no
asset code changes between backends.
"""

from __future__ import annotations

import os

import dagster as dg

from jobs import kitchen_automation
from kitchen.workflows import workflows
from kitchen_assets.feedback import feedback_assets, feedback_settings
from kitchen_assets.io import ManifestIOManager
from kitchen_assets.workflows import workflow_assets
from resources.mlflow_registry import MlflowRegistry
from resources.training import LocalBackend, TrainingBackend


def training_backend(name: str | None = None) -> TrainingBackend:
    """The training resource for ``name`` (``local`` or ``tinker``)."""
    name = (name or os.environ.get("KITCHEN_BACKEND") or "local").lower()
    if name == "local":
        return LocalBackend()
    if name == "tinker":
        from resources.tinker_backend import TinkerBackend

        return TinkerBackend.from_env()
    raise ValueError(f"unknown training backend {name!r}; expected 'local' or 'tinker'")


def build_definitions(backend: str | None = None) -> dg.Definitions:
    registered = workflows()
    automation = kitchen_automation(registered)
    return dg.Definitions(
        assets=[
            *(asset for workflow in registered for asset in workflow_assets(workflow)),
            *feedback_assets(feedback_settings(), registered),  # off unless KITCHEN_FEEDBACK=on
        ],
        jobs=automation.jobs,
        sensors=automation.sensors,
        resources={
            "training": training_backend(backend),
            "registry": MlflowRegistry(),  # MLFLOW_TRACKING_URI, else the SQLite store under KITCHEN_HOME
            "io_manager": ManifestIOManager(),
        },
        # Steps share one process: models loaded for training are reused by evaluation, and no step pays
        # a re-import of the code location.
        executor=dg.in_process_executor,
    )


defs = build_definitions()
