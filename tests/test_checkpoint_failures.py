"""A checkpoint that cannot be written (disk full, an unwritable ``KITCHEN_HOME``) fails the run naming the
checkpoint's path, never lands in the ledger half-written, and the same run resumes from the last good one.

Tests run as root here, so ``chmod`` cannot make a directory unwritable: the failures are injected
in-process where the local engine writes (the tensor writer raising ``ENOSPC`` as safetensors' writer does,
without a file name; the staging directory's creation raising ``EACCES``).
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

import resources.local_engine.checkpoints as checkpoints
from kitchen import atomic
from kitchen.cli.run import _step_failures
from kitchen.training.ledger import LEDGER_FILE
from kitchen_assets.definitions import build_definitions
from resources.local_engine.uris import path_from_uri
from tests.test_supervised_workflow import tiny_run_config

# 6 steps, checkpoints at 2 and 4, then the final state and sampler weights.
CONFIG = {"max_steps": 6, "epochs": 2, "save_every": 2}


def _run(model_dir: Path, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    job = build_definitions("local").resolve_job_def("supervised_job")
    return job.execute_in_process(
        run_config=tiny_run_config(model_dir, **CONFIG), instance=instance, raise_on_error=False
    )


def _fail_on_call(n: int, real: Callable[..., Any], error: OSError) -> Callable[..., Any]:
    calls = {"n": 0}

    def writer(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            raise error
        return real(*args, **kwargs)

    return writer


def _ledger(home: Path) -> dict[str, Any]:
    (path,) = (home / "runs" / "supervised").glob(f"*/{LEDGER_FILE}")
    return dict(json.loads(path.read_text()))


@pytest.mark.parametrize(
    ("target", "error", "says"),
    [
        ("save_file", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
        ("mkdtemp", PermissionError(errno.EACCES, os.strerror(errno.EACCES)), "Permission denied"),
    ],
    ids=["disk-full", "unwritable"],
)
def test_a_checkpoint_that_cannot_be_written_fails_naming_it_and_resumes(
    tiny_model_dir: Path,
    kitchen_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    target: str,
    error: OSError,
    says: str,
) -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        with monkeypatch.context() as fault:  # the second training-state write: the step-4 checkpoint
            if target == "mkdtemp":  # a training state's staging directory, not every atomic writer's
                state_only = _fail_on_call(2, tempfile.mkdtemp, error)

                def mkdtemp(*args: Any, **kwargs: Any) -> str:
                    writer = state_only if Path(kwargs["dir"]).name == "state" else tempfile.mkdtemp
                    return str(writer(*args, **kwargs))

                fault.setattr(atomic, "tempfile", types.SimpleNamespace(mkdtemp=mkdtemp))
            else:
                fault.setattr(checkpoints, target, _fail_on_call(2, getattr(checkpoints, target), error))
            failed = _run(tiny_model_dir, instance)
        assert not failed.success
        ((step, message),) = _step_failures(failed)
        assert step == "supervised__train"
        engine = kitchen_home / "engine"
        (session,) = [p for p in engine.iterdir() if p.is_dir()]
        assert f"{session / 'state' / 'step-000004'}" in message, message
        assert says in message and "KITCHEN_HOME" in message, message

        # The ledger names only checkpoints that were written whole; nothing of step 4 is left.
        ledger = _ledger(kitchen_home)
        assert [(c["step"], c["kind"]) for c in ledger["checkpoints"]] == [(2, "state")]
        for entry in ledger["checkpoints"]:
            checkpoints.read_training_state(path_from_uri(entry["path"]), with_optimizer=True)
        assert sorted(p.name for p in (session / "state").iterdir()) == ["step-000002"]

        resumed = _run(tiny_model_dir, instance)
        assert resumed.success
        (event,) = [
            e
            for e in resumed.get_asset_materialization_events()
            if e.asset_key == dg.AssetKey(["supervised", "checkpoints"])
        ]
        metadata = event.step_materialization_data.materialization.metadata
        assert metadata["resumed"].value is True
        assert str(metadata["resumed_from"].value).startswith("step 2: file://")
        assert _ledger(kitchen_home)["complete"] is True
