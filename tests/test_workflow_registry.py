"""Adding a workflow touches no shared file: a module registered through ``KITCHEN_WORKFLOW_MODULES``
appears in the asset groups the UI shows, in ``kitchen run --help``, passes ``dagster definitions
validate``, and runs end to end."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kitchen.workflows import Workflow, get_workflow, workflows
from kitchen.workflows.config import DatasetSection, RunConfig
from kitchen.workflows.supervised import SupervisedConfig

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "KITCHEN_WORKFLOW_MODULES": "tests.plugins.toy_workflow",
        "KITCHEN_HOME": str(tmp_path / "home"),
        "DAGSTER_HOME": str(tmp_path / "dagster"),
        "PYTHONPATH": str(REPO),
    }


def _run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_a_registered_workflow_appears_everywhere_and_runs(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = _env(tmp_path)
    (tmp_path / "dagster").mkdir()
    listing = _run([str(BIN / "kitchen"), "run", "--help"], env)
    assert "toy" in listing.stdout and "A throwaway workflow" in listing.stdout
    flags = _run([str(BIN / "kitchen"), "run", "toy", "--help"], env)
    assert "--learning-rate" in flags.stdout and "--max-length" not in flags.stdout

    _run([str(BIN / "dagster"), "definitions", "validate", "-m", "kitchen_assets.definitions"], env)

    script = f"""
import dagster as dg
from kitchen.workflows import get_workflow
from kitchen_assets.definitions import build_definitions
defs = build_definitions("local")
graph = defs.resolve_asset_graph()
print("GROUP", sorted(k.to_user_string() for k in graph.asset_keys_for_group("toy")))
print("SWEEP", sorted(k.to_user_string() for k in graph.asset_keys_for_group("toy_sweep")))
print("JOBS", sorted(j.name for j in defs.jobs if j.name.startswith("toy")))
toy = get_workflow("toy")
job = defs.resolve_job_def("toy_job")
with dg.DagsterInstance.ephemeral() as instance:
    result = job.execute_in_process(run_config=toy.smoke_config({str(tiny_model_dir)!r}), instance=instance)
print("SUCCESS", result.success)
"""
    out = _run([sys.executable, "-c", script], env).stdout
    assert (
        "GROUP ['toy/base_model', 'toy/checkpoints', 'toy/dataset', 'toy/eval_report', "
        "'toy/registered_model', 'toy/trained_weights']" in out
    )
    assert (
        "SWEEP ['toy_sweep/checkpoints', 'toy_sweep/eval_report', 'toy_sweep/registered_model', "
        "'toy_sweep/sweep_report', 'toy_sweep/trained_weights']" in out
    )
    assert "JOBS ['toy_evaluation_job', 'toy_job', 'toy_sweep_job', 'toy_sweep_report_job']" in out
    assert "SUCCESS True" in out


def test_the_registry_refuses_a_workflow_whose_config_does_not_match_its_sections() -> None:
    supervised = get_workflow("supervised")

    class Partial(RunConfig, DatasetSection):
        pass

    with pytest.raises(ValueError, match="must combine exactly its sections' fields; missing"):
        Workflow(**{**vars(supervised), "name": "broken", "config": Partial})
    with pytest.raises(ValueError, match="no config section for"):
        Workflow(**{**vars(supervised), "name": "broken", "sections": {"dataset": DatasetSection}})
    with pytest.raises(KeyError, match=r"unknown workflow 'nope'; known: (\w+, )*supervised\b"):
        get_workflow("nope")
    assert next(w.name for w in workflows()) == "supervised"
    assert supervised.config is SupervisedConfig


def test_the_library_does_not_import_the_dagster_layer() -> None:
    """Arrows point one way: kitchen_assets/jobs -> kitchen -> ports; resources -> ports. Only the CLI
    (the shell over a code location) may import dagster, and it loads the code location by name."""
    forbidden = ("kitchen_assets", "jobs", "resources")
    offenders = []
    for path in sorted((REPO / "kitchen").rglob("*.py")):
        in_cli = "cli" in path.relative_to(REPO / "kitchen").parts
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in forbidden:
                    offenders.append(f"{path.relative_to(REPO)}: {name}")
                if top == "dagster" and not in_cli:
                    offenders.append(f"{path.relative_to(REPO)}: {name}")
    assert offenders == []
