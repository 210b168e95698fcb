"""The registered model: trained weights that got past the eval gate become a version in the MLflow registry.

It depends on every upstream asset (so the graph shows, and the tags record, the whole lineage) and on
``eval_report``, whose blocking gate check stops it in a run where the gate fails; materialised alone it
checks the gate itself and refuses weights that failed it. Registering the same
weights again finds the existing version; the champion/challenger rule lives in ``kitchen.registry``.
"""

# No ``from __future__ import annotations``: Dagster reads config and resource types from the signature.
import json
from pathlib import Path
from typing import Any

import dagster as dg

from kitchen import telemetry
from kitchen.manifests import (
    BaseModelManifest,
    CheckpointsManifest,
    DatasetManifest,
    EvalManifest,
    Manifest,
    NotUsedManifest,
    WeightsManifest,
)
from kitchen.registry import (
    Provenance,
    RegistrationResult,
    TrainedModel,
    derive_model_name,
    eval_gate,
    register_trained_model,
)
from kitchen.registry.store import RegistryError, is_remote
from kitchen.secrets import drop_secret_keys, redact_uri
from kitchen.workflows import Workflow
from kitchen.workflows.config import flatten_run_config
from kitchen.workflows.sweep import config_from_key
from kitchen_assets.factory import WORKFLOW, Placement, workflow_asset
from kitchen_assets.io import source_materialization
from kitchen_assets.metadata import markdown_table
from resources.mlflow_registry import MlflowRegistry

# Only when the eval report states no direction for the primary metric (older reports).
_LOWER_IS_BETTER_NAMES = frozenset({"nll", "perplexity", "loss"})


def primary_metric_direction(report: EvalManifest) -> tuple[bool, str]:
    """(lower is better, where that came from) for the report's primary metric."""
    path = Path(report.report_path)
    directions = json.loads(path.read_text()).get("higher_is_better", {}) if path.is_file() else {}
    metric = report.primary_metric
    if metric in directions:
        return not directions[metric], "the eval report's higher_is_better"
    return metric.rsplit("/", 1)[-1] in _LOWER_IS_BETTER_NAMES, "the metric's name (the report states none)"


def _run_config(context: dg.AssetExecutionContext, workflow: Workflow) -> dict[str, Any]:
    """The run's config, flat (per-op sections merged; a sweep's partition: the configuration its key
    names); keys that look like secrets are dropped."""
    if context.has_partition_key:
        values = config_from_key(workflow, context.partition_key).model_dump()
    else:
        values = flatten_run_config(dict(context.run.run_config or {}))
    return drop_secret_keys(dict(sorted(values.items())))


def _upstream_runs(
    context: dg.AssetExecutionContext, keys: list[dg.AssetKey], partitioned: frozenset[dg.AssetKey]
) -> dict[str, str]:
    """Upstream asset key -> the Dagster run that produced the materialisation being registered (this
    run's own when it made it, not whichever run materialised the key last; of this partition for the
    ``partitioned`` keys)."""
    runs = {}
    for key in keys:
        partition = context.partition_key if key in partitioned else None
        event = source_materialization(context.instance, context.run, key, partition)
        runs[key.to_user_string()] = event.run_id if event is not None else ""
    return runs


def _metadata(result: RegistrationResult, registry: MlflowRegistry) -> dict[str, Any]:
    m, d = result.manifest, result.decision
    numbers: list[dict[str, Any]] = [
        {"": "this version", "version": f"v{m.version}", d.metric: d.value},
        {
            "": "champion before",
            "version": f"v{d.previous_champion}" if d.previous_champion else "none",
            d.metric: d.previous_champion_value if d.previous_champion_value is not None else "n/a",
        },
    ]
    direction = "lower" if d.lower_is_better else "higher"
    decision = (
        f"**{d.alias}**: v{m.version} {d.reason}.\n\n{markdown_table(numbers)}\n\n"
        f"Gate passed: {d.gate_passed} ({d.gate_source}); {direction} {d.metric} is better."
    )
    uri = registry.resolved_tracking_uri()
    metadata: dict[str, Any] = {
        "registered_model": m.name,
        "version": int(m.version),
        "model_uri": m.model_uri,
        "alias": m.alias,
        "promoted": d.promoted,
        "new_version": m.created,
        "decision": dg.MetadataValue.md(decision),
        "mlflow_run_id": m.run_id or "",
        "source": m.source,
        "tracking_uri": m.tracking_uri,
        "lineage": dg.MetadataValue.json(result.tags),
    }
    if result.run_url:
        metadata["mlflow_run"] = dg.MetadataValue.url(result.run_url)
    if result.version_url:
        metadata["mlflow_version"] = dg.MetadataValue.url(result.version_url)
    if not is_remote(uri):
        metadata["open_in_mlflow"] = f"mlflow ui --backend-store-uri {redact_uri(uri)}"
    return metadata


