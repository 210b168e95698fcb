"""``kitchen run <workflow>``: validate, preflight, execute the workflow's job in process, summarise.

What a newcomer sees: one clear line for bad input (before any expensive step), a line per stage and a
progress bar while it runs, and the evaluation table, gate verdict and registered version at the end.
With ``--verbose``, Dagster's event log and the libraries' own output as they happen.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kitchen.cli.flags import config_from_flags, format_validation_error
from kitchen.cli.instance import prepare_dagster_home
from kitchen.cli.location import load_definitions
from kitchen.cli.progress import RunProgress, quiet_output
from kitchen.home import home_dir
from kitchen.manifests import (
    CheckpointsManifest,
    EvalManifest,
    Manifest,
    RegisteredModelManifest,
    WeightsManifest,
    read_manifest_file,
)
from kitchen.workflows import Workflow, get_workflow
from kitchen.workflows.config import MISSING_DEFAULT_HINT, section_of

# Library chatter that is noise at a terminal; the run's log keeps all of it.
_QUIET_ENV = {
    "TQDM_DISABLE": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


EXIT_INTERRUPTED = 130  # what a shell reports for a process stopped by SIGINT
_INTERRUPTS = frozenset({"KeyboardInterrupt", "DagsterExecutionInterruptedError"})


def _fail(message: str, code: int = 1) -> int:
    print(f"kitchen: {message}", file=sys.stderr)
    return code


def run_workflow(args: argparse.Namespace) -> int:
    workflow = get_workflow(args.workflow)
    try:
        config = config_from_flags(workflow.config, args)
    except ValidationError as err:
        return _fail(format_validation_error(err), 2)
    verbose = bool(args.verbose)
    try:
        log_path, defs = prepare_session(workflow.name, verbose, args.backend)
    except ValueError as err:
        return _fail(str(err), 2)
    problem = (
        _preflight(defs)
        or _check_dataset(workflow, config, verbose, log_path)
        or _check_registered_refs(defs, config)
    )
    if problem:
        return _fail(problem)

    from dagster import DagsterExecutionInterruptedError

    started = time.perf_counter()
    try:
        result = _execute(defs, workflow, config.model_dump(exclude_defaults=True), verbose, log_path)
    except (KeyboardInterrupt, DagsterExecutionInterruptedError):
        return _interrupted(
            "interrupted; the same command resumes (training from its latest checkpoint)", log_path
        )
    seconds = time.perf_counter() - started
    interruption = _interruption(result)
    if interruption is not None:
        return _interrupted(f"{workflow.name} run {result.run_id} {interruption}", log_path)
    outputs = _manifests(result)
    if not result.success:
        print(f"\nkitchen: {workflow.name} run {result.run_id} failed after {seconds:.0f}s", file=sys.stderr)
        for step, message in _step_failures(result):
            print(f"  {step}: {message}", file=sys.stderr)
        if not verbose:
            print(f"  full log: {log_path}", file=sys.stderr)
        if "eval_report" in outputs:  # evaluation ran: its table and gate
            _print_summary(workflow, result.run_id, outputs, seconds, _resumed_from(result))
        return 1
    _print_summary(workflow, result.run_id, outputs, seconds, _resumed_from(result))
    if not verbose:
        print(f"log: {log_path}")
    return 0


def prepare_session(name: str, verbose: bool, backend: str | None) -> tuple[Path, Any]:
    """A command's log file (named after ``name``), library chatter off unless ``verbose``, the persistent
    Dagster home, and the code location's ``Definitions`` (``ValueError``: an unknown backend)."""
    log_path = home_dir("logs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    if not verbose:
        os.environ.update({k: v for k, v in _QUIET_ENV.items() if k not in os.environ})
    prepare_dagster_home()
    return log_path, load_definitions(backend)


def _check_dataset(workflow: Workflow, config: Any, verbose: bool, log_path: Path) -> str | None:
    """Load the dataset as the workflow's ``dataset`` asset will, before any model is resolved or
    dequantized: a bad file or an unknown source is one line here, its traceback in the run's log (and on
    the terminal with ``--verbose``). Hub sources are only as expensive as the asset's own load, which then
    reads the Hub cache."""
    section = section_of(config, workflow.sections["dataset"])
    source = getattr(section, "dataset", "the dataset")
    try:
        with contextlib.nullcontext() if verbose else quiet_output(log_path):
            workflow.load_dataset(section)
    except Exception as err:
        if verbose:
            traceback.print_exc()
        else:
            with log_path.open("a") as log:
                log.write(traceback.format_exc())
        reason = " ".join(str(err).split()) or type(err).__name__
        if not isinstance(err, ValueError):  # DatasetSourceError, SchemaError: messages made for users
            reason = f"{type(err).__name__}: {reason}"
        where = "" if verbose else f" (traceback: {log_path})"
        return f"dataset {source!r}: {reason} -- fix it or pass another --dataset{where}"
    return None


def _interrupted(message: str, log_path: Path) -> int:
    """Ctrl-C: one line, then exit at once. The run's state is already on disk (the ledger names only
    whole checkpoints); waiting for the interpreter to join worker threads would wait for the request
    the engine is running, which on a large model takes as long as a training step."""
    print(f"\nkitchen: {message} (log: {log_path})", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(EXIT_INTERRUPTED)


def _interruption(result: Any) -> str | None:
    """How the run was interrupted (the interrupted step's own account), or None when it was not."""
    for event in result.all_events:
        if not (event.is_step_failure or event.is_run_failure):
            continue
        chain, error = [], getattr(event.event_specific_data, "error", None)
        while error is not None:
            chain.append(error)
            error = error.cause
        if any(e.cls_name in _INTERRUPTS for e in chain):
            told = [
                _error_text(e)
                for e in chain
                if e.message.strip()
                and not (e.cls_name or "").startswith("Dagster")
                and e.cls_name not in _INTERRUPTS
            ]
            where = f" during {event.step_key}" if event.step_key else ""
            return (
                told[0]
                if told
                else f"interrupted{where}; the same command resumes (training from its latest checkpoint)"
            )
    return None


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


def _check_registered_refs(defs: Any, config: Any) -> str | None:
    """Every ``models:/`` setting (``--model``, distillation's ``--teacher``) names a registered version
    that exists; a default that does not exist yet says what makes it."""
    from kitchen.registry import RegistryError
    from kitchen.registry.starting import is_registered_ref

    registry = (defs.resources or {})["registry"]
    for name, value in config.model_dump().items():
        if isinstance(value, str) and is_registered_ref(value):
            try:
                registry.registry().resolve(value.strip())
            except RegistryError as err:
                return f"--{name.replace('_', '-')} {value}: {err}{_default_hint(config, name, value)}"
    return None


def _default_hint(config: Any, name: str, value: str) -> str:
    """``. <hint>`` when ``value`` is the field's default and the field says what makes it."""
    field = type(config).model_fields.get(name)
    extra = field.json_schema_extra if field is not None else None
    hint = extra.get(MISSING_DEFAULT_HINT) if isinstance(extra, dict) else None
    return f". {hint}" if hint and field is not None and value == field.default else ""


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


def _resumed_from(result: Any) -> str | None:
    """The checkpoint training resumed from (``step N: URI``), as the run's materialisations record it."""
    for event in result.get_asset_materialization_events():
        entry = event.step_materialization_data.materialization.metadata.get("resumed_from")
        if entry is not None and getattr(entry, "value", None):
            return str(entry.value)
    return None


def _step_failures(result: Any) -> list[tuple[str, str]]:
    failures = []
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data is not None:
            error = event.step_failure_data.error
            while (
                error is not None and error.cause is not None and (error.cls_name or "").startswith("Dagster")
            ):
                error = error.cause
            failures.append((event.step_key or "step", _error_text(error) if error else "unknown error"))
    return failures


def _error_text(error: Any) -> str:
    """An error's message on one line, without the ``dagster._core...Failure:`` prefix of a ``Failure``."""
    text = " ".join((error.message or "").split())
    prefix = f"{error.cls_name}: "
    if error.cls_name == "Failure" and prefix in text:
        text = text.split(prefix, 1)[1]
    return text or str(error.cls_name)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _reference_column(report_path: str) -> tuple[dict[str, float] | None, str]:
    """The report's third column (distillation's teacher), if it has one, and its label."""
    import json

    path = Path(report_path)
    report = json.loads(path.read_text()) if path.is_file() else {}
    return report.get("reference"), str(report.get("reference_label") or "reference")


def _judge_line(report_path: str) -> str | None:
    """The LLM judge's one-line summary, when the report has a judge section."""
    import json

    from kitchen.eval.judge import judge_summary

    path = Path(report_path)
    judge = (json.loads(path.read_text()) if path.is_file() else {}).get("judge")
    return judge_summary(judge["model"], judge["metrics"]) if isinstance(judge, dict) else None


def _print_summary(
    workflow: Workflow, run_id: str, outputs: dict[str, Manifest], seconds: float, resumed_from: str | None
) -> None:
    from rich.console import Console
    from rich.table import Table

    from kitchen.eval.report import gate_summary

    weights, checkpoints = outputs.get("trained_weights"), outputs.get("checkpoints")
    report = outputs.get("eval_report")
    # Paths go through plain print: rich would wrap them mid-URI.
    print(f"\n{workflow.name} run {run_id} ({seconds / 60:.1f} min)")
    if resumed_from:
        print(f"resumed from checkpoint {resumed_from}")
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
        judged = _judge_line(report.report_path)
        if judged:
            print(judged)
        print(gate_summary(report.report_path))
        print(f"report: {report.report_path}")
    registered = outputs.get("registered_model")
    if isinstance(registered, RegisteredModelManifest):
        from kitchen.cli.models import print_registration

        print_registration(registered)
    print(f"open the run in the UI: DAGSTER_HOME={os.environ.get('DAGSTER_HOME', '')} make ui")
