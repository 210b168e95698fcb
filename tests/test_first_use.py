"""First use of every store under a fresh KITCHEN_HOME is safe when several processes start together.

Real processes (tests/first_use_worker.py), released together once all are imported: the Dagster
instance, the MLflow SQLite store and its experiment, the packaged-model cache and the datasets cache.
Before the locks, two processes initialising one Dagster instance failed one of them with sqlite's
``table ... already exists``, two opening a fresh MLflow database raced through its migrations, and
two resolving the packaged model both dequantized it into the same directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kitchen.cli.instance import DAGSTER_INSTANCE_SETTINGS
from kitchen.locks import file_lock, once

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "first_use_worker.py"
PROCESSES = 2  # what a user starts: two `kitchen run`s at once


def _together(scenario: str, home: Path, sync: Path, processes: int = PROCESSES) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI")}
    env.update(KITCHEN_HOME=str(home), PYTHONPATH=str(REPO), KITCHEN_TELEMETRY_SINKS="none")
    sync.mkdir(parents=True, exist_ok=True)
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(sync), str(processes)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    failures = [err[-3000:] for p, (_, err) in zip(procs, outputs, strict=True) if p.returncode != 0]
    assert not failures, "\n\n".join(failures)
    return [json.loads(out.strip().splitlines()[-1])[scenario] for out, _ in outputs]


def test_the_dagster_instance_on_a_fresh_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    results = _together("dagster", home, tmp_path / "sync")
    assert len({r["dagster_home"] for r in results}) == 1
    assert len({r["run_id"] for r in results}) == PROCESSES  # each ran on the one instance
    dagster_home = home / "dagster"
    assert (dagster_home / "dagster.yaml").read_text() == DAGSTER_INSTANCE_SETTINGS

    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(dagster_home)
    try:
        with dg.DagsterInstance.get() as instance:
            assert {r.run_id for r in instance.get_runs()} == {r["run_id"] for r in results}
    finally:
        del os.environ["DAGSTER_HOME"]


def test_the_mlflow_store_on_a_fresh_home(tmp_path: Path) -> None:
    results = _together("mlflow", tmp_path / "home", tmp_path / "sync")
    assert len({r["experiment"] for r in results}) == 1  # one experiment, not one per process
    assert len({r["mlflow_run"] for r in results}) == PROCESSES
    assert (tmp_path / "home" / "mlflow.db").is_file()


def test_the_packaged_model_is_dequantized_once(tmp_path: Path) -> None:
    sync = tmp_path / "sync"
    sync.mkdir()
    (sync / "fake.gguf").write_bytes(b"gguf bytes")
    results = _together("model", tmp_path / "home", sync)
    assert len((sync / "dequantize-calls").read_text().split()) == 1
    assert len({r["path"] for r in results}) == 1 and len({r["content_hash"] for r in results}) == 1


def test_the_datasets_cache_and_saved_dataset(tmp_path: Path) -> None:
    from datasets import Dataset

    sync = tmp_path / "sync"
    sync.mkdir()
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(12)]
    Dataset.from_list(rows).to_parquet(str(sync / "rows.parquet"))
    results = _together("dataset", tmp_path / "home", sync)
    assert len({r["path"] for r in results}) == 1 and len({r["content_hash"] for r in results}) == 1
    saved = tmp_path / "home" / "datasets"
    assert [p.name for p in saved.iterdir()] == [Path(results[0]["path"]).name]  # no staging left


# -- the helper itself ---------------------------------------------------------------------------------


def test_a_lock_that_is_held_times_out_naming_its_file(tmp_path: Path) -> None:
    lock = tmp_path / ".store.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from kitchen.locks import file_lock\n"
            "with file_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(30)",
            str(lock),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"\.store\.lock"), file_lock(lock, timeout_s=0.5):
            pass
        assert 0.4 < time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()
    with file_lock(lock, timeout_s=5):  # a killed holder's lock is released by the kernel
        pass


def test_once_runs_only_when_not_done(tmp_path: Path) -> None:
    made: list[int] = []
    target = tmp_path / "made"

    def make() -> int:
        target.touch()
        made.append(1)
        return 7

    assert once(target.exists, make, tmp_path / ".made.lock") == 7
    assert once(target.exists, make, tmp_path / ".made.lock") is None
    assert made == [1]
