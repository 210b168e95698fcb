"""Interrupting a run mid-training and running it again gives the uninterrupted run's weights.

- ``kill -9`` of ``kitchen run``: the same command resumes from the last checkpoint, says so (terminal and
  the ``checkpoints`` asset's metadata), and ends with the same LoRA tensors (max abs difference <= 1e-6),
  the same metrics history and exactly one registered version.
- Ctrl-C (SIGINT) of ``kitchen run``: it stops within seconds, exits non-zero with one line, leaves the
  run marked failed, and the same command resumes to the same weights.
- ``kill -9`` of a Dagster run worker under ``dagster dev`` (run retries on): the instance marks the run
  failed, the run-retry daemon re-executes it from the failure, and the retry resumes to the same weights.

The kill -9 test is parametrised by workflow (the other two run for ``supervised``): ``KILL_RESUME`` maps
a workflow to the overrides of its ``smoke_config`` that make a run long enough to interrupt (checkpoints
every few steps). A new workflow (RL: its sampling state rides in the plan state of each checkpoint) gets
these guarantees tested by adding its entry.
"""

from __future__ import annotations

import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.instance.ref import InstanceRef

from kitchen.registry import ModelRegistry
from kitchen.workflows import get_workflow
from tests.cli_runs import (
    Finished,
    adapter_tensors,
    collapse,
    final_sampler,
    finish,
    ledger,
    max_abs_difference,
    metrics_history,
    run_cli,
    signal_mid_training,
    smoke_flags,
    start_run,
    without_timings,
)

#: workflow -> overrides of its smoke config: enough steps to interrupt between two checkpoints.
KILL_RESUME: dict[str, dict[str, Any]] = {
    "supervised": {"max_rows": 200, "max_steps": 24, "save_every": 4},
    "rl": {"max_steps": 16, "save_every": 4},
    "dpo": {"max_rows": 96, "max_steps": 24, "save_every": 4},
}
TOLERANCE = 1e-6
CTRL_C_SECONDS = 30  # generous for a loaded 2-core machine; the measured time is printed
#: Stopping on a signal and Dagster's run retry do not depend on the workflow (the resume they lead to is
#: the plan's, which the kill -9 test checks for every workflow), so they run for one workflow: each
#: costs about a minute of CI per workflow.
SIGNALLED = pytest.mark.parametrize("workflow", ["supervised"], scope="module")


def _total_steps(workflow: str) -> int:
    return int(KILL_RESUME[workflow]["max_steps"])


def _flags(workflow: str, model_dir: Path) -> list[str]:
    return smoke_flags(workflow, model_dir, **KILL_RESUME[workflow])


@dataclass(frozen=True)
class Reference:
    adapter: dict[str, Any]
    history: list[dict[str, Any]]


