"""A harness for tests that run ``kitchen run <workflow>`` as a real process and interrupt it: flags from a
workflow's smoke config, the environment of a fresh ``KITCHEN_HOME``, waiting until training is under way
(read from the loop's own ledger and metrics files), and reading back what a run wrote.

Everything is keyed by the workflow's name, so a new workflow gets the kill/resume guarantees tested by
adding it to the parametrisation (``tests/test_kill_resume.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

REPO = Path(__file__).resolve().parents[1]
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def cli_flags(config: Mapping[str, Any]) -> list[str]:
    """``kitchen run`` flags for a flat run config (the generated flags: ``--field-name value``)."""
    flags: list[str] = []
    for name, value in config.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, list | tuple):
            flags += [flag, ",".join(map(str, value))]
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def smoke_flags(workflow: str, model_dir: Path, **overrides: Any) -> list[str]:
    """The workflow's own smoke config on ``model_dir``, with ``overrides``, as flags."""
    from kitchen.workflows import get_workflow

    smoke = get_workflow(workflow).smoke_config
    assert smoke is not None, f"workflow {workflow} has no smoke_config"
    return cli_flags({**smoke(str(model_dir)), **overrides})


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """A fresh Kitchen home (its Dagster instance and MLflow store inside it) for a CLI process."""
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI")}
    env.update(KITCHEN_HOME=str(home), PYTHONPATH=str(REPO), COLUMNS="400", **extra)
    return env


def start_run(workflow: str, flags: list[str], home: Path, **extra_env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kitchen.cli", "run", workflow, *flags],
        cwd=REPO,
        env=cli_env(home, **extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str

    def explain(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-4000:]}"


def finish(proc: subprocess.Popen[str], timeout: float = 600) -> Finished:
    out, err = proc.communicate(timeout=timeout)
    return Finished(proc.returncode, out, err)


def run_cli(workflow: str, flags: list[str], home: Path, timeout: float = 600) -> Finished:
    return finish(start_run(workflow, flags, home), timeout)


# -- what the training loop wrote -------------------------------------------------------------------------


def run_dir(home: Path, workflow: str) -> Path | None:
    """The run directory of the (one) training run under ``home``, once its ledger exists."""
    ledgers = sorted((home / "runs" / workflow).glob("*/ledger.json"))
    return ledgers[0].parent if ledgers else None


def ledger(home: Path, workflow: str) -> dict[str, Any]:
    found = run_dir(home, workflow)
    if found is None:
        return {}
    try:
        return dict(json.loads((found / "ledger.json").read_text()))
    except (OSError, ValueError):
        return {}  # between the write and the rename of a concurrent writer: try again


def state_checkpoints(home: Path, workflow: str) -> list[dict[str, Any]]:
    return [c for c in ledger(home, workflow).get("checkpoints", []) if c["kind"] == "state"]


def metrics_history(home: Path, workflow: str) -> list[dict[str, Any]]:
    found = run_dir(home, workflow)
    if found is None or not (found / "metrics.jsonl").is_file():
        return []
    return [json.loads(line) for line in (found / "metrics.jsonl").read_text().splitlines() if line.strip()]


def steps_done(home: Path, workflow: str) -> int:
    return len(metrics_history(home, workflow))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for_checkpoint(
    pid: int, home: Path, workflow: str, after_step: int = 0, timeout: float = 300
) -> None:
    """Return as soon as the ledger holds a state checkpoint later than ``after_step`` (the run is
    training and has something to resume from), with process ``pid`` paused (SIGSTOP) so the caller can
    check that it is still mid-training before signalling it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise AssertionError(f"process {pid} ended before a checkpoint after step {after_step}")
        if any(c["step"] > after_step for c in state_checkpoints(home, workflow)):
            os.kill(pid, signal.SIGSTOP)
            return
        time.sleep(0.01)
    raise TimeoutError(f"no checkpoint after step {after_step} within {timeout:.0f}s")


@dataclass(frozen=True)
class Interrupted:
    steps_done: int
    checkpoint_step: int
    checkpoint: str
    signalled_at: float


def signal_mid_training(
    pid: int, home: Path, workflow: str, sig: int, total_steps: int, after_step: int = 0
) -> Interrupted:
    """Deliver ``sig`` to ``pid`` while its training is between a checkpoint and its last step; returns
    where training was."""
    wait_for_checkpoint(pid, home, workflow, after_step)
    done = steps_done(home, workflow)
    latest = max(state_checkpoints(home, workflow), key=lambda c: int(c["step"]))
    assert done < total_steps and not ledger(home, workflow).get("complete"), (
        f"training had finished ({done}/{total_steps} steps) before it could be interrupted"
    )
    os.kill(pid, sig)
    signalled = time.monotonic()
    with contextlib.suppress(ProcessLookupError):  # a killed process may be gone already
        os.kill(pid, signal.SIGCONT)
    return Interrupted(done, int(latest["step"]), str(latest["path"]), signalled)


# -- what a finished run left ---------------------------------------------------------------------------


def uri_path(uri: str) -> Path:
    parsed = urlparse(uri)
    assert parsed.scheme == "file", uri
    return Path(unquote(parsed.path))


def final_sampler(home: Path, workflow: str) -> str:
    (final,) = [c["path"] for c in ledger(home, workflow)["checkpoints"] if c["kind"] == "sampler"]
    return str(final)


def adapter_tensors(sampler_uri: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return dict(load_file(str(uri_path(sampler_uri) / "adapter_model.safetensors")))


def max_abs_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    assert sorted(a) == sorted(b), "the adapters hold different tensors"
    return max(float((a[name].double() - b[name].double()).abs().max()) for name in a)


def adapter_file_hashes(directory: Path) -> dict[str, str]:
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in ADAPTER_FILES}


def telemetry(home: Path, run_id: str) -> list[dict[str, Any]]:
    path = home / "telemetry" / f"{run_id}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trained_sampler_of_run(home: Path, run_id: str) -> str:
    """The final sampler weights a run's training loop reported (its telemetry, not its manifests)."""
    (uri,) = [
        e["metadata"]["uri"]
        for e in telemetry(home, run_id)
        if e["name"] == "kitchen.training.checkpoint" and e["metadata"].get("kind") == "sampler"
    ]
    return str(uri)


def without_timings(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A metrics history with the wall-clock fields removed (what must match between runs)."""
    timing = {"step_seconds", "tokens_per_second", "elapsed_seconds", "eta_seconds"}
    return [{k: v for k, v in record.items() if k not in timing} for record in history]


def collapse(text: str) -> str:
    """Terminal output with line wrapping undone (for matching long paths)."""
    return " ".join(text.split())
