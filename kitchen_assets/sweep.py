"""A workflow's sweep: ``<workflow>_sweep/<kind>`` assets, one dynamic partition per configuration.

The same factories that make the workflow's own training, evaluation and registration make them again
under a sweep placement (``kitchen_assets.factory.Placement``): partitioned by the workflow's
``<workflow>_sweep`` dynamic partitions, each partition's settings read from its key
(``kitchen.workflows.sweep``), reading the workflow's own unpartitioned assets before training (base model,
dataset, datums, reference logprobs...) so those are computed once and shared. The workflow's own graph
and ``<workflow>_job`` are untouched.

``<workflow>_sweep/sweep_report`` compares the configurations and promotes only the best one, when it
passed its gate and beats the champion (each configuration registers without taking the champion alias).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from kitchen.home import home_dir
from kitchen.manifests import (
    BaseModelManifest,
    CheckpointsManifest,
    EvalManifest,
    Manifest,
    RegisteredModelManifest,
    SweepReportManifest,
    read_manifest_file,
)
from kitchen.registry import eval_gate, promote_version
from kitchen.training.loop import read_metrics
from kitchen.workflows import Workflow
from kitchen.workflows.config import flatten_run_config, section_of
from kitchen.workflows.sweep import (
    CONFIGURATIONS_TAG,
    Outcome,
    SweepError,
    best,
    config_from_key,
    rank,
    shared_differences,
    shared_kinds,
)
from kitchen_assets.checks import eval_gate_check
from kitchen_assets.evaluation import eval_report_asset
from kitchen_assets.factory import Placement, asset_key
from kitchen_assets.io import latest_materialization, recorded_manifest_path
from kitchen_assets.metadata import bar_panels, image_markdown, line_plot, markdown_table
from kitchen_assets.registry import primary_metric_direction, registered_model_asset
from kitchen_assets.telemetry import instrumented
from kitchen_assets.training import training_asset
from resources.mlflow_registry import MlflowRegistry

SWEEP_TAG = "kitchen/sweep"
REPORT = "sweep_report"


def sweep_name(workflow: Workflow) -> str:
    """The sweep's group, key prefix and dynamic partitions name: ``<workflow>_sweep``."""
    return f"{workflow.name}_sweep"


def partitioned_kinds(workflow: Workflow) -> tuple[str, ...]:
    """The asset kinds made once per configuration."""
    return ("checkpoints", "trained_weights", *workflow.train_outputs, "eval_report", "registered_model")


def materialised_settings(
    workflow: Workflow, instance: dg.DagsterInstance
) -> dict[str, dict[str, Any] | None]:
    """Shared kind -> the flat settings of the run that made its latest materialisation (None: never)."""
    found: dict[str, dict[str, Any] | None] = {}
    for kind in shared_kinds(workflow):
        event = latest_materialization(instance, asset_key(workflow, kind))
        run = instance.get_run_by_id(event.run_id) if event is not None else None
        found[kind] = flatten_run_config(dict(run.run_config or {})) if run is not None else None
    return found


def _settings(workflow: Workflow, kind: str, context: dg.AssetExecutionContext) -> Any:
    """The ``kind`` section of the configuration the partition key names; training first checks that the
    shared assets it builds on were made with this configuration's settings."""
    try:
        config = config_from_key(workflow, context.partition_key)
    except SweepError as err:
        raise dg.Failure(description=str(err), allow_retries=False) from err
    if kind == "train":
        problems = shared_differences(workflow, config, materialised_settings(workflow, context.instance))
        if problems:
            raise dg.Failure(
                description=f"{context.partition_key}: the shared assets do not match this configuration: "
                + "; ".join(problems)
                + f". `kitchen sweep {workflow.name}` materialises them first (or materialise "
                f"{workflow.name}_job's assets before training with these settings)",
                allow_retries=False,
            )
    return section_of(config, workflow.sections[kind])


def sweep_placement(workflow: Workflow) -> Placement:
    return Placement(
        prefix=sweep_name(workflow),
        made=frozenset({*partitioned_kinds(workflow), REPORT}),
        partitions=dg.DynamicPartitionsDefinition(name=sweep_name(workflow)),
        settings=_settings,
    )