def upstream_kinds(workflow: Workflow) -> tuple[str, ...]:
    """Every asset of the workflow registration depends on: the whole lineage, in graph order."""
    return (
        "base_model",
        "dataset",
        *workflow.kinds,
        "checkpoints",
        "trained_weights",
        *workflow.train_outputs,
        "eval_report",
    )


def registered_model_asset(workflow: Workflow, placement: Placement = WORKFLOW) -> dg.AssetsDefinition:
    """In a sweep (a partitioned placement) each configuration registers without taking the champion
    alias, and one that failed its gate registers nothing (the report ranks it last); the sweep report
    promotes the best."""
    kinds = upstream_kinds(workflow)
    sweep = placement.partitions is not None

    @workflow_asset(
        workflow,
        "registered_model",
        placement=placement,
        ins=kinds,
        kinds={"mlflow"},
        description="The trained LoRA adapter as a version in the MLflow model registry, with full lineage; "
        "refused when the eval report failed its gate; alias champion when it beats the current champion, "
        "else challenger.",
    )
    def registered_model(
        context: dg.AssetExecutionContext,
        config: Any,
        registry: MlflowRegistry,
        base_model: BaseModelManifest,
        dataset: DatasetManifest,
        checkpoints: CheckpointsManifest,
        trained_weights: WeightsManifest,
        eval_report: EvalManifest,
        **inputs: Manifest,
    ) -> Manifest:
        if sweep and not eval_gate(eval_report).passed:
            reason = f"not registered: {eval_gate(eval_report).source}"
            context.log.info(reason)
            context.add_output_metadata({"not_registered": reason})
            return NotUsedManifest(reason=reason)
        lower_is_better, direction_source = primary_metric_direction(eval_report)
        model = TrainedModel(
            workflow=workflow.name,
            base_model=base_model,
            dataset=dataset,
            checkpoints=checkpoints,
            weights=trained_weights,
            eval_report=eval_report,
            inputs=inputs,
            lower_is_better=lower_is_better,
        )
        name = config.registered_model_name or derive_model_name(workflow.name, base_model, dataset)
        provenance = Provenance(
            dagster_run_id=context.run_id,
            dagster_run_url=registry.dagster_run_url(context.run_id),
            upstream=_upstream_runs(
                context,
                [placement.key(workflow, kind) for kind in kinds],
                frozenset(placement.key(workflow, kind) for kind in kinds if placement.owns(kind)),
            ),
            config=_run_config(context, workflow),
        )
        store = registry.registry()
        context.log.info(
            f"registering {name} in {store.display_uri} "
            f"({eval_report.primary_metric} direction from {direction_source})"
        )
        try:
            result = register_trained_model(
                store,
                model,
                provenance,
                name=name,
                experiment_name=registry.resolved_experiment_name(),
                run_name=config.mlflow_run_name or f"{workflow.name}-{context.run_id[:8]}",
                rename_run=config.mlflow_run_name is not None,
                promote=not sweep,
                log=context.log.info,
            )
        except RegistryError as err:
            raise dg.Failure(description=str(err), allow_retries=False) from err
        telemetry.emit_model_registered(result.manifest.name, result.manifest.version, result.manifest.alias)
        context.add_output_metadata(_metadata(result, registry))
        return result.manifest

    return registered_model
