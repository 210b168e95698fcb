"""``kitchen run <workflow>``: validate, preflight, execute the workflow's job in process, summarise.

What a newcomer sees: one clear line for bad input (before any expensive step), a line per stage and a
progress bar while it runs, and the evaluation table, gate verdict and registered version at the end.
With ``--verbose``, Dagster's event log and the libraries' own output as they happen.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kitchen.cli.flags import config_from_flags, format_validation_error
from kitchen.cli.location import load_definitions
from kitchen.cli.progress import RunProgress, quiet_output
from kitchen.home import home_dir, prepare_dagster_home
from kitchen.manifests import (
    CheckpointsManifest,
    EvalManifest,
    Manifest,
    RegisteredModelManifest,
    WeightsManifest,
    read_manifest_file,
)
from kitchen.workflows import Workflow, get_workflow

# Library chatter that is noise at a terminal; the run's log keeps all of it.
_QUIET_ENV = {
    "TQDM_DISABLE": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


def _fail(message: str, code: int = 1) -> int:
    print(f"kitchen: {message}", file=sys.stderr)
    return code


def run_workflow(args: argparse.Namespace) -> int:
    workflow = get_workflow(args.workflow)
    try:
        config = config_from_flags(workflow.config, args)
    except ValidationError as err:
        return _fail(format_validation_error(err), 2)
    prepare_dagster_home()
    try:
        defs = load_definitions(args.backend)
    except ValueError as err:
        return _fail(str(err), 2)
    problem = _preflight(defs)
    if problem:
        return _fail(problem)

    verbose = bool(args.verbose)
    log_path = home_dir("logs") / f"{workflow.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    if not verbose:
        os.environ.update({k: v for k, v in _QUIET_ENV.items() if k not in os.environ})
    started = time.perf_counter()
    result = _execute(defs, workflow, config.model_dump(exclude_defaults=True), verbose, log_path)
    seconds = time.perf_counter() - started
    outputs = _manifests(result)
    if not result.success:
        print(f"\nkitchen: {workflow.name} run {result.run_id} failed after {seconds:.0f}s", file=sys.stderr)
        for step, message in _step_failures(result):
            print(f"  {step}: {message}", file=sys.stderr)
        if not verbose:
            print(f"  full log: {log_path}", file=sys.stderr)
        if "eval_report" in outputs:
            _print_summary(workflow, result.run_id, outputs, seconds)  # evaluation ran: its table and gate
        return 1
    _print_summary(workflow, result.run_id, outputs, seconds)
    if not verbose:
        print(f"log: {log_path}")
    return 0


def _preflight(defs: Any) -> str | None:
    """A missing key, an unreachable service or registry: one line now, not a failed run later."""
    import dagster as dg

    from kitchen.contract import BackendUnavailableError
    from kitchen.registry import RegistryError

    resources = defs.resources or {}
    try:
        with dg.build_resources({"training": resources["training"]}) as built:
            built.training.preflight()
        resources["registry"].preflight()
    except (BackendUnavailableError, RegistryError) as err:
        return str(err)
    return None


def _execute(defs: Any, workflow: Workflow, run_config: dict[str, Any], verbose: bool, log_path: Path) -> Any:
    import dagster as dg

    job = defs.resolve_job_def(f"{workflow.name}_job")
    if verbose:
        with dg.DagsterInstance.get() as instance:
            return job.execute_in_process(run_config=run_config, instance=instance, raise_on_error=False)
    with quiet_output(log_path) as terminal:
        progress = RunProgress(terminal)
        progress.console.print(
            f"[bold]{workflow.name}[/bold]: {workflow.summary}  [dim](log: {log_path})[/dim]"
        )
        with progress.attached(), dg.DagsterInstance.get() as instance:
            return job.execute_in_process(run_config=run_config, instance=instance, raise_on_error=False)


def _manifests(result: Any) -> dict[str, Manifest]:
    """This run's manifests by asset kind, from the paths its materialisations recorded."""
    found: dict[str, Manifest] = {}
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        entry = materialization.metadata.get("manifest")
        path = getattr(entry, "path", None) or getattr(entry, "value", None)
        if path and Path(str(path)).is_file():
            found[materialization.asset_key.path[-1]] = read_manifest_file(str(path))
    return found


def _step_failures(result: Any) -> list[tuple[str, str]]:
    failures = []
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data is not None:
            error = event.step_failure_data.error
            while (
                error is not None and error.cause is not None and (error.cls_name or "").startswith("Dagster")
            ):
                error = error.cause
            message = " ".join((error.message if error else "unknown error").split())
            failures.append((event.step_key or "step", message))
    return failures


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _reference_column(report_path: str) -> tuple[dict[str, float] | None, str]:
    """The report's third column (distillation's teacher), if it has one, and its label."""
    import json

    path = Path(report_path)
    report = json.loads(path.read_text()) if path.is_file() else {}
    return report.get("reference"), str(report.get("reference_label") or "reference")


def _print_summary(workflow: Workflow, run_id: str, outputs: dict[str, Manifest], seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    from kitchen.eval.report import gate_summary

    weights, checkpoints = outputs.get("trained_weights"), outputs.get("checkpoints")
    report = outputs.get("eval_report")
    # Paths go through plain print: rich would wrap them mid-URI.
    print(f"\n{workflow.name} run {run_id} ({seconds / 60:.1f} min)")
    if isinstance(weights, WeightsManifest):
        print(f"weights (for sampling): {weights.sampler_path}")
        print(f"training state:         {weights.state_path}")
        print(f"steps: {weights.steps}   final train loss: {_fmt(weights.final_loss)}")
    if isinstance(checkpoints, CheckpointsManifest):
        print(f"training metrics:       {checkpoints.metrics_path}")
    if isinstance(report, EvalManifest):
        title = f"held-out evaluation (n={report.num_examples}, {report.seconds:.0f}s)"
        table = Table(title=title)
        reference, label = _reference_column(report.report_path)
        for col in ("metric", "base", "trained", "delta", *([label] if reference is not None else [])):
            table.add_column(col, justify="left" if col == "metric" else "right")
        for name, base in report.base.items():
            trained = report.trained.get(name, math.nan)
            extra = [_fmt(reference.get(name))] if reference is not None else []
            table.add_row(name, _fmt(base), _fmt(trained), f"{trained - base:+.4f}", *extra)
        Console().print(table)
        print(gate_summary(report.report_path))
        print(f"report: {report.report_path}")
    registered = outputs.get("registered_model")
    if isinstance(registered, RegisteredModelManifest):
        from kitchen.cli.models import print_registration

        print_registration(registered)
    print(f"open the run in the UI: DAGSTER_HOME={os.environ.get('DAGSTER_HOME', '')} make ui")
