"""Stores asset outputs as readable JSON manifests under ``KITCHEN_HOME/manifests`` (never pickles).

Every materialisation writes its own file, ``<workflow>/<kind>/<run_id>.json``, and records that path as
the materialisation's ``manifest`` metadata; ``<workflow>/<kind>.json`` is a copy of the latest, replaced
atomically. A load reads the materialisation the run depends on: the one this run (or the run it
re-executes) produced, else the latest the instance records. So two runs at once (a sensor's and a
``kitchen run``, two users on one home) never read each other's manifests.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import dagster as dg

from kitchen import manifests
from kitchen.home import home_dir

MANIFEST_METADATA = "manifest"


def manifest_path(asset_key: dg.AssetKey, root: Path | None = None, run_id: str | None = None) -> Path:
    """The latest manifest of ``asset_key`` or, with ``run_id``, the one that run materialised."""
    base = (root or home_dir("manifests")).joinpath(*asset_key.path)
    return base / f"{run_id}.json" if run_id else base.with_suffix(".json")


def read_manifest(asset_key: dg.AssetKey, root: Path | None = None) -> manifests.Manifest:
    """Load the latest stored manifest for ``asset_key``."""
    path = manifest_path(asset_key, root)
    if not path.is_file():
        raise FileNotFoundError(f"no manifest for asset {asset_key.to_user_string()} at {path}")
    return manifests.read_manifest_file(path)


def recorded_manifest_path(event: dg.EventLogEntry | None) -> str | None:
    """The manifest path a materialisation event recorded, if any."""
    materialization = event.asset_materialization if event is not None else None
    entry = materialization.metadata.get(MANIFEST_METADATA) if materialization is not None else None
    value = getattr(entry, "value", None) if entry is not None else None
    return str(value) if value else None


def latest_materialization(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str | None = None
) -> dg.EventLogEntry | None:
    """The latest materialisation of ``asset_key`` (of one ``partition`` of it, when given)."""
    if partition is None:
        return instance.get_latest_materialization_event(asset_key)
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition]), limit=1
    ).records
    return records[0].event_log_entry if records else None


def source_materialization(
    instance: dg.DagsterInstance, run: dg.DagsterRun, asset_key: dg.AssetKey, partition: str | None = None
) -> dg.EventLogEntry | None:
    """The materialisation of ``asset_key`` (its ``partition``) that ``run`` depends on: its own, else that
    of the run it re-executes (and so on up), else the latest the instance records."""
    seen: set[str] = set()
    current: dg.DagsterRun | None = run
    while current is not None and current.run_id not in seen:
        seen.add(current.run_id)
        found = None
        for entry in instance.all_logs(current.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
            made = entry.asset_materialization
            if made is not None and made.asset_key == asset_key and (partition in (None, made.partition)):
                found = entry
        if found is not None:
            return found
        current = instance.get_run_by_id(current.parent_run_id) if current.parent_run_id else None
    return latest_materialization(instance, asset_key, partition)


def _write_atomic(path: Path, text: str) -> None:
    """Write-then-rename through a name no other writer uses, so concurrent writers never interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ManifestIOManager(dg.ConfigurableIOManager):
    """Each materialisation's manifest is its own JSON file (per run); the latest is copied beside it."""

    root: str | None = None

    def _root(self) -> Path | None:
        return Path(self.root) if self.root else None

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        if not isinstance(obj, manifests.Manifest):
            raise TypeError(f"{context.asset_key}: assets must return a kitchen manifest, got {type(obj)}")
        text = json.dumps(manifests.manifest_payload(obj), indent=2)
        path = manifest_path(context.asset_key, self._root(), context.run_id)
        _write_atomic(path, text)
        _write_atomic(manifest_path(context.asset_key, self._root()), text)
        context.add_output_metadata({MANIFEST_METADATA: dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> Any:
        key = context.asset_key
        producer = _producing_run(context)
        if producer is not None:  # produced in this run, or in the run this one re-executes
            path = manifest_path(key, self._root(), producer)
            if path.is_file():
                return manifests.read_manifest_file(path)
        else:  # not part of this run: the latest materialisation the instance records (of the partition)
            partition = context.asset_partition_key if context.has_asset_partitions else None
            recorded = recorded_manifest_path(latest_materialization(context.instance, key, partition))
            if recorded and Path(recorded).is_file():
                return manifests.read_manifest_file(recorded)
            if partition is not None:
                raise FileNotFoundError(
                    f"no manifest for {key.to_user_string()} partition {partition!r}: materialise it first"
                )
        return read_manifest(key, self._root())  # materialised before per-run manifests, or elsewhere


def _producing_run(context: dg.InputContext) -> str | None:
    """The run whose step output this input is, when Dagster knows it (None for an asset loaded from
    outside the run)."""
    upstream = context.upstream_output
    if upstream is None:
        return None
    try:
        return upstream.run_id
    except dg.DagsterInvariantViolationError:
        return None
