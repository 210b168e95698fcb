"""The optional ``<workflow>/hub_release`` asset: publish every new champion to the Hugging Face Hub.

Off by default. It exists only when the environment of the code location (``dagster dev``, the daemon,
``kitchen run``) names a repo, so a workflow's graph, jobs and tests are unchanged until a team opts in:

- ``KITCHEN_<WORKFLOW>_HUB_RELEASE_REPO=ORG/NAME`` for one workflow, or ``KITCHEN_HUB_RELEASE_REPO`` for
  every workflow (``{workflow}`` in it is replaced by the workflow's name);
- ``KITCHEN_[<WORKFLOW>_]HUB_RELEASE_MERGED``: ``1`` pushes merged weights (default ``0``: the adapter);
- ``KITCHEN_[<WORKFLOW>_]HUB_RELEASE_PRIVATE``: ``0`` creates the repo public (default ``1``: private);
- ``KITCHEN_[<WORKFLOW>_]HUB_RELEASE_BASE_MODEL_ID``: the base's Hub id when it was a local directory;
- ``HF_TOKEN`` and ``HF_ENDPOINT`` as for ``kitchen models push``.

A bad value, or no token, stops the code location from loading, naming the variable, so ``kitchen run``
fails before training rather than after. The asset sits behind ``registered_model`` (so behind the
blocking gate): a challenger is not published, and a version already pushed to the repo is not pushed
again; both materialise with the reason.
"""

# No ``from __future__ import annotations``: Dagster reads resource types from the signature.
import os
from dataclasses import dataclass
from typing import Literal

import dagster as dg

from kitchen.manifests import HubReleaseManifest, RegisteredModelManifest
from kitchen.publish import PublishError, check_repo_id, connect, hub_token, plan_export, push
from kitchen.publish.hub import HUB_COMMIT_TAG, HUB_KIND_TAG, HUB_REPO_TAG, HUB_URL_TAG
from kitchen.registry import CHAMPION
from kitchen.registry.store import RegistryError
from kitchen.workflows import Workflow
from kitchen_assets.factory import workflow_asset
from resources.mlflow_registry import MlflowRegistry

KIND = "hub_release"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class HubReleaseSettings:
    repo_id: str
    merged: bool = False
    private: bool = True
    base_model_id: str | None = None


def release_variable(workflow: Workflow, setting: str) -> str:
    """``KITCHEN_<WORKFLOW>_HUB_RELEASE_<SETTING>`` when set, else ``KITCHEN_HUB_RELEASE_<SETTING>``."""
    prefixed = f"KITCHEN_{workflow.name.upper()}_HUB_RELEASE_{setting}"
    return prefixed if prefixed in os.environ else f"KITCHEN_HUB_RELEASE_{setting}"


def _flag(workflow: Workflow, setting: str, default: bool) -> bool:
    variable = release_variable(workflow, setting)
    raw = os.environ.get(variable, "").strip().lower()
    if not raw:
        return default
    if raw not in _TRUE + _FALSE:
        raise ValueError(f"{variable}={raw!r}: expected 1 or 0 (true/false)")
    return raw in _TRUE


def hub_release_settings(workflow: Workflow) -> HubReleaseSettings | None:
    """The workflow's release settings from the environment; None (the default) when it names no repo."""
    variable = release_variable(workflow, "REPO")
    template = os.environ.get(variable, "").strip()
    if not template:
        return None
    try:
        repo_id = check_repo_id(template.replace("{workflow}", workflow.name))
        hub_token()
    except PublishError as err:
        raise ValueError(f"{variable}={template!r} turns on {workflow.name}/{KIND}, but {err}") from None
    base_model_id = os.environ.get(release_variable(workflow, "BASE_MODEL_ID"), "").strip() or None
    return HubReleaseSettings(
        repo_id=repo_id,
        merged=_flag(workflow, "MERGED", False),
        private=_flag(workflow, "PRIVATE", True),
        base_model_id=base_model_id,
    )


def hub_release_assets(workflow: Workflow, settings: HubReleaseSettings | None) -> list[dg.AssetsDefinition]:
    return [] if settings is None else [hub_release_asset(workflow, settings)]


def hub_release_asset(workflow: Workflow, settings: HubReleaseSettings) -> dg.AssetsDefinition:
    kind: Literal["adapter", "merged"] = "merged" if settings.merged else "adapter"

    @workflow_asset(
        workflow,
        KIND,
        ins=("registered_model",),
        kinds={"huggingface"},
        description=f"The registered champion published to the Hugging Face Hub as {settings.repo_id} "
        f"({kind}, model card with lineage and eval); challengers and versions already there are skipped.",
    )
    def hub_release(
        context: dg.AssetExecutionContext,
        registry: MlflowRegistry,
        registered_model: RegisteredModelManifest,
    ) -> HubReleaseManifest:
        uri = registered_model.model_uri

        def skipped(reason: str, url: str | None = None, commit: str | None = None) -> HubReleaseManifest:
            context.log.info(reason)
            context.add_output_metadata({"published": False, "reason": reason})
            return HubReleaseManifest(
                model_uri=uri,
                published=False,
                reason=reason,
                repo_id=settings.repo_id,
                url=url,
                commit=commit,
                kind=kind,
            )

        if registered_model.alias != CHAMPION:
            alias = registered_model.alias
            return skipped(f"v{registered_model.version} is {alias}; only champions are published")
        store = registry.registry()
        try:
            tags = store.resolve(uri).tags
            if tags.get(HUB_REPO_TAG) == settings.repo_id and tags.get(HUB_KIND_TAG) == kind:
                commit = tags.get(HUB_COMMIT_TAG)
                reason = f"{uri} is already on the Hub as {settings.repo_id} (commit {commit})"
                return skipped(reason, tags.get(HUB_URL_TAG), commit)
            plan = plan_export(store, uri, merged=settings.merged, base_model_id=settings.base_model_id)
            target = connect(settings.repo_id)
            result = push(store, plan, target, private=settings.private, log=context.log.info)
        except (PublishError, RegistryError) as err:
            raise dg.Failure(description=str(err), allow_retries=False) from None
        reason = f"{uri} is the champion"
        context.add_output_metadata(
            {
                "published": True,
                "repo": result.repo_id,
                "hub_url": dg.MetadataValue.url(result.url),
                "commit": result.commit,
                "commit_url": dg.MetadataValue.url(result.commit_url),
                "kind": result.kind,
            }
        )
        return HubReleaseManifest(
            model_uri=uri,
            published=True,
            reason=reason,
            repo_id=result.repo_id,
            url=result.url,
            commit=result.commit,
            kind=kind,
        )

    return hub_release