class SweepReportConfig(dg.Config):
    partitions: list[str] = Field(
        default_factory=list,
        description="The configurations to compare (partition keys); empty: the sweep's own when the run "
        "is part of a `kitchen sweep --backfill`, else every partition of the sweep.",
    )


def _partition_manifest(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str) -> Manifest | None:
    path = recorded_manifest_path(latest_materialization(instance, key, partition))
    try:
        return read_manifest_file(path) if path else None
    except FileNotFoundError:
        return None


def _registered_start(workflow: Workflow, instance: dg.DagsterInstance, key: str) -> str | None:
    """The registered version the configuration trained from (``--model models:/...``), as the shared
    ``base_model`` asset resolved it, when that asset was made for this configuration's model."""
    path = recorded_manifest_path(latest_materialization(instance, asset_key(workflow, "base_model")))
    base = read_manifest_file(path) if path and Path(path).is_file() else None
    model = getattr(config_from_key(workflow, key), "model", None)
    if isinstance(base, BaseModelManifest) and base.name == model:
        return base.registered_version
    return None


def _mean_tokens_per_second(metrics_path: str) -> tuple[float | None, list[int], list[float]]:
    steps = read_metrics(metrics_path)
    tps = [m.tokens_per_second for m in steps if math.isfinite(m.tokens_per_second)]
    mean = sum(tps) / len(tps) if tps else None
    return mean, [m.step for m in steps], [m.loss for m in steps]


def _row(position: int, o: Outcome) -> dict[str, Any]:
    def num(value: float | None) -> float | str:
        return value if value is not None and math.isfinite(value) else "n/a"

    return {
        "rank": position,
        "configuration": o.key,
        "status": "done" if o.done else "missing",
        "gate": ("passed" if o.gate_passed else "failed") if o.done else "",
        o.metric or "metric": num(o.value),
        "base": num(o.base_value),
        "nll": num(o.nll),
        "final_loss": num(o.final_loss),
        "tokens_per_s": num(o.tokens_per_second),
        "version": o.version or "",
    }


