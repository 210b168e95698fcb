"""``kitchen sweep <workflow> --learning-rate A,B --lora-rank X,Y``: one Dagster partition per configuration.

Every combination of the values given becomes a configuration named by its key
(``kitchen.workflows.sweep``) and a partition of ``<workflow>_sweep``. Like a Dagster backfill run from the
command line: the partitions not yet materialised run one at a time (each a run of
``<workflow>_sweep_job``, tagged with the sweep), a failed one does not stop the others, and running the
same command again runs only the missing or failed ones. The assets before training are materialised once
per group of configurations that agree on their settings (and not at all when the latest materialisation
already has them). Then ``<workflow>_sweep_report_job`` compares the configurations and promotes the best;
the comparison table is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kitchen.cli.flags import format_validation_error, sweep_values
from kitchen.cli.progress import RunProgress, quiet_output
from kitchen.cli.run import (
    _check_dataset,
    _check_registered_refs,
    _fail,
    _interrupted,
    _preflight,
    _step_failures,
    prepare_session,
)
from kitchen.workflows import Workflow, get_workflow
from kitchen.workflows.config import RunConfig, flatten_run_config
from kitchen.workflows.sweep import (
    CONFIGURATIONS_TAG,
    SweepError,
    expand,
    partition_key,
    shared_differences,
    shared_kinds,
    shared_settings,
)

SWEEP_ID_TAG = "kitchen/sweep_id"


def sweep_workflow(args: argparse.Namespace) -> int:
    workflow = get_workflow(args.workflow)
    fixed, swept = sweep_values(workflow.config, args)
    problems = _bad_values(workflow, fixed, swept)
    if problems:
        return _fail("invalid configuration:\n" + "\n".join(problems), 2)
    try:
        configs = expand(workflow, fixed, swept)
    except ValidationError as err:
        return _fail(format_validation_error(err), 2)
    except SweepError as err:
        return _fail(str(err), 2)
    keys = [partition_key(workflow, c) for c in configs]
    verbose = bool(args.verbose)
    try:
        log_path, defs = prepare_session(f"{workflow.name}-sweep", verbose, args.backend)
    except ValueError as err:
        return _fail(str(err), 2)
    problem = _preflight(defs)
    for config in _distinct(
        configs, lambda c: c.model_dump(include=set(workflow.sections["dataset"].model_fields))
    ):
        problem = problem or _check_dataset(workflow, config, verbose, log_path)
    for config in configs:
        problem = problem or _check_registered_refs(defs, config)
    if problem:
        return _fail(problem)

    import dagster as dg

    name = f"{workflow.name}_sweep"
    print(f"{name}: {len(keys)} configuration(s)  (log: {log_path})")
    started = time.perf_counter()
    status: dict[str, str] = {}
    try:
        with dg.DagsterInstance.get() as instance:
            instance.add_dynamic_partitions(
                name, [k for k in keys if not instance.has_dynamic_partition(name, k)]
            )
            done = _materialised(instance, workflow, keys)
            sweep_id = uuid.uuid4().hex[:8]
            if args.backfill:
                return _submit_backfill(defs, instance, workflow, configs, done, verbose, log_path)
            for group in _distinct_groups(workflow, configs):
                todo = [c for c in group if partition_key(workflow, c) not in done]
                for config in group:
                    if config not in todo:
                        status[partition_key(workflow, config)] = "done earlier"
                if not todo:
                    continue
                shared = _ensure_shared(defs, instance, workflow, todo[0], verbose, log_path)
                for config in todo:
                    key = partition_key(workflow, config)
                    if shared is not None:
                        status[key] = f"not run: {shared}"
                        continue
                    print(f"[{len(status) + 1}/{len(keys)}] {key}")
                    result = _execute(
                        defs.resolve_job_def(f"{name}_job"),
                        verbose,
                        log_path,
                        f"{workflow.name} {key}",
                        partition_key=key,
                        tags={SWEEP_ID_TAG: sweep_id},
                        instance=instance,
                    )
                    status[key] = "ran" if result.success else _failure_text(result)
                    print(f"    {status[key]} (run {result.run_id})")
            report = _execute(
                defs.resolve_job_def(f"{name}_report_job"),
                verbose,
                log_path,
                f"{workflow.name} sweep report",
                run_config={"ops": {f"{name}__sweep_report": {"config": {"partitions": keys}}}},
                instance=instance,
            )
    except KeyboardInterrupt:
        return _interrupted("interrupted; the same command runs the configurations not yet done", log_path)
    seconds = time.perf_counter() - started
    if not report.success:
        for step, message in _step_failures(report):
            print(f"  {step}: {message}", file=sys.stderr)
        return _fail(f"{name} report run {report.run_id} failed (log: {log_path})")
    path = _report_path(report)
    _print_report(path, status, seconds)
    failed = [k for k in keys if status.get(k, "").startswith(("failed", "not run"))]
    if failed:
        print(
            f"{len(failed)} configuration(s) failed; the same command runs only those again", file=sys.stderr
        )
        return 1
    return 0


def _submit_backfill(
    defs: Any,
    instance: Any,
    workflow: Workflow,
    configs: list[RunConfig],
    done: set[str],
    verbose: bool,
    log_path: Path,
) -> int:
    """The shared assets made here (one group only), then an asset backfill of the partitions not yet
    done and of the report, for the daemon: it runs them through the run queue (``max_concurrent_runs``,
    tag limits on ``dagster/backfill``), a failed partition does not stop the others, and the UI's
    backfill page re-executes the failed ones."""
    from dagster._core.execution.backfill import PartitionBackfill
    from dagster._core.utils import make_new_backfill_id

    groups = _distinct_groups(workflow, configs)
    if len(groups) > 1:
        return _fail(
            "--backfill: these configurations differ in settings of the shared assets ("
            + ", ".join(shared_kinds(workflow))
            + "), which one backfill cannot materialise for each; run without --backfill"
        )
    keys = [partition_key(workflow, c) for c in configs]
    todo = [k for k in keys if k not in done]
    if not todo:
        print("every configuration is already materialised; nothing to backfill")
        return 0
    shared = _ensure_shared(defs, instance, workflow, configs[0], verbose, log_path)
    if shared is not None:
        return _fail(shared)
    name = f"{workflow.name}_sweep"
    graph = defs.resolve_asset_graph()
    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id=make_new_backfill_id(),
        asset_graph=graph,
        partition_names=todo,
        asset_selection=sorted(graph.asset_keys_for_group(name)),
        backfill_timestamp=time.time(),
        tags={CONFIGURATIONS_TAG: json.dumps(keys)},
        dynamic_partitions_store=instance,
        all_partitions=False,
        title=f"{name}: {len(todo)} of {len(keys)} configuration(s)",
        description=None,
        run_config=None,
    )
    instance.add_backfill(backfill)
    print(f"submitted backfill {backfill.backfill_id}: {len(todo)} partition(s) of {name}, then sweep_report")
    for key in todo:
        print(f"  {key}")
    beats = instance.get_daemon_heartbeats() or {}
    if not any(time.time() - b.timestamp < 120 for b in beats.values()):
        print("no Dagster daemon is running here: the backfill waits until one starts (make ui)")
    print(f"watch it: DAGSTER_HOME={os.environ.get('DAGSTER_HOME', '')} make ui, Overview > Backfills")
    return 0


def _bad_values(workflow: Workflow, fixed: dict[str, Any], swept: dict[str, list[str]]) -> list[str]:
    """Every bad value at once, each swept value checked on its own (before any combination)."""
    found: dict[str, None] = {}
    trials: list[dict[str, Any]] = [{}, *({name: v} for name, values in swept.items() for v in values)]
    for trial in trials:
        try:
            workflow.config(**fixed, **trial)
        except ValidationError as err:
            found.update(dict.fromkeys(format_validation_error(err).splitlines()[1:]))
    return list(found)


def _distinct(configs: list[RunConfig], by: Any) -> list[RunConfig]:
    seen: dict[str, RunConfig] = {}
    for config in configs:
        seen.setdefault(json.dumps(by(config), sort_keys=True, default=str), config)
    return list(seen.values())


def _distinct_groups(workflow: Workflow, configs: list[RunConfig]) -> list[list[RunConfig]]:
    """Configurations grouped by the settings of the shared assets, in the order given."""
    groups: dict[str, list[RunConfig]] = {}
    for config in configs:
        groups.setdefault(
            json.dumps(shared_settings(workflow, config), sort_keys=True, default=str), []
        ).append(config)
    return list(groups.values())


def _materialised(instance: Any, workflow: Workflow, keys: list[str]) -> set[str]:
    """Partitions whose every per-configuration asset is materialised (the registration last)."""
    import dagster as dg

    key = dg.AssetKey([f"{workflow.name}_sweep", "registered_model"])
    return set(instance.get_materialized_partitions(key)) & set(keys)


def _ensure_shared(
    defs: Any, instance: Any, workflow: Workflow, config: RunConfig, verbose: bool, log_path: Path
) -> str | None:
    """Materialise the shared assets with ``config``'s settings unless their latest materialisation has
    them; None when they are ready, else why not."""
    import dagster as dg

    latest: dict[str, dict[str, Any] | None] = {}
    for kind in shared_kinds(workflow):
        event = instance.get_latest_materialization_event(dg.AssetKey([workflow.name, kind]))
        run = instance.get_run_by_id(event.run_id) if event is not None else None
        latest[kind] = flatten_run_config(dict(run.run_config or {})) if run is not None else None
    differences = shared_differences(workflow, config, latest)
    if not differences:
        print(f"shared assets ({', '.join(shared_kinds(workflow))}): up to date, reused")
        return None
    print(f"shared assets: materialising ({differences[0]})")
    result = _execute(
        defs.resolve_job_def(f"{workflow.name}_job"),
        verbose,
        log_path,
        f"{workflow.name} shared assets",
        run_config=config.model_dump(exclude_defaults=True),
        asset_selection=[dg.AssetKey([workflow.name, kind]) for kind in shared_kinds(workflow)],
        instance=instance,
    )
    return None if result.success else f"the shared assets failed ({_failure_text(result)})"


def _execute(job: Any, verbose: bool, log_path: Path, title: str, **kwargs: Any) -> Any:
    if verbose:
        return job.execute_in_process(raise_on_error=False, **kwargs)
    with quiet_output(log_path) as terminal:
        progress = RunProgress(terminal)
        progress.console.print(f"[bold]{title}[/bold]")
        with progress.attached():
            return job.execute_in_process(raise_on_error=False, **kwargs)


def _failure_text(result: Any) -> str:
    failures = _step_failures(result)
    return "failed: " + ("; ".join(f"{s}: {m}" for s, m in failures) if failures else "run failed")


def _report_path(result: Any) -> Path | None:
    for event in result.get_asset_materialization_events():
        entry = event.step_materialization_data.materialization.metadata.get("report")
        path = getattr(entry, "path", None) or getattr(entry, "value", None)
        if path:
            return Path(str(path))
    return None


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _print_report(path: Path | None, status: dict[str, str], seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    if path is None or not path.is_file():
        print("no sweep report was written")
        return
    report = json.loads(path.read_text())
    rows = report["rows"]
    table = Table(title=f"{report['workflow']} sweep ({seconds / 60:.1f} min), best first")
    columns = list(rows[0]) if rows else []
    for column in (*columns, "this run"):
        left = column in ("configuration", "version")
        table.add_column(column, justify="left" if left else "right", overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row[c]) for c in columns), status.get(row["configuration"], ""))
    Console().print(table)
    print(report["decision"])
    print(f"report: {path}")
    with contextlib.suppress(Exception):
        print(f"plots: {', '.join(report['plots'])}")
    print(f"open the sweep in the UI: DAGSTER_HOME={os.environ.get('DAGSTER_HOME', '')} make ui")
