"""The eval report: base and trained model scored by lm-eval on the same tasks in the same run.

Both models are reached through the training backend's sampling clients, so a locally trained and a
Tinker-trained model are evaluated by identical code. The report records the quality gate's verdict;
the blocking asset check in ``kitchen_assets.checks`` enforces it.
"""

import json
import time
from pathlib import Path
from typing import Any

import dagster as dg

from kitchen.data import load_saved_dataset
from kitchen.eval.gate import GateSettings, gate_verdict
from kitchen.eval.harness import (
    NLL_TASK,
    ModelResults,
    check_task_data,
    evaluate_model,
    plan_evaluation,
    write_task_data,
)
from kitchen.eval.lm import KitchenLM
from kitchen.eval.report import comparison_rows, metric_order, read_losses, report_plot
from kitchen.home import home_dir
from kitchen.manifests import (
    BaseModelManifest,
    CheckpointsManifest,
    DatasetManifest,
    EvalManifest,
    WeightsManifest,
)
from kitchen_assets.config import EvalConfig
from kitchen_assets.metadata import image_markdown, markdown_table
from kitchen_assets.telemetry import emit_eval_complete, instrumented
from resources.training import TrainingBackend

SAMPLES_SHOWN = 5


def _context_window(base_model: BaseModelManifest) -> int | None:
    """The base model's position limit when its config is local; None lets KitchenLM use the tokenizer's."""
    if not base_model.path:
        return None
    from transformers import AutoConfig

    value = getattr(AutoConfig.from_pretrained(base_model.path), "max_position_embeddings", None)
    return int(value) if value else None


def eval_report_asset(workflow: str) -> dg.AssetsDefinition:
    @dg.asset(
        name="eval_report",
        key_prefix=[workflow],
        group_name=workflow,
        kinds={"json"},
        ins={
            "base_model": dg.AssetIn(key=[workflow, "base_model"]),
            "dataset": dg.AssetIn(key=[workflow, "dataset"]),
            "checkpoints": dg.AssetIn(key=[workflow, "checkpoints"]),
            "trained_weights": dg.AssetIn(key=[workflow, "trained_weights"]),
        },
        description="lm-eval on the base and the trained model: held-out NLL/perplexity, exact match and "
        "token P/R/F1 of greedy generations, and any --eval-tasks; records the quality gate's verdict.",
    )
    @instrumented
    def eval_report(
        context: dg.AssetExecutionContext,
        config: EvalConfig,
        training: TrainingBackend,
        base_model: BaseModelManifest,
        dataset: DatasetManifest,
        checkpoints: CheckpointsManifest,
        trained_weights: WeightsManifest,
    ) -> EvalManifest:
        started = time.perf_counter()
        out_dir = home_dir("reports", workflow, context.run_id)
        plan = plan_evaluation(dataset.name if dataset.source == "builtin" else None, config.eval_tasks)
        if plan.lm_eval_tasks:
            check_task_data(plan.lm_eval_tasks)  # fail naming the task before any model is scored
        test_rows = load_saved_dataset(dataset.path)["test"]
        n = min(config.eval_examples, len(test_rows))
        if n == 0:
            raise ValueError(f"dataset {dataset.name!r} has an empty test split; nothing to evaluate on")
        heldout = test_rows.select(range(n))
        service = training.service_client()
        window = _context_window(base_model)
        files: dict[str, Path] = {}
        results: dict[str, ModelResults] = {}
        for label in ("base", "trained"):
            client = (
                service.create_sampling_client(base_model=base_model.backend_model).result()
                if label == "base"
                else service.create_sampling_client(model_path=trained_weights.sampler_path).result()
            )
            lm = KitchenLM(client, max_length=window, skip_greedy_for=[NLL_TASK], label=label)
            if not files:
                files = write_task_data(plan, list(heldout), lm, out_dir / "data", limit=n)
            results[label] = evaluate_model(
                lm,
                plan,
                files,
                limit=config.eval_examples,
                max_gen_tokens=config.eval_max_tokens,
                cache_dir=out_dir / "hf-datasets",
            )
            context.log.info(f"{label}: {results[label].metrics} ({results[label].seconds:.1f}s)")
            emit_eval_complete(label, results[label].metrics, tasks=plan.tasks, examples=n)
        base, trained = results["base"], results["trained"]
        directions = {**base.higher_is_better, **trained.higher_is_better}
        settings = GateSettings(config.gate_metric, config.gate_margin, config.gate_max_nll_increase)
        verdict = gate_verdict(base.metrics, trained.metrics, directions, settings)
        context.log.info(f"quality gate {'passed' if verdict.passed else 'FAILED'}: {verdict.reason}")

        rows = comparison_rows(base.metrics, trained.metrics)
        samples = [
            {
                "question": b["question"],
                "reference": b["reference"],
                "base": b["output"],
                "trained": t["output"],
            }
            for b, t in zip(base.generations, trained.generations, strict=True)
        ]
        for label, result in results.items():
            (out_dir / f"lm_eval_{label}.json").write_text(json.dumps(result.lm_eval, indent=1))
        plot = report_plot(out_dir / "report.png", read_losses(checkpoints.metrics_path), rows, directions)
        seconds = time.perf_counter() - started
        report: dict[str, Any] = {
            "workflow": workflow,
            "run_id": context.run_id,
            "base_model": base_model.name,
            "trained_weights": trained_weights.sampler_path,
            "tasks": plan.tasks,
            "generation_task": plan.generation_task,
            "num_examples": n,
            "base": {m: base.metrics[m] for m in metric_order(base.metrics)},
            "trained": {m: trained.metrics[m] for m in metric_order(trained.metrics)},
            "higher_is_better": directions,
            "gate": {"settings": vars(settings), **verdict.as_dict()},
            "generations": samples,
            "seconds": {"base": base.seconds, "trained": trained.seconds, "total": seconds},
            "lm_eval_outputs": {label: str(out_dir / f"lm_eval_{label}.json") for label in results},
        }
        report_path = out_dir / "report.json"
        report_path.write_text(json.dumps(report, indent=2))

        lower = [r["metric"] for r in rows if not directions.get(r["metric"], True)]
        context.add_output_metadata(
            {
                "comparison": dg.MetadataValue.md(
                    markdown_table(rows) + (f"\n\nLower is better for: {', '.join(lower)}." if lower else "")
                ),
                "gate": dg.MetadataValue.md(
                    f"**{'passed' if verdict.passed else 'FAILED'}**: {verdict.reason}"
                ),
                "samples": dg.MetadataValue.md(markdown_table(samples[:SAMPLES_SHOWN])),
                "plot": image_markdown(plot, "training loss and metric deltas"),
                "primary_metric": settings.metric,
                f"base_{settings.metric}": base.metrics.get(settings.metric, float("nan")),
                f"trained_{settings.metric}": trained.metrics.get(settings.metric, float("nan")),
                "tasks": dg.MetadataValue.json(plan.tasks),
                "examples": n,
                "eval_seconds": seconds,
                "base_eval_seconds": base.seconds,
                "trained_eval_seconds": trained.seconds,
                "report": dg.MetadataValue.path(str(report_path)),
            }
        )
        return EvalManifest(
            report_path=str(report_path),
            primary_metric=settings.metric,
            base={m: base.metrics[m] for m in metric_order(base.metrics)},
            trained={m: trained.metrics[m] for m in metric_order(trained.metrics)},
            num_examples=n,
            seconds=seconds,
            gate_passed=verdict.passed,
        )

    return eval_report
