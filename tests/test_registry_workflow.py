"""The registered_model asset in the supervised job on the embedded store, and ``kitchen models``."""

from __future__ import annotations

import socket
from pathlib import Path

import dagster as dg
import pytest
from test_supervised_workflow import tiny_run_config

from kitchen.cli import main
from kitchen.manifests import RegisteredModelManifest, WeightsManifest
from kitchen.registry import ModelRegistry, default_tracking_uri, load_sampling_client
from kitchen.workflows import get_workflow
from kitchen_assets.definitions import build_definitions, service_resources
from kitchen_assets.io import ManifestIOManager, read_manifest
from kitchen_assets.registry import upstream_kinds
from kitchen_assets.workflows import workflow_assets
from resources.mlflow_registry import MlflowRegistry
from resources.training import LocalBackend

NAME = "supervised-tiny-kitchen-arithmetic"  # derived: workflow, base model (the dir "tiny"), dataset


def test_job_registers_a_champion_that_cli_shows_and_that_loads_back(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        job = build_definitions("local").resolve_job_def("supervised_job")
        result = job.execute_in_process(run_config=tiny_run_config(tiny_model_dir), instance=instance)
        assert result.success
        registered = read_manifest(dg.AssetKey(["supervised", "registered_model"]))
        assert isinstance(registered, RegisteredModelManifest)
        assert (registered.name, registered.version, registered.created) == (NAME, "1", True)
        assert registered.alias == "champion" and registered.gate_passed

        registry = ModelRegistry(default_tracking_uri())
        tags = registry.version(NAME, "1").tags
        for asset in upstream_kinds(get_workflow("supervised")):
            assert tags[f"kitchen.upstream.supervised/{asset}"] == result.run_id
        weights = read_manifest(dg.AssetKey(["supervised", "trained_weights"]))
        assert isinstance(weights, WeightsManifest)
        assert tags["kitchen.weights.sampler_path"] == weights.sampler_path
        assert tags["kitchen.eval.primary_metric"] == "nll" and tags["dagster.run_id"] == result.run_id
        run = registry.client.get_run(str(registered.run_id))
        assert len(registry.client.get_metric_history(run.info.run_id, "train/loss")) == 4
        eval_files = {a.path for a in registry.client.list_artifacts(run.info.run_id, "eval")}
        assert {"eval/report.json", "eval/report.png"} <= eval_files

        meta = next(
            e.materialization.metadata
            for e in result.get_asset_materialization_events()
            if e.asset_key == dg.AssetKey(["supervised", "registered_model"])
        )
        assert meta["mlflow_run_id"].value == registered.run_id and meta["version"].value == 1
        assert "**champion**" in meta["decision"].value

        # Registering the same weights again (the asset alone, inputs from the stored manifests).
        again = dg.materialize(
            workflow_assets(get_workflow("supervised")),
            selection=[dg.AssetKey(["supervised", "registered_model"])],
            resources={
                "training": LocalBackend(),
                "registry": MlflowRegistry(),
                "io_manager": ManifestIOManager(),
                **service_resources(),
            },
            instance=instance,
        )
        assert again.success
        second = read_manifest(dg.AssetKey(["supervised", "registered_model"]))
        assert isinstance(second, RegisteredModelManifest)
        assert (second.version, second.created, second.alias) == ("1", False, "champion")
        assert len(registry.versions(NAME)) == 1

    assert main(["models", "list"]) == 0
    assert NAME in capsys.readouterr().out
    assert main(["models", "show", f"{NAME}@champion"]) == 0
    shown = capsys.readouterr().out
    assert f"{NAME} v1  [champion]" in shown and "supervised/eval_report" in shown and "nll" in shown

    from resources.local_engine import LocalServiceClient

    service = LocalServiceClient()
    prompt = [1, 2, 3, 4, 5]
    from tinker import types

    loaded = load_sampling_client(service, registry, f"models:/{NAME}@champion")
    original = service.create_sampling_client(model_path=weights.sampler_path).result()
    assert loaded.compute_logprobs(types.ModelInput.from_ints(prompt)).result() == (
        original.compute_logprobs(types.ModelInput.from_ints(prompt)).result()
    )


def test_name_mlflow_rejects_fails_at_launch_naming_the_rule(
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kitchen_home: Path,
) -> None:
    job = build_definitions("local").resolve_job_def("supervised_job")
    config = tiny_run_config(tiny_model_dir, registered_model_name="team/sft")
    with (
        dg.DagsterInstance.ephemeral() as instance,
        pytest.raises(dg.DagsterConfigMappingFunctionError) as raised,
    ):
        job.execute_in_process(run_config=config, instance=instance)
    assert "registered model name 'team/sft' is invalid: MLflow names cannot contain '/' or ':'" in str(
        raised.value.user_exception
    )
    assert not (kitchen_home / "manifests").exists()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    assert main(["run", "supervised", "--registered-model-name", "sft@v2"]) == 2
    assert "--registered-model-name: Value error, registered model name 'sft@v2' is invalid" in (
        capsys.readouterr().err
    )


def test_unreachable_tracking_server_fails_before_training(
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    kitchen_home: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    job = build_definitions("local").resolve_job_def("supervised_job")
    with dg.DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(
            run_config=tiny_run_config(tiny_model_dir), instance=instance, raise_on_error=False
        )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert failure.step_key == "supervised__base_model"
    assert "is unreachable" in str(failure.step_failure_data)
    assert not (kitchen_home / "runs").exists()  # nothing trained

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    assert main(["run", "supervised", "--model", str(tiny_model_dir)]) == 1
    assert f"MLflow tracking server http://127.0.0.1:{port} is unreachable" in capsys.readouterr().err
    with dg.DagsterInstance.get() as instance:  # the CLI's instance (DAGSTER_HOME above)
        assert instance.get_runs() == []  # refused before a run was launched
