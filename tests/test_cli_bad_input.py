"""Bad input to ``kitchen run`` is one clear line, before any expensive step.

The dataset is loaded the way the workflow's ``dataset`` asset loads it before the base model is resolved:
with the default (packaged) model, a bad dataset used to be reported after SmolLM2 had been dequantized,
as Dagster's stack trace. Now: one line naming what is wrong and what to do, exit 1, no model resolved,
no Dagster run; the traceback in the run's log (or on the terminal with ``--verbose``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kitchen.cli import main
from kitchen.workflows import workflows
from tests.cli_runs import run_cli


def _bad_sources(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (the --dataset value, what the line must say)."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    shapeless = tmp_path / "shapeless.jsonl"
    shapeless.write_text("".join(json.dumps({"colour": f"c{i}"}) + "\n" for i in range(20)))
    return {
        "empty file": (str(empty), "is empty"),
        "no usable row": (str(shapeless), "shapeless.jsonl"),
        "unknown source": ("no/such-dataset-anywhere", "no/such-dataset-anywhere"),
        "missing file": (str(tmp_path / "missing.jsonl"), "no such file or directory"),
    }


def _no_runs(dagster_home: Path) -> bool:
    """No Dagster run was launched in the CLI's instance."""
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home))) as instance:
        return instance.get_runs() == []


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("workflow", sorted(w.name for w in workflows()))
@pytest.mark.parametrize("case", ["empty file", "no usable row", "unknown source", "missing file"])
def test_a_bad_dataset_is_one_line_before_the_model_resolves(
    workflow: str,
    case: str,
    tmp_path: Path,
    kitchen_home: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In process (``kitchen.cli.main``), every workflow: the default, packaged model is never touched."""
    monkeypatch.setenv("DAGSTER_HOME", str(kitchen_home / "dagster"))  # the CLI sets it; undone after
    source, says = _bad_sources(tmp_path)[case]
    assert main(["run", workflow, "--dataset", source]) == 1
    out, err = capfd.readouterr()
    line = _one_line(err)
    assert line.startswith("kitchen: dataset ") and says in line and "--dataset" in line, line
    assert "Traceback" not in out + err
    assert not (kitchen_home / "models").exists()  # the packaged model was not dequantized
    assert _no_runs(kitchen_home / "dagster")
    log = Path(line.rsplit("traceback: ", 1)[1].rstrip(")"))
    assert "Traceback" in log.read_text()


def test_the_command_exits_1_with_one_line(tmp_path: Path) -> None:
    source, _ = _bad_sources(tmp_path)["empty file"]
    home = tmp_path / "home"
    started = time.monotonic()
    done = run_cli("supervised", ["--dataset", source], home, timeout=300)
    assert done.returncode == 1, done.explain()
    assert _one_line(done.stderr).startswith("kitchen: dataset ") and done.stdout == ""
    assert not (home / "models").exists() and _no_runs(home / "dagster")
    print(f"bad dataset reported in {time.monotonic() - started:.1f}s (process start included)")


def test_verbose_shows_the_traceback(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    source, _ = _bad_sources(tmp_path)["empty file"]
    assert main(["run", "supervised", "--dataset", source, "--verbose"]) == 1
    err = capfd.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("kitchen: dataset ")
