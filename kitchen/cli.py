"""``kitchen``: run post-training workflows as real Dagster runs from the command line.

    kitchen run supervised --model M --dataset D --epochs 1

Runs are recorded in the persistent Dagster instance at ``$DAGSTER_HOME`` (default
``$KITCHEN_HOME/dagster``), so ``dagster dev -w workspace.yaml`` with the same ``DAGSTER_HOME`` shows them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kitchen.home import prepare_dagster_home

WORKFLOWS = ("supervised",)

# CLI flag -> run-config field, for flags whose names differ from the field.
_FLAG_FIELDS = {
    "model": "model",
    "dataset": "dataset",
    "dataset_revision": "dataset_revision",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "learning_rate": "learning_rate",
    "lr_schedule": "lr_schedule",
    "warmup_steps": "warmup_steps",
    "lora_rank": "lora_rank",
    "max_length": "max_length",
    "max_steps": "max_steps",
    "max_rows": "max_rows",
    "train_on": "train_on",
    "save_every": "save_every",
    "max_in_flight": "max_in_flight",
    "seed": "seed",
    "eval_examples": "eval_examples",
    "eval_max_tokens": "eval_max_tokens",
    "eval_tasks": "eval_tasks",
    "gate_metric": "gate_metric",
    "gate_margin": "gate_margin",
    "log_level": "log_level",
    "registered_model_name": "registered_model_name",
    "mlflow_run_name": "mlflow_run_name",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kitchen",
        description="Kitchen: LLM post-training as a Dagster asset graph (local engine or Tinker).",
        epilog="Example: kitchen run supervised --epochs 1   (the packaged SmolLM2 on the built-in "
        "arithmetic dataset). Runs land in $DAGSTER_HOME; open them with `make ui`.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a workflow end to end as a Dagster job")
    run.add_argument("workflow", choices=WORKFLOWS, help="which workflow to run")
    run.add_argument(
        "--model",
        help="base model: SmolLM2-135M-Instruct (packaged, default), a local "
        "Hugging Face model directory, a Hub id, or a Tinker model name",
    )
    run.add_argument(
        "--dataset",
        help="built-in dataset (default kitchen/arithmetic), a JSONL/CSV/Parquet "
        "file, a save_to_disk or data-files directory, or a Hub dataset id",
    )
    run.add_argument("--dataset-revision", help="Hub dataset revision (branch, tag or commit)")
    run.add_argument("--epochs", type=int, help="passes over the training set (default 1)")
    run.add_argument("--batch-size", type=int, help="datums per optimizer step (default 16)")
    run.add_argument(
        "--learning-rate",
        type=float,
        help="Adam learning rate (default: tinker-cookbook's recommended LoRA rate for the model)",
    )
    run.add_argument("--lr-schedule", choices=("linear", "cosine", "constant"), help="default linear")
    run.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 0)")
    run.add_argument("--lora-rank", type=int, help="LoRA rank (default 32)")
    run.add_argument("--max-length", type=int, help="max tokens per datum; longer rows are truncated (256)")
    run.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    run.add_argument("--max-rows", type=int, help="use at most this many training rows")
    run.add_argument(
        "--train-on",
        choices=("last_assistant", "all_assistant", "all"),
        help="which tokens carry loss (default all_assistant)",
    )
    run.add_argument("--save-every", type=int, help="checkpoint every N steps (default 20, 0 = only final)")
    run.add_argument(
        "--max-in-flight",
        type=int,
        help="training steps submitted before the oldest is "
        "awaited (default 8: hides request latency up to ~7x the compute of a step)",
    )
    run.add_argument("--seed", type=int, help="training seed (default 0)")
    run.add_argument("--eval-examples", type=int, help="held-out rows to generate and score (default 100)")
    run.add_argument("--eval-max-tokens", type=int, help="max new tokens per evaluation generation (16)")
    run.add_argument(
        "--eval-tasks",
        help="extra lm-eval tasks, comma-separated (gsm8k,hellaswag, or "
        "Kitchen's kitchen_arithmetic); the held-out tasks always run",
    )
    run.add_argument(
        "--gate-metric",
        help="the quality gate's primary metric (default exact_match; nll, f1, ... or <task>/<metric>)",
    )
    run.add_argument(
        "--gate-margin",
        type=float,
        help="how much the trained model must beat the base on the gate metric (default 0.02)",
    )
    run.add_argument(
        "--backend",
        choices=("local", "tinker"),
        default=None,
        help="training backend (default $KITCHEN_BACKEND or local)",
    )
    run.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="default INFO")
    run.add_argument(
        "--registered-model-name",
        help="MLflow registered model to add the trained version to "
        "(default <workflow>-<base model>-<dataset>)",
    )
    run.add_argument("--mlflow-run-name", help="name of the run's MLflow run (default <workflow>-<run id>)")
    from kitchen.registry.cli import add_models_parser

    add_models_parser(sub)
    return parser


def build_run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The job's flat run config from the flags given; validated with the job's own schema."""
    from kitchen_assets.config import SupervisedRunConfig

    values = {
        field: getattr(args, flag) for flag, field in _FLAG_FIELDS.items() if getattr(args, flag) is not None
    }
    return SupervisedRunConfig(**values).model_dump(exclude_defaults=True)


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"])
        lines.append(f"  --{field.replace('_', '-')}: {item['msg']} (got {item.get('input')!r})")
    return "invalid configuration:\n" + "\n".join(lines)