@pytest.fixture(scope="module", params=sorted(KILL_RESUME))
def workflow(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def reference(workflow: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The uninterrupted run, through the same command."""
    home = tmp_path_factory.mktemp(f"{workflow}-uninterrupted")
    done = run_cli(workflow, _flags(workflow, tiny_model_dir), home)
    assert done.returncode == 0, done.explain()
    assert "resum" not in done.stdout
    return Reference(adapter_tensors(final_sampler(home, workflow)), metrics_history(home, workflow))


def _instance(home: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))


def _checkpoints_metadata(instance: dg.DagsterInstance, workflow: str) -> dict[str, Any]:
    event = instance.get_latest_materialization_event(dg.AssetKey([workflow, "checkpoints"]))
    assert event is not None and event.asset_materialization is not None
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def _registered_versions(home: Path) -> list[Any]:
    registry = ModelRegistry(f"sqlite:///{home / 'mlflow.db'}")
    return [
        version
        for model in registry.client.search_registered_models()
        for version in registry.client.search_model_versions(f"name='{model.name}'")
    ]


def _assert_same_as_reference(home: Path, workflow: str, reference: Reference) -> float:
    difference = max_abs_difference(adapter_tensors(final_sampler(home, workflow)), reference.adapter)
    assert difference <= TOLERANCE
    resumed, straight = without_timings(metrics_history(home, workflow)), without_timings(reference.history)
    assert [m["step"] for m in resumed] == [m["step"] for m in straight]
    assert _close(resumed, straight)
    assert len(_registered_versions(home)) == 1
    return difference


def _close(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Equal records, floats within 1e-6 (relative)."""
    assert len(a) == len(b)
    for left, right in zip(a, b, strict=True):
        assert left.keys() == right.keys()
        for key in left:
            x, y = left[key], right[key]
            if isinstance(x, dict):
                assert _close([x], [y])
            elif isinstance(x, float) and isinstance(y, float):
                assert x == pytest.approx(y, rel=1e-6, abs=1e-9), (key, left["step"])
            else:
                assert x == y, (key, left["step"])
    return True


def _assert_said_resumed(rerun: Finished, home: Path, workflow: str, step: int, checkpoint: str) -> None:
    out = collapse(rerun.stdout)
    assert f"resuming at step {step}/{_total_steps(workflow)} from {checkpoint}" in out, rerun.explain()
    assert f"resumed from checkpoint step {step}: {checkpoint}" in out, rerun.explain()
    with _instance(home / "dagster") as instance:
        metadata = _checkpoints_metadata(instance, workflow)
    assert metadata["resumed"] is True and metadata["resumed_from"] == f"step {step}: {checkpoint}"


def test_kill_9_mid_training_resumes_to_the_uninterrupted_weights(
    workflow: str, reference: Reference, tiny_model_dir: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    proc = start_run(workflow, _flags(workflow, tiny_model_dir), home)
    at = signal_mid_training(proc.pid, home, workflow, signal.SIGKILL, _total_steps(workflow))
    assert finish(proc, timeout=60).returncode == -signal.SIGKILL

    rerun = run_cli(workflow, _flags(workflow, tiny_model_dir), home)
    assert rerun.returncode == 0, rerun.explain()
    _assert_said_resumed(rerun, home, workflow, at.checkpoint_step, at.checkpoint)
    difference = _assert_same_as_reference(home, workflow, reference)
    print(
        f"{workflow}: killed after step {at.steps_done}, resumed at {at.checkpoint_step}; "
        f"max |diff| {difference}"
    )


@SIGNALLED
def test_ctrl_c_stops_within_seconds_and_the_same_command_resumes(
    workflow: str, reference: Reference, tiny_model_dir: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    proc = start_run(workflow, _flags(workflow, tiny_model_dir), home)
    at = signal_mid_training(proc.pid, home, workflow, signal.SIGINT, _total_steps(workflow))
    stopped = finish(proc, timeout=120)
    seconds = time.monotonic() - at.signalled_at
    assert stopped.returncode not in (0, None), stopped.explain()
    lines = [line for line in stopped.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stopped.explain()
    assert lines[0].startswith("kitchen: ") and "interrupted" in lines[0], lines[0]
    assert not ledger(home, workflow).get("complete")
    latest = max(
        (c for c in ledger(home, workflow)["checkpoints"] if c["kind"] == "state"), key=lambda c: c["step"]
    )
    assert f"resumes from the checkpoint at step {latest['step']}" in lines[0], lines[0]
    assert seconds < CTRL_C_SECONDS, f"took {seconds:.1f}s to stop"
    with _instance(home / "dagster") as instance:
        (run,) = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.FAILURE  # recorded as ended, not left STARTED

    rerun = run_cli(workflow, _flags(workflow, tiny_model_dir), home)
    assert rerun.returncode == 0, rerun.explain()
    _assert_said_resumed(rerun, home, workflow, int(latest["step"]), str(latest["path"]))
    difference = _assert_same_as_reference(home, workflow, reference)
    print(f"{workflow}: Ctrl-C after step {at.steps_done} stopped in {seconds:.1f}s; max |diff| {difference}")


# -- a Dagster run worker killed under `dagster dev` ------------------------------------------------------


def _worker_pid(server: Any, run_id: str) -> int | None:
    data = server.graphql(
        "query($id: ID!) { logsForRun(runId: $id) { ... on EventConnection { events { "
        "__typename ... on EngineEvent { message } } } } }",
        {"id": run_id},
    )
    for event in data["logsForRun"]["events"]:
        found = re.search(r"Started process for run \(pid: (\d+)\)", event.get("message") or "")
        if found:
            return int(found.group(1))
    return None


@SIGNALLED
def test_a_killed_run_worker_is_retried_and_resumes_under_dagster_dev(
    workflow: str, reference: Reference, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from tests.test_ui_browser import LOCATION, DagsterDev, _finished, _runs, _wait_for

    server = DagsterDev(tmp_path, {"DAGSTER_TELEMETRY_DISABLED": "1"})
    home = tmp_path / "kitchen"
    smoke = get_workflow(workflow).smoke_config
    assert smoke is not None
    try:
        server.start()
        launched = server.graphql(
            """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
                 __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
                 ... on RunConfigValidationInvalid { errors { message } } } }""",
            {
                "params": {
                    "selector": {**LOCATION, "jobName": f"{workflow}_job"},
                    "runConfigData": {**smoke(str(tiny_model_dir)), **KILL_RESUME[workflow]},
                }
            },
        )["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        pid = _wait_for("the run worker's pid", lambda: _worker_pid(server, run_id), timeout=120, every=0.5)
        at = signal_mid_training(pid, home, workflow, signal.SIGKILL, _total_steps(workflow))

        assert _finished(server, run_id, timeout=120) == "FAILURE", server.log_tail()
        (retry,) = _wait_for(
            "the retry run", lambda: _runs(server, {"dagster/parent_run_id": run_id}), timeout=180
        )
        assert _finished(server, retry["runId"], timeout=600) == "SUCCESS", server.log_tail()
    except BaseException:
        print(server.log_tail())
        raise
    finally:
        server.stop()

    with _instance(tmp_path / "dagster") as instance:
        metadata = _checkpoints_metadata(instance, workflow)
        assert metadata["resumed"] is True
        assert metadata["resumed_from"] == f"step {at.checkpoint_step}: {at.checkpoint}"
        event = instance.get_latest_materialization_event(dg.AssetKey([workflow, "registered_model"]))
        assert event is not None and event.run_id == retry["runId"]
    difference = _assert_same_as_reference(home, workflow, reference)
    print(f"{workflow}: worker killed after step {at.steps_done}; the retry resumed; max |diff| {difference}")
