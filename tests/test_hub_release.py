"""The optional ``<workflow>/hub_release`` asset: absent by default, configured from the environment,
publishing the champion to a stand-in Hub (``tests/hub_standin.py``) behind ``registered_model``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from hub_standin import StandInHub
from test_supervised_workflow import tiny_run_config

from kitchen.manifests import HubReleaseManifest, RegisteredModelManifest
from kitchen.registry import ModelRegistry, default_tracking_uri
from kitchen.workflows import get_workflow
from kitchen_assets.definitions import build_definitions, service_resources
from kitchen_assets.hub_release import hub_release_settings
from kitchen_assets.io import ManifestIOManager, manifest_path, read_manifest
from kitchen_assets.workflows import workflow_assets
from resources.mlflow_registry import MlflowRegistry
from resources.training import LocalBackend

TOKEN = "hf_releaseCANARY0123456789abcdef"
RELEASE = dg.AssetKey(["supervised", "hub_release"])
_VARIABLES = ("REPO", "MERGED", "PRIVATE", "BASE_MODEL_ID")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for setting in _VARIABLES:
        monkeypatch.delenv(f"KITCHEN_HUB_RELEASE_{setting}", raising=False)
        monkeypatch.delenv(f"KITCHEN_SUPERVISED_HUB_RELEASE_{setting}", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))  # no saved token


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInHub]:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with StandInHub(TOKEN) as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.url)
        yield standin


def _keys(defs: dg.Definitions) -> set[dg.AssetKey]:
    return {
        key for asset in defs.assets or [] if isinstance(asset, dg.AssetsDefinition) for key in asset.keys
    }


def test_off_by_default() -> None:
    supervised = get_workflow("supervised")
    assert hub_release_settings(supervised) is None
    assert RELEASE not in _keys(build_definitions("local"))


def test_bad_settings_stop_the_code_location_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    supervised = get_workflow("supervised")
    monkeypatch.setenv("KITCHEN_SUPERVISED_HUB_RELEASE_REPO", "kitchen-org/sft")
    with pytest.raises(
        ValueError, match=r"KITCHEN_SUPERVISED_HUB_RELEASE_REPO='kitchen-org/sft' turns on .* HF_TOKEN"
    ):
        build_definitions("local")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("KITCHEN_SUPERVISED_HUB_RELEASE_REPO", "kitchen-org/bad--name")
    with pytest.raises(ValueError, match="KITCHEN_SUPERVISED_HUB_RELEASE_REPO='kitchen-org/bad--name'"):
        hub_release_settings(supervised)
    monkeypatch.setenv("KITCHEN_SUPERVISED_HUB_RELEASE_REPO", "kitchen-org/sft")
    monkeypatch.setenv("KITCHEN_HUB_RELEASE_MERGED", "maybe")
    with pytest.raises(ValueError, match="KITCHEN_HUB_RELEASE_MERGED='maybe': expected 1 or 0"):
        hub_release_settings(supervised)
    monkeypatch.setenv("KITCHEN_HUB_RELEASE_MERGED", "1")
    settings = hub_release_settings(supervised)
    assert settings is not None and (settings.repo_id, settings.merged, settings.private) == (
        "kitchen-org/sft",
        True,
        True,
    )


def test_champion_is_published_once_and_challengers_are_not(
    hub: StandInHub, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    monkeypatch.setenv("KITCHEN_HUB_RELEASE_REPO", "kitchen-org/{workflow}-champion")
    monkeypatch.setenv("KITCHEN_HUB_RELEASE_MERGED", "1")
    defs = build_definitions("local")
    assert RELEASE in _keys(defs)
    evaluation = defs.resolve_job_def("supervised_evaluation_job")
    assert "supervised__hub_release" in evaluation.graph.node_dict  # a new champion from re-evaluation too

    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("supervised_job").execute_in_process(
            run_config=tiny_run_config(tiny_model_dir), instance=instance
        )
        assert result.success
        release = read_manifest(RELEASE)
        assert isinstance(release, HubReleaseManifest) and release.published and release.kind == "merged"
        repo = hub.state.repos["kitchen-org/supervised-champion"]
        assert repo.private and repo.commits == [release.commit]
        assert {"model.safetensors", "config.json", "README.md"} <= set(repo.files)
        tags = ModelRegistry(default_tracking_uri()).version("supervised-tiny-kitchen-arithmetic", "1").tags
        assert tags["kitchen.hub.commit"] == release.commit and tags["kitchen.hub.kind"] == "merged"
        meta = next(
            e.materialization.metadata
            for e in result.get_asset_materialization_events()
            if e.asset_key == RELEASE
        )
        assert meta["commit"].value == release.commit and meta["published"].value is True

        def materialise_release() -> HubReleaseManifest:
            again = dg.materialize(
                workflow_assets(get_workflow("supervised")),
                selection=[RELEASE],
                resources={
                    "training": LocalBackend(),
                    "registry": MlflowRegistry(),
                    "io_manager": ManifestIOManager(),
                    **service_resources(),
                },
                instance=instance,
            )
            assert again.success
            manifest = read_manifest(RELEASE)
            assert isinstance(manifest, HubReleaseManifest)
            return manifest

        # The same version again: already there, not pushed twice.
        second = materialise_release()
        assert not second.published and "already on the Hub" in second.reason
        assert len(repo.commits) == 1

        # A registration that made a challenger: nothing is published.
        registered_path = manifest_path(dg.AssetKey(["supervised", "registered_model"]))
        payload = json.loads(registered_path.read_text())
        registered = RegisteredModelManifest.model_validate(payload["data"])
        payload["data"] = registered.model_copy(update={"alias": "challenger"}).model_dump(mode="json")
        registered_path.write_text(json.dumps(payload))
        third = materialise_release()
        assert not third.published and "is challenger; only champions are published" in third.reason
        assert len(repo.commits) == 1
        logged = " ".join(
            str(event) for run in instance.get_runs() for event in instance.all_logs(run.run_id)
        )
        assert TOKEN not in logged
