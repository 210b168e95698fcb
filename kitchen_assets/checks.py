"""The blocking quality gate on each workflow's ``eval_report``: registration must be earned.

A failing blocking check stops every asset downstream of ``eval_report`` (registration) in the same run,
and the check's description and metadata in the UI say which rule failed and by how much. Asset jobs and
``--select`` include the check; ``dg.materialize([...])`` runs it only when it is passed too.
"""

import json
from pathlib import Path

import dagster as dg

from kitchen.eval.gate import GateSettings, verdict_from_report
from kitchen.manifests import EvalManifest
from kitchen.workflows import Workflow
from kitchen_assets.factory import WORKFLOW, Placement
from kitchen_assets.metadata import markdown_table


def eval_gate_check(workflow: Workflow, placement: Placement = WORKFLOW) -> dg.AssetChecksDefinition:
    """Blocking for the workflow's own run; in a sweep (a partitioned placement) a configuration that fails
    its gate is a result to compare, not a failed partition, so the check only reports."""

    @dg.asset_check(
        asset=placement.key(workflow, "eval_report"),
        name="quality_gate",
        blocking=placement.partitions is None,
        description="The trained model beats the base on the primary metric by the configured margin and "
        "does not regress held-out NLL; when it fails, nothing downstream (registration) runs in this run.",
    )
    def quality_gate(eval_report: EvalManifest) -> dg.AssetCheckResult:
        report = json.loads(Path(eval_report.report_path).read_text())
        settings = GateSettings(**report["gate"]["settings"])
        verdict = verdict_from_report(eval_report.base, eval_report.trained, eval_report.report_path)
        rows = [
            {"": name, "base": base, "trained": trained}
            for name, base, trained in (
                (settings.metric, verdict.base, verdict.trained),
                ("nll", verdict.base_nll, verdict.trained_nll),
            )
            if base is not None and trained is not None
        ]
        return dg.AssetCheckResult(
            passed=verdict.passed,
            severity=dg.AssetCheckSeverity.ERROR,
            description=verdict.reason,
            metadata={
                "verdict": dg.MetadataValue.md(
                    f"**{'passed' if verdict.passed else 'FAILED'}**: {verdict.reason}"
                ),
                "numbers": dg.MetadataValue.md(markdown_table(rows)),
                "primary_metric": settings.metric,
                "margin": settings.margin,
                "improvement": verdict.improvement if verdict.improvement is not None else float("nan"),
                "max_nll_increase": settings.max_nll_increase,
                "report": dg.MetadataValue.path(eval_report.report_path),
            },
        )

    return quality_gate
