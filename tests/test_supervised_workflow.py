"""The whole supervised group, materialised in-process and through the CLIs, on a tiny model."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from kitchen.manifests import CheckpointsManifest, DatumsManifest, EvalManifest, WeightsManifest
from kitchen.workflows import get_workflow, split_run_config
from kitchen.workflows.supervised import SupervisedConfig, smoke_run_config
from kitchen_assets.definitions import build_definitions
from kitchen_assets.factory import op_configs
from kitchen_assets.io import read_manifest

REPO = Path(__file__).resolve().parents[1]


def _instance_at(home: Path) -> dg.DagsterInstance:
    from dagster._core.instance.ref import InstanceRef

    return dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))


def tiny_run_config(model_dir: Path, **overrides: Any) -> dict[str, Any]:
    return {**smoke_run_config(str(model_dir)), **overrides}


def _run_job(run_config: dict[str, Any]) -> dg.ExecuteInProcessResult:
    job = build_definitions("local").resolve_job_def("supervised_job")
    with dg.DagsterInstance.ephemeral() as instance:
        return job.execute_in_process(run_config=run_config, instance=instance, raise_on_error=False)


def test_supervised_job_materialises_every_asset(tiny_model_dir: Path) -> None:
    result = _run_job(tiny_run_config(tiny_model_dir))
    assert result.success
    materialised = {
        tuple(e.asset_key.path) for e in result.get_asset_materialization_events() if e.asset_key is not None
    }
    assert materialised == {
        ("supervised", name)
        for name in (
            "base_model",
            "dataset",
            "datums",
            "checkpoints",
            "trained_weights",
            "eval_report",
            "registered_model",
        )
    }

    datums = read_manifest(dg.AssetKey(["supervised", "datums"]))
    assert isinstance(datums, DatumsManifest)
    assert datums.num_datums > 0 and 0 < datums.trained_tokens < datums.num_tokens
    assert Path(datums.train_path).is_file()

    checkpoints = read_manifest(dg.AssetKey(["supervised", "checkpoints"]))
    assert isinstance(checkpoints, CheckpointsManifest)
    assert checkpoints.steps == 4
    # save_every=2 over 4 steps: a mid-run state at step 2, then final state and sampler weights.
    assert [(c.step, c.kind) for c in checkpoints.checkpoints] == [(2, "state"), (4, "state"), (4, "sampler")]
    metrics = [json.loads(line) for line in Path(checkpoints.metrics_path).read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["tokens_per_second"] > 0 for m in metrics)

    weights = read_manifest(dg.AssetKey(["supervised", "trained_weights"]))
    assert isinstance(weights, WeightsManifest)
    assert weights.sampler_path.startswith("file://")
    adapter = Path(weights.sampler_path.removeprefix("file://"))  # no characters to escape under tmp_path
    files = {
        name: hashlib.sha256((adapter / name).read_bytes()).hexdigest()
        for name in ("adapter_config.json", "adapter_model.safetensors")
    }
    expected = hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert weights.content_hash == expected  # the adapter's bytes, nothing else in the directory

    report = read_manifest(dg.AssetKey(["supervised", "eval_report"]))
    assert isinstance(report, EvalManifest)
    for metrics_by_model in (report.base, report.trained):
        assert {"nll", "perplexity", "exact_match", "f1"} <= metrics_by_model.keys()
    assert report.base["nll"] != report.trained["nll"]
    saved = json.loads(Path(report.report_path).read_text())
    assert saved["base"] == report.base and saved["trained"] == report.trained

    eval_meta = next(
        e.materialization.metadata
        for e in result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey(["supervised", "eval_report"])
    )
    assert "| metric | base | trained | delta |" in eval_meta["comparison"].value
    (gate,) = result.get_asset_check_evaluations()
    assert gate.check_name == "quality_gate" and gate.passed
    assert report.gate_passed is True and report.primary_metric == "nll"


def test_out_of_range_config_fails_at_launch_before_any_asset(tiny_model_dir: Path) -> None:
    job = build_definitions("local").resolve_job_def("supervised_job")
    with dg.DagsterInstance.ephemeral() as instance, pytest.raises(dg.DagsterConfigMappingFunctionError):
        job.execute_in_process(run_config=tiny_run_config(tiny_model_dir, epochs=0), instance=instance)
    assert not (Path(os.environ["KITCHEN_HOME"]) / "manifests").exists()


def test_unknown_dataset_fails_naming_it(tiny_model_dir: Path) -> None:
    result = _run_job(tiny_run_config(tiny_model_dir, dataset="no/such-dataset-anywhere"))
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert failure.step_failure_data is not None
    assert "no/such-dataset-anywhere" in str(failure.step_failure_data.error)


def test_cli_runs_supervised_and_prints_summary(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster")}
    args = [
        "--model",
        str(tiny_model_dir),
        "--max-rows",
        "32",
        "--batch-size",
        "8",
        "--max-steps",
        "2",
        "--learning-rate",
        "0.005",
        "--lora-rank",
        "4",
        "--max-length",
        "64",
        "--eval-examples",
        "4",
        "--eval-max-tokens",
        "4",
        "--gate-metric",
        "nll",
        "--gate-margin",
        "0.01",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "kitchen.cli", "run", "supervised", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "held-out evaluation" in proc.stdout
    assert "exact_match" in proc.stdout and "nll" in proc.stdout
    assert "quality gate: passed" in proc.stdout
    # A newcomer's view: stage lines and the progress bar, not Dagster's event log or library chatter.
    assert "✓ supervised/datums" in proc.stdout and "2/2" in proc.stdout
    assert "DagsterEvent" not in proc.stdout and "STEP_START" not in proc.stdout + proc.stderr
    assert proc.stderr.strip() == ""
    log = Path(proc.stdout.rsplit("log: ", 1)[1].split()[0])
    assert "step 2/2 loss" in log.read_text()  # the event log is kept in the run's log file
    # The run landed in the persistent instance the UI reads.
    with _instance_at(tmp_path / "dagster") as instance:
        runs = instance.get_runs()
        assert len(runs) == 1 and runs[0].job_name == "supervised_job"


def test_cli_rejects_out_of_range_flags_before_work(tmp_path: Path) -> None:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster")}
    proc = subprocess.run(
        [sys.executable, "-m", "kitchen.cli", "run", "supervised", "--epochs", "0", "--learning-rate", "-1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--epochs" in proc.stderr and "--learning-rate" in proc.stderr
    assert not (tmp_path / "dagster").exists()


def test_cli_help_documents_run() -> None:
    listing = subprocess.run(
        [sys.executable, "-m", "kitchen.cli", "run", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert listing.returncode == 0 and "supervised" in listing.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "kitchen.cli", "run", "supervised", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0
    for flag in (
        "--model",
        "--dataset",
        "--epochs",
        "--batch-size",
        "--learning-rate",
        "--lora-rank",
        "--max-length",
        "--max-steps",
        "--backend",
    ):
        assert flag in proc.stdout


def test_dagster_asset_materialize_cli_on_tiny_config(tiny_model_dir: Path, tmp_path: Path) -> None:
    flat = SupervisedConfig(**tiny_run_config(tiny_model_dir, max_steps=2, eval_examples=4))
    run_config = {"ops": split_run_config(flat, op_configs(get_workflow("supervised")))}
    config_path = tmp_path / "run_config.json"
    config_path.write_text(json.dumps(run_config))
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster")}
    (tmp_path / "dagster").mkdir()
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            "asset",
            "materialize",
            "-m",
            "kitchen_assets.definitions",
            "--select",
            "group:supervised",
            "--config",
            str(config_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with _instance_at(tmp_path / "dagster") as instance:
        for name in (
            "base_model",
            "dataset",
            "datums",
            "checkpoints",
            "trained_weights",
            "eval_report",
            "registered_model",
        ):
            assert instance.get_latest_materialization_event(dg.AssetKey(["supervised", name])) is not None
