"""A registered model as the starting point of another run (``--model models:/NAME@champion``)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
from dagster._core.instance.ref import InstanceRef
from test_supervised_workflow import tiny_run_config

from kitchen.cli import main
from kitchen.manifests import BaseModelManifest, EvalManifest, RegisteredModelManifest
from kitchen.registry import ModelRegistry, default_tracking_uri
from kitchen_assets.definitions import build_definitions
from kitchen_assets.io import read_manifest

FIRST = "supervised-tiny-kitchen-arithmetic"


def _run(config: dict[str, object]) -> dg.ExecuteInProcessResult:
    job = build_definitions("local").resolve_job_def("supervised_job")
    with dg.DagsterInstance.ephemeral() as instance:
        return job.execute_in_process(run_config=config, instance=instance, raise_on_error=False)


def test_training_continues_from_a_registered_version(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _run(tiny_run_config(tiny_model_dir))
    assert first.success
    first_report = read_manifest(dg.AssetKey(["supervised", "eval_report"]))
    assert isinstance(first_report, EvalManifest)

    ref = f"models:/{FIRST}@champion"
    chained = {"model": ref, "registered_model_name": "chained", "seed": 1, "gate_margin": 0.001}
    second = _run(tiny_run_config(tiny_model_dir, **chained))
    assert second.success
    base = read_manifest(dg.AssetKey(["supervised", "base_model"]))
    assert isinstance(base, BaseModelManifest)
    assert base.source == "registry" and base.registered_version == f"models:/{FIRST}/1"
    assert base.init_state is not None and base.lora_rank == 4 and base.sampler_path is not None
    # The "base" column of the new evaluation is the registered adapter: the same held-out numbers the
    # first run reported for the model it trained.
    report = read_manifest(dg.AssetKey(["supervised", "eval_report"]))
    assert isinstance(report, EvalManifest)
    for metric in ("nll", "exact_match", "f1"):
        assert report.base[metric] == pytest.approx(first_report.trained[metric], abs=1e-6)
    registered = read_manifest(dg.AssetKey(["supervised", "registered_model"]))
    assert isinstance(registered, RegisteredModelManifest) and registered.name == "chained"
    tags = ModelRegistry(default_tracking_uri()).version("chained", registered.version).tags
    assert tags["kitchen.base_model.registered_version"] == f"models:/{FIRST}/1"
    assert tags["kitchen.base_model.source"] == "registry"

    # A missing alias fails at launch, naming what exists, before any asset runs.
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    assert main(["run", "supervised", "--model", f"models:/{FIRST}@prod", "--max-steps", "1"]) == 1
    err = capsys.readouterr().err
    assert f"--model models:/{FIRST}@prod" in err and "no alias 'prod' (aliases: champion -> v1)" in err
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(tmp_path / "dagster"))) as instance:
        assert instance.get_runs() == []  # no run was started
