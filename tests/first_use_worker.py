"""One of several processes started together on a fresh KITCHEN_HOME (tests/test_first_use.py).

    python tests/first_use_worker.py SCENARIO SYNC_DIR PROCESSES

Imports everything first, then waits until every process is ready, so their first uses of the stores
overlap as closely as separate processes can; prints one JSON line with what it got.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any


def _barrier(sync: Path, processes: int) -> None:
    (sync / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while len(list(sync.glob("ready-*"))) < processes:
        if time.monotonic() > deadline:
            raise TimeoutError("the other processes never became ready")
        time.sleep(0.005)


def dagster(sync: Path, processes: int) -> dict[str, Any]:
    """The Dagster instance as ``kitchen run`` prepares it, then a run on it."""
    import dagster as dg

    from kitchen.cli.instance import prepare_dagster_home

    @dg.asset
    def marker() -> int:
        return 1

    _barrier(sync, processes)
    home = prepare_dagster_home()
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize([marker], instance=instance)
        assert result.success
    return {"dagster_home": str(home), "run_id": result.run_id}


def mlflow(sync: Path, processes: int) -> dict[str, Any]:
    """The MLflow SQLite store as the telemetry sink first opens it (its run for a Dagster run, in the
    default experiment), then as the registry does."""
    from kitchen.registry.store import ModelRegistry, default_tracking_uri
    from kitchen.telemetry.sinks.mlflow import mlflow_run_for_dagster_run

    _barrier(sync, processes)
    mlflow_run = mlflow_run_for_dagster_run(uuid.uuid4().hex, workflow="first-use")
    experiment = ModelRegistry(default_tracking_uri()).experiment_id("kitchen")
    return {"experiment": experiment, "mlflow_run": mlflow_run}


def model(sync: Path, processes: int) -> dict[str, Any]:
    """The packaged model's cache, with the 40 s dequantization replaced by a slow fake that records
    each call."""
    import kitchen.models.base as base

    gguf = sync / "fake.gguf"
    calls = sync / "dequantize-calls"

    def fake_dequantize(source: Path, target: Path, *, source_hash: str) -> None:
        with calls.open("a") as log:
            log.write(f"{os.getpid()}\n")
        staging = target.parent / f".{target.name}-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        time.sleep(1.0)  # long enough for every other process to find the cache missing
        (staging / base._INFO_FILE).write_text(
            json.dumps({"content_hash": source_hash, "num_parameters": 1, "architecture": "Fake"})
        )
        staging.rename(target)

    base._packaged_gguf = lambda: gguf  # type: ignore[assignment]
    base._dequantize_gguf = fake_dequantize  # type: ignore[assignment]
    _barrier(sync, processes)
    manifest = base.resolve_base_model(base.DEFAULT_MODEL)
    return {"path": manifest.path, "content_hash": manifest.content_hash}


def dataset(sync: Path, processes: int) -> dict[str, Any]:
    """A Parquet file through the shared datasets cache, then saved under the Kitchen home."""
    from kitchen.data.sources import load_dataset_source, save_dataset

    _barrier(sync, processes)
    loaded = load_dataset_source(str(sync / "rows.parquet"), test_size=2)
    return {"path": str(save_dataset(loaded)), "content_hash": loaded.content_hash}


if __name__ == "__main__":
    scenario, sync_dir, count = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    print(json.dumps({scenario: globals()[scenario](sync_dir, count)}), flush=True)
