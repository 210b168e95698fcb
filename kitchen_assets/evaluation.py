"""The eval report of every workflow: the starting model and the trained one, scored by the workflow's own
evaluation in the same run, with the quality gate's verdict (enforced by the blocking check in
``kitchen_assets.checks``).

Both models are reached through the training backend's sampling clients, so a locally trained and a
Tinker-trained model are evaluated by identical code.
"""

from __future__ import annotations

import json
import time
from typing import Any

import dagster as dg

from kitchen.eval.gate import GateSettings, gate_verdict
from kitchen.eval.judge import judge_summary
from kitchen.eval.report import comparison_rows, read_losses, report_plot
from kitchen.home import home_dir
from kitchen.manifests import (
    BaseModelManifest,
    CheckpointsManifest,
    DatasetManifest,
    EvalManifest,
    Manifest,
    WeightsManifest,
)
from kitchen.workflows import EvalContext, Workflow
from kitchen_assets.factory import WORKFLOW, Placement, workflow_asset
from kitchen_assets.metadata import image_markdown, markdown_table
from kitchen_assets.telemetry import emit_eval_complete
from resources.llm import LLMResource
from resources.training import TrainingBackend

SAMPLES_SHOWN = 5
STANDARD_EVAL_INPUTS = ("base_model", "dataset", "checkpoints", "trained_weights")


def gate_settings(config: Any) -> GateSettings:
    """The gate's settings from an ``eval_report`` section (a workflow's section may add the gap rule)."""
    return GateSettings(
        config.gate_metric,
        config.gate_margin,
        config.gate_max_nll_increase,
        getattr(config, "gate_min_gap_closed", None),
    )


def eval_report_asset(workflow: Workflow, placement: Placement = WORKFLOW) -> dg.AssetsDefinition:
    @workflow_asset(
        workflow,
        "eval_report",
        placement=placement,
        ins=(*STANDARD_EVAL_INPUTS, *workflow.eval_inputs),
        kinds={"json"},
        description="The starting and the trained model scored on held-out data by this workflow's "
        "evaluation; records the quality gate's verdict.",
    )
    def eval_report(
        context: dg.AssetExecutionContext,
        config: Any,
        training: TrainingBackend,
        llm: LLMResource,
        base_model: BaseModelManifest,
        dataset: DatasetManifest,
        checkpoints: CheckpointsManifest,
        trained_weights: WeightsManifest,
        **inputs: Manifest,
    ) -> EvalManifest:
        started = time.perf_counter()
        out_dir = home_dir("reports", placement.group(workflow), context.run_id)
        service = training.service_client()
        try:
            evaluation = workflow.evaluate(
                EvalContext(
                    config=config,
                    base_model=base_model,
                    dataset=dataset,
                    checkpoints=checkpoints,
                    weights=trained_weights,
                    inputs=inputs,
                    service=service,
                    out_dir=out_dir,
                    log=context.log.info,
                    judge=lambda: llm.client(training),
                )
            )
        finally:
            service.close()
        for label, metrics in (("base", evaluation.base), ("trained", evaluation.trained)):
            emit_eval_complete(label, metrics, tasks=evaluation.tasks, examples=evaluation.num_examples)
        settings = gate_settings(config)
        verdict = gate_verdict(
            evaluation.base,
            evaluation.trained,
            evaluation.higher_is_better,
            settings,
            reference=evaluation.reference,
        )
        context.log.info(f"quality gate {'passed' if verdict.passed else 'FAILED'}: {verdict.reason}")

        rows = comparison_rows(evaluation.base, evaluation.trained)
        if evaluation.reference is not None:
            for row in rows:
                row[evaluation.reference_label] = evaluation.reference.get(row["metric"], float("nan"))
        directions = evaluation.higher_is_better
        plot = report_plot(out_dir / "report.png", read_losses(checkpoints.metrics_path), rows, directions)
        seconds = time.perf_counter() - started
        report: dict[str, Any] = {
            "workflow": workflow.name,
            "run_id": context.run_id,
            "base_model": base_model.name,
            "trained_weights": trained_weights.sampler_path,
            "tasks": evaluation.tasks,
            "num_examples": evaluation.num_examples,
            "base": evaluation.base,
            "trained": evaluation.trained,
            "reference": evaluation.reference,
            "reference_label": evaluation.reference_label,
            "higher_is_better": directions,
            "gate": {"settings": vars(settings), **verdict.as_dict()},
            "generations": evaluation.samples,
            "seconds": {**evaluation.seconds, "total": seconds},
            "outputs": evaluation.files,
            **evaluation.details,
        }
        report_path = out_dir / "report.json"
        report_path.write_text(json.dumps(report, indent=2))

        judge = evaluation.details.get("judge")
        lower = [r["metric"] for r in rows if not directions.get(r["metric"], True)]
        metric = settings.metric
        context.add_output_metadata(
            {
                "comparison": dg.MetadataValue.md(
                    markdown_table(rows) + (f"\n\nLower is better for: {', '.join(lower)}." if lower else "")
                ),
                "gate": dg.MetadataValue.md(
                    f"**{'passed' if verdict.passed else 'FAILED'}**: {verdict.reason}"
                ),
                "samples": dg.MetadataValue.md(markdown_table(evaluation.samples[:SAMPLES_SHOWN])),
                "plot": image_markdown(plot, "training loss and metric deltas"),
                "primary_metric": metric,
                f"base_{metric}": evaluation.base.get(metric, float("nan")),
                f"trained_{metric}": evaluation.trained.get(metric, float("nan")),
                "tasks": dg.MetadataValue.json(evaluation.tasks),
                "examples": evaluation.num_examples,
                "eval_seconds": seconds,
                **{f"{label}_eval_seconds": s for label, s in evaluation.seconds.items()},
                "report": dg.MetadataValue.path(str(report_path)),
                **(
                    {
                        "judge": dg.MetadataValue.md(judge_summary(judge["model"], judge["metrics"])),
                        "judge_model": judge["model"],
                        "judge_metrics": dg.MetadataValue.json(judge["metrics"]),
                        "judge_verdicts": dg.MetadataValue.path(evaluation.files["judge"]),
                    }
                    if judge
                    else {}
                ),
            }
        )
        return EvalManifest(
            report_path=str(report_path),
            primary_metric=metric,
            base=evaluation.base,
            trained=evaluation.trained,
            num_examples=evaluation.num_examples,
            seconds=seconds,
            gate_passed=verdict.passed,
            judge_model=judge["model"] if judge else None,
        )

    return eval_report