def _ensure_dagster_home() -> Path:
    return prepare_dagster_home()  # created once, under a lock: concurrent first runs are safe


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _print_summary(workflow: str, run_id: str) -> None:
    import dagster as dg
    from rich.console import Console
    from rich.table import Table

    from kitchen.eval.report import gate_summary
    from kitchen.manifests import EvalManifest, WeightsManifest
    from kitchen_assets.io import read_manifest

    console = Console()
    weights = read_manifest(dg.AssetKey([workflow, "trained_weights"]))
    report = read_manifest(dg.AssetKey([workflow, "eval_report"]))
    assert isinstance(weights, WeightsManifest) and isinstance(report, EvalManifest)
    # Paths go through plain print: rich would wrap them mid-URI.
    print(f"\n{workflow} run {run_id}")
    print(f"weights (for sampling): {weights.sampler_path}")
    print(f"training state:         {weights.state_path}")
    print(f"steps: {weights.steps}   final train loss: {_fmt(weights.final_loss)}")
    title = f"held-out evaluation (lm-eval, n={report.num_examples}, {report.seconds:.0f}s)"
    table = Table(title=title)
    for col in ("metric", "base", "trained", "delta"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for name, base in report.base.items():
        trained = report.trained.get(name, math.nan)
        table.add_row(name, _fmt(base), _fmt(trained), f"{trained - base:+.4f}")
    console.print(table)
    print(gate_summary(report.report_path))
    print(f"report: {report.report_path}")
    print(f"open the run in the UI: DAGSTER_HOME={os.environ['DAGSTER_HOME']} make ui")


def run_workflow(args: argparse.Namespace) -> int:
    try:
        run_config = build_run_config(args)
    except ValidationError as err:
        print(f"kitchen: {_format_validation_error(err)}", file=sys.stderr)
        return 2
    _ensure_dagster_home()
    import dagster as dg

    from kitchen_assets.definitions import build_definitions

    try:
        defs = build_definitions(args.backend)
    except ValueError as err:
        print(f"kitchen: {err}", file=sys.stderr)
        return 2
    from resources.training import BackendUnavailableError

    try:
        # Before the run starts, so a missing key or an unreachable service is one clear line, not a run.
        with dg.build_resources({"training": (defs.resources or {})["training"]}) as resources:
            resources.training.preflight()
    except BackendUnavailableError as err:
        print(f"kitchen: {err}", file=sys.stderr)
        return 1
    from kitchen.registry import RegistryError

    try:
        # An unreachable MLflow server fails now, not after training.
        (defs.resources or {})["registry"].preflight()
    except RegistryError as err:
        print(f"kitchen: {err}", file=sys.stderr)
        return 1
    job = defs.resolve_job_def(f"{args.workflow}_job")
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(run_config=run_config, instance=instance, raise_on_error=False)
    if not result.success:
        print(f"\nkitchen: run {result.run_id} failed", file=sys.stderr)
        for event in result.all_events:
            if event.is_step_failure and event.step_failure_data is not None:
                error = event.step_failure_data.error
                message = error.message.strip() if error else "unknown error"
                cause = error.cause.message.strip() if error and error.cause else ""
                print(f"  step {event.step_key}: {cause or message}", file=sys.stderr)
        evaluated = {e.asset_key for e in result.get_asset_materialization_events()}
        if dg.AssetKey([args.workflow, "eval_report"]) in evaluated:
            _print_summary(args.workflow, result.run_id)  # evaluation ran: show its table and the gate
        return 1
    _print_summary(args.workflow, result.run_id)
    registered = dg.AssetKey([args.workflow, "registered_model"])
    if registered in {e.asset_key for e in result.get_asset_materialization_events()}:
        from kitchen.registry.cli import print_registration
        from kitchen_assets.io import read_manifest

        print_registration(read_manifest(registered))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return run_workflow(args)
    if args.command == "models":
        from kitchen.registry.cli import models_command

        return models_command(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
