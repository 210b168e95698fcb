"""The eval_report asset and its blocking quality gate, inside the supervised job on the tiny model.

A stand-in ``registration`` asset downstream of ``eval_report`` shows what the gate blocks: it must not
run when the gate fails and must run when the gate passes, in the same run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
from test_supervised_workflow import tiny_run_config

from jobs.workflow_jobs import run_config_mapping
from kitchen.manifests import EvalManifest
from kitchen.workflows import get_workflow
from kitchen_assets.definitions import build_definitions
from kitchen_assets.io import read_manifest

WORKFLOW = "supervised"

REPORT = dg.AssetKey([WORKFLOW, "eval_report"])
REGISTRATION = dg.AssetKey([WORKFLOW, "registration_stand_in"])


@dg.asset(key=REGISTRATION, deps=[REPORT], group_name=WORKFLOW)
def registration_stand_in() -> None:
    """Downstream of the report, like the real registration asset."""


def run_gated_job(run_config: dict[str, Any]) -> dg.ExecuteInProcessResult:
    base = build_definitions("local")
    job = dg.define_asset_job(
        "gated",
        selection=dg.AssetSelection.groups(WORKFLOW),
        config=run_config_mapping(get_workflow(WORKFLOW)),
    )
    defs = dg.Definitions(
        assets=[*base.assets, registration_stand_in],  # type: ignore[misc]
        jobs=[job],
        resources=base.resources,
        executor=dg.in_process_executor,
    )
    with dg.DagsterInstance.ephemeral() as instance:
        return defs.resolve_job_def("gated").execute_in_process(
            run_config=run_config, instance=instance, raise_on_error=False
        )


def materialized(result: dg.ExecuteInProcessResult) -> set[dg.AssetKey]:
    return {e.asset_key for e in result.get_asset_materialization_events() if e.asset_key is not None}


def test_failing_gate_blocks_registration_and_says_why(tiny_model_dir: Path) -> None:
    # A random tiny model gets no arithmetic right before or after 4 steps: no exact-match improvement.
    result = run_gated_job(tiny_run_config(tiny_model_dir, gate_metric="exact_match", gate_margin=0.0))

    assert not result.success
    upstream = ("base_model", "dataset", "datums", "checkpoints", "trained_weights", "eval_report")
    # Nothing downstream of the report ran: neither the stand-in nor the real registered_model asset.
    assert materialized(result) == {dg.AssetKey([WORKFLOW, name]) for name in upstream}
    (gate,) = result.get_asset_check_evaluations()
    assert gate.asset_key == REPORT and gate.check_name == "quality_gate" and not gate.passed
    assert gate.description is not None and "trained exact_match 0 vs base 0" in gate.description
    assert gate.metadata["margin"].value == 0.0 and gate.metadata["improvement"].value == 0.0
    report = read_manifest(REPORT)
    assert isinstance(report, EvalManifest) and report.gate_passed is False

    saved = json.loads(Path(report.report_path).read_text())
    assert saved["gate"]["passed"] is False and saved["gate"]["settings"]["metric"] == "exact_match"
    assert saved["tasks"] == ["kitchen_heldout_nll", "kitchen_arithmetic"]
    for label in ("base", "trained"):
        lm_eval = json.loads(Path(saved["outputs"][f"lm_eval_{label}"]).read_text())
        assert set(lm_eval["kitchen"]["results"]) == {"kitchen_heldout_nll", "kitchen_arithmetic"}
        assert len(lm_eval["kitchen"]["samples"]["kitchen_arithmetic"]) == 6

    metadata = next(
        e.materialization.metadata for e in result.get_asset_materialization_events() if e.asset_key == REPORT
    )
    assert "| metric | base | trained | delta |" in metadata["comparison"].value
    assert "| question | reference | base | trained |" in metadata["samples"].value
    assert metadata["plot"].value.startswith("![training loss and metric deltas](data:image/png;base64,")
    assert metadata["gate"].value.startswith("**FAILED**")
    assert metadata["eval_seconds"].value > 0 and metadata["examples"].value == 6


def test_passing_gate_lets_registration_run(tiny_model_dir: Path) -> None:
    result = run_gated_job(tiny_run_config(tiny_model_dir, gate_metric="nll", gate_margin=0.01))

    assert result.success
    assert {REPORT, REGISTRATION} <= materialized(result)
    (gate,) = result.get_asset_check_evaluations()
    assert gate.passed and gate.metadata["improvement"].value >= 0.01