def sweep_report_asset(workflow: Workflow, placement: Placement) -> dg.AssetsDefinition:
    keys = {
        kind: placement.key(workflow, kind) for kind in ("checkpoints", "eval_report", "registered_model")
    }
    name = sweep_name(workflow)

    @dg.asset(
        key=placement.key(workflow, REPORT),
        group_name=placement.group(workflow),
        deps=list(keys.values()),
        kinds={"json"},
        description="The sweep's configurations side by side (gate metric, held-out NLL, final loss, "
        "tokens/s, loss curves), best first; only the best, when it passed its gate and beats the "
        "champion, is promoted.",
    )
    @instrumented
    def sweep_report(
        context: dg.AssetExecutionContext, config: SweepReportConfig, registry: MlflowRegistry
    ) -> SweepReportManifest:
        instance = context.instance
        tagged = context.run.tags.get(CONFIGURATIONS_TAG)
        partitions = (
            list(config.partitions)
            or (json.loads(tagged) if tagged else [])
            or list(instance.get_dynamic_partitions(name))
        )
        if not partitions:
            raise dg.Failure(
                description=f"no configurations to compare: `kitchen sweep {workflow.name} ...` adds them",
                allow_retries=False,
            )
        outcomes: list[Outcome] = []
        reports: dict[str, EvalManifest] = {}
        versions: dict[str, RegisteredModelManifest] = {}
        curves: dict[str, tuple[list[int], list[float]]] = {}
        for key in partitions:
            report = _partition_manifest(instance, keys["eval_report"], key)
            checkpoints = _partition_manifest(instance, keys["checkpoints"], key)
            registered = _partition_manifest(instance, keys["registered_model"], key)
            if not isinstance(report, EvalManifest) or not isinstance(checkpoints, CheckpointsManifest):
                outcomes.append(Outcome(key=key, done=False))
                continue
            reports[key] = report
            if isinstance(registered, RegisteredModelManifest):
                versions[key] = registered
            lower, _ = primary_metric_direction(report)
            tps, steps, losses = _mean_tokens_per_second(checkpoints.metrics_path)
            curves[key] = (steps, losses)
            metric = report.primary_metric
            outcomes.append(
                Outcome(
                    key=key,
                    done=True,
                    gate_passed=eval_gate(report).passed,
                    metric=metric,
                    value=report.trained.get(metric),
                    base_value=report.base.get(metric),
                    lower_is_better=lower,
                    nll=report.trained.get("nll"),
                    final_loss=checkpoints.final_loss,
                    tokens_per_second=tps,
                    version=versions[key].model_uri if key in versions else None,
                )
            )
        ranked = rank(outcomes)
        top = best(ranked)
        promoted, decision = False, "no configuration finished and passed its gate; nothing promoted"
        if top is not None and top.key not in versions:
            decision = f"the best configuration {top.key} has no registered version; rerun the sweep"
        elif top is not None:
            version = versions[top.key]
            store = registry.registry()
            with store.lock(version.name):
                verdict = promote_version(
                    store,
                    version.name,
                    version.version,
                    reports[top.key],
                    top.lower_is_better,
                    context.log.info,
                    started_from=_registered_start(workflow, instance, top.key),
                )
            promoted = verdict.promoted
            decision = f"best {top.key}: {version.model_uri} -> {verdict.alias} ({verdict.reason})"
        context.log.info(decision)

        out_dir = home_dir("reports", name, context.run_id)
        rows = [_row(i + 1, o) for i, o in enumerate(ranked)]
        labels = [o.key for o in ranked]
        metric = next((o.metric for o in ranked if o.metric), "metric")
        bars = bar_panels(
            out_dir / "sweep.png",
            labels,
            {
                f"trained {metric}": [o.value for o in ranked],
                "held-out NLL": [o.nll for o in ranked],
                "final train loss": [o.final_loss for o in ranked],
                "tokens/s": [o.tokens_per_second for o in ranked],
            },
            title=f"{name}: {len(ranked)} configurations, best first",
        )
        metadata: dict[str, Any] = {
            "comparison": dg.MetadataValue.md(markdown_table(rows)),
            "best": top.key if top is not None else "",
            "promoted": promoted,
            "decision": dg.MetadataValue.md(decision),
            "plots": image_markdown(bars, "configurations compared"),
        }
        if curves:
            overlay = line_plot(
                out_dir / "loss_curves.png",
                curves,
                title=f"{name}: training loss",
                xlabel="step",
                ylabel="loss",
            )
            metadata["loss_curves"] = image_markdown(overlay, "training loss per configuration")
        report_path = out_dir / "sweep_report.json"
        report_path.write_text(
            json.dumps(
                {
                    "workflow": workflow.name,
                    "run_id": context.run_id,
                    "rows": rows,
                    "best": top.key if top is not None else None,
                    "promoted": promoted,
                    "decision": decision,
                    "plots": [str(bars), *([str(out_dir / "loss_curves.png")] if curves else [])],
                },
                indent=2,
            )
        )
        metadata["report"] = dg.MetadataValue.path(str(report_path))
        context.add_output_metadata(metadata)
        return SweepReportManifest(
            workflow=workflow.name,
            report_path=str(report_path),
            configurations=len(ranked),
            completed=sum(o.done for o in ranked),
            best=top.key if top is not None else None,
            best_version=top.version if top is not None else None,
            promoted=promoted,
            decision=decision,
        )

    return sweep_report


def sweep_assets(workflow: Workflow) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    """The workflow's training, evaluation (with its gate, reporting only) and registration, partitioned
    per configuration, and the report comparing them."""
    placement = sweep_placement(workflow)
    return [
        training_asset(workflow, placement=placement),
        eval_report_asset(workflow, placement),
        eval_gate_check(workflow, placement),
        registered_model_asset(workflow, placement),
        sweep_report_asset(workflow, placement),
    ]


def sweep_keys(workflow: Workflow) -> list[dg.AssetKey]:
    """The partitioned assets (what ``<workflow>_sweep_job`` materialises per partition)."""
    placement = sweep_placement(workflow)
    return [placement.key(workflow, kind) for kind in partitioned_kinds(workflow)]


def report_key(workflow: Workflow) -> dg.AssetKey:
    return sweep_placement(workflow).key(workflow, REPORT)


__all__ = [
    "SWEEP_TAG",
    "materialised_settings",
    "sweep_assets",
    "sweep_keys",
    "sweep_name",
    "sweep_placement",
]
