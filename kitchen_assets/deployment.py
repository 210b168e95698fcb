"""The optional ``<workflow>/deployment`` asset: which registered version a running ``kitchen serve`` serves.

Off by default, like ``hub_release``: it exists only when the code location's environment names the
server, so a workflow's graph is unchanged until a team opts in:

- ``KITCHEN_<WORKFLOW>_DEPLOYMENT_URL=http://host:8000`` for one workflow, or ``KITCHEN_DEPLOYMENT_URL``
  for every workflow (``{workflow}`` in it is replaced by the workflow's name): a ``kitchen serve`` of the
  workflow's registered model, usually ``models:/NAME@champion``;
- ``KITCHEN_[<WORKFLOW>_]DEPLOYMENT_WAIT_S``: how long to wait for the server to pick up a new champion
  (default 30 s; its ``--poll-interval`` is 5 s).

The asset sits behind ``registered_model``, so the UI's lineage runs from the dataset to the deployed
version. It does not start a server (a long-running process is no asset's job); it asks the running one
(``/health``), waits until it serves what its reference names in the registry now (a new champion), and
records that, tagging the served version with ``kitchen.deployment.url``. A server that is down, serves
another model or never picks up the champion fails the asset, naming what it found.
"""

# No ``from __future__ import annotations``: Dagster reads resource types from the signature.
import os
from dataclasses import dataclass

import dagster as dg

from kitchen.manifests import DeploymentManifest, RegisteredModelManifest
from kitchen.registry.names import parse_model_ref
from kitchen.registry.store import RegistryError
from kitchen.serve.probe import DeploymentError, served_model, wait_for_version
from kitchen.telemetry import DEPLOYMENT_UPDATED, emit
from kitchen.workflows import Workflow
from kitchen_assets.factory import workflow_asset
from resources.mlflow_registry import MlflowRegistry

KIND = "deployment"
URL_TAG = "kitchen.deployment.url"
REF_TAG = "kitchen.deployment.ref"


@dataclass(frozen=True)
class DeploymentSettings:
    url: str
    wait_s: float = 30.0


def _variable(workflow: Workflow, setting: str) -> str:
    prefixed = f"KITCHEN_{workflow.name.upper()}_DEPLOYMENT_{setting}"
    return prefixed if prefixed in os.environ else f"KITCHEN_DEPLOYMENT_{setting}"


def deployment_settings(workflow: Workflow) -> DeploymentSettings | None:
    """The workflow's deployment from the environment; None (the default) when it names no server."""
    variable = _variable(workflow, "URL")
    url = os.environ.get(variable, "").strip().replace("{workflow}", workflow.name)
    if not url:
        return None
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{variable}={url!r}: expected the http(s) URL of a kitchen serve")
    wait_variable = _variable(workflow, "WAIT_S")
    raw = os.environ.get(wait_variable, "").strip() or "30"
    try:
        wait_s = float(raw)
    except ValueError:
        raise ValueError(f"{wait_variable}={raw!r}: expected seconds") from None
    if wait_s < 0:
        raise ValueError(f"{wait_variable}={raw!r}: expected seconds >= 0")
    return DeploymentSettings(url=url.rstrip("/"), wait_s=wait_s)


def deployment_assets(workflow: Workflow, settings: DeploymentSettings | None) -> list[dg.AssetsDefinition]:
    return [] if settings is None else [deployment_asset(workflow, settings)]


def deployment_asset(workflow: Workflow, settings: DeploymentSettings) -> dg.AssetsDefinition:
    @workflow_asset(
        workflow,
        KIND,
        ins=("registered_model",),
        kinds={"fastapi"},
        description="The registered version the kitchen serve at "
        f"{settings.url} answers with, as the server reports it (waits for a new champion to be picked up).",
    )
    def deployment(
        context: dg.AssetExecutionContext,
        registry: MlflowRegistry,
        registered_model: RegisteredModelManifest,
    ) -> DeploymentManifest:
        store = registry.registry()
        try:
            served = served_model(settings.url)
            if served.ref.startswith(("file:", "tinker:", "/")):
                raise DeploymentError(
                    f"{served.url} serves the sampler path {served.ref}, not a registered model"
                )
            ref = parse_model_ref(served.ref)
            if ref.name != registered_model.name:
                raise DeploymentError(
                    f"{served.url} serves {served.ref}, not a version of {registered_model.name}"
                )
            view = store.resolve(ref)
            target = f"{view.version.name}/{view.number}"
            if served.version != target:
                context.log.info(f"{served.url} serves {served.version}; waiting for {target}")
                served = wait_for_version(settings.url, target, wait_s=settings.wait_s)
            for key, value in ((URL_TAG, served.url), (REF_TAG, served.ref)):
                store.client.set_model_version_tag(view.version.name, view.number, key, value)
        except (DeploymentError, RegistryError, ValueError) as err:
            raise dg.Failure(description=str(err), allow_retries=False) from None
        served_uri = f"models:/{target}"
        current = served_uri == registered_model.model_uri
        reason = f"{served.url} serves {served.ref} = {target}" + (
            ", the version this run registered"
            if current
            else f"; {registered_model.model_uri} was registered as {registered_model.alias}"
        )
        context.log.info(reason)
        emit(
            DEPLOYMENT_UPDATED,
            {},
            {
                "url": served.url,
                "served_ref": served.ref,
                "served_version": served_uri,
                "registered_version": registered_model.model_uri,
                "current": current,
            },
        )
        context.add_output_metadata(
            {
                "url": dg.MetadataValue.url(served.url),
                "served_ref": served.ref,
                "served_version": served_uri,
                "registered_version": registered_model.model_uri,
                "current": current,
            }
        )
        return DeploymentManifest(
            url=served.url,
            served_ref=served.ref,
            served_version=target,
            model_uri=served_uri,
            registered_uri=registered_model.model_uri,
            current=current,
            reason=reason,
        )

    return deployment
