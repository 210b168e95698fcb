"""Every registered workflow's assets: the standard graph from the factories, plus the workflow's own."""

from __future__ import annotations

import importlib

import dagster as dg

from kitchen.workflows import Workflow
from kitchen_assets.checks import eval_gate_check
from kitchen_assets.common import base_model_asset, dataset_asset
from kitchen_assets.deployment import DeploymentSettings, deployment_assets, deployment_settings
from kitchen_assets.evaluation import eval_report_asset
from kitchen_assets.hub_release import HubReleaseSettings, hub_release_assets, hub_release_settings
from kitchen_assets.registry import registered_model_asset
from kitchen_assets.sweep import sweep_assets
from kitchen_assets.training import training_asset

AssetLike = dg.AssetsDefinition | dg.AssetChecksDefinition


def own_assets(workflow: Workflow) -> list[dg.AssetsDefinition]:
    """``assets(workflow)`` from the module the workflow names; every kind it declares must be among them."""
    if workflow.assets_module is None:
        built: list[dg.AssetsDefinition] = []
    else:
        module = importlib.import_module(workflow.assets_module)
        built = list(module.assets(workflow))
    made = {key.path[-1] for asset in built for key in asset.keys}
    missing = [kind for kind in workflow.kinds if kind not in made]
    if missing:
        source = workflow.assets_module or "no assets module"
        raise ValueError(f"workflow {workflow.name!r} declares {missing} but {source} makes no such asset")
    return built


_BUILT: dict[tuple[int, HubReleaseSettings | None, DeploymentSettings | None], list[AssetLike]] = {}


def workflow_assets(workflow: Workflow) -> list[AssetLike]:
    """Built once per workflow object (and optional-asset settings): every ``Definitions`` (local or
    Tinker backend) shares them, since only the resources differ."""
    release = hub_release_settings(workflow)  # off unless the environment names a Hub repo
    deployment = deployment_settings(workflow)  # off unless the environment names a kitchen serve
    key = (id(workflow), release, deployment)
    built = _BUILT.get(key)
    if built is None:
        built = _BUILT[key] = [
            *_build(workflow),
            *hub_release_assets(workflow, release),
            *deployment_assets(workflow, deployment),
            *sweep_assets(workflow),  # <workflow>_sweep: the same factories, one partition a configuration
        ]
    return built


def _build(workflow: Workflow) -> list[AssetLike]:
    return [
        base_model_asset(workflow),
        dataset_asset(workflow),
        *own_assets(workflow),
        training_asset(workflow),
        eval_report_asset(workflow),
        eval_gate_check(workflow),  # blocking: a failing gate stops registration in the same run
        registered_model_asset(workflow),
    ]
