"""kill -9 a real ``kitchen run`` mid-training, run the same command again, compare with an uninterrupted run.

    python scripts/kill_resume.py          # the packaged SmolLM2, 8 steps, killed after the first checkpoint
    python scripts/kill_resume.py --max-steps 12 --save-every 4 -- --batch-size 8

Two fresh Kitchen homes under ``--root`` (a temporary directory by default; the second shares the first's
dequantized model): one run straight through; one started, SIGKILLed once its ledger holds a checkpoint and
before its last step, and started again with the same flags. Prints the largest absolute difference over
every LoRA tensor of the two final adapters, whether the metrics histories match, and how many versions
the killed home registered. Exit status 0 when the difference is within ``--tolerance``.
``tests/test_kill_resume.py`` checks the same on the tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

REPO = Path(__file__).resolve().parents[1]
TIMINGS = {"step_seconds", "tokens_per_second", "elapsed_seconds", "eta_seconds"}


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI")}
    env["KITCHEN_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def _command(workflow: str, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "kitchen.cli", "run", workflow, *flags]


def _run_dir(home: Path, workflow: str) -> Path | None:
    found = sorted((home / "runs" / workflow).glob("*/ledger.json"))
    return found[0].parent if found else None


def _ledger(home: Path, workflow: str) -> dict[str, Any]:
    found = _run_dir(home, workflow)
    try:
        return dict(json.loads((found / "ledger.json").read_text())) if found else {}
    except (OSError, ValueError):
        return {}


def _history(home: Path, workflow: str) -> list[dict[str, Any]]:
    found = _run_dir(home, workflow)
    lines = (found / "metrics.jsonl").read_text().splitlines() if found else []
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines if line.strip()]


def _adapter(home: Path, workflow: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    (uri,) = [c["path"] for c in _ledger(home, workflow)["checkpoints"] if c["kind"] == "sampler"]
    return dict(load_file(str(Path(unquote(urlparse(uri).path)) / "adapter_model.safetensors")))


def _registered_versions(home: Path) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    return sum(
        len(client.search_model_versions(f"name='{m.name}'")) for m in client.search_registered_models()
    )


def _straight(workflow: str, flags: list[str], home: Path) -> float:
    started = time.monotonic()
    subprocess.run(_command(workflow, flags), cwd=REPO, env=_env(home), check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def _killed_then_rerun(
    workflow: str, flags: list[str], home: Path, total: int, after: int
) -> tuple[int, int]:
    """(steps done when killed, the checkpoint step the rerun resumed from)."""
    proc = subprocess.Popen(_command(workflow, flags), cwd=REPO, env=_env(home), stdout=subprocess.DEVNULL)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the run ended (exit {proc.returncode}) before it could be killed")
        states = [c for c in _ledger(home, workflow).get("checkpoints", []) if c["kind"] == "state"]
        if any(c["step"] >= after for c in states):
            proc.send_signal(signal.SIGSTOP)
            done = len(_history(home, workflow))
            if done >= total:
                raise SystemExit("training finished before the kill; use more --max-steps")
            proc.kill()
            proc.wait()
            resumed_from = max(c["step"] for c in states)
            break
        time.sleep(0.05)
    print(f"killed (SIGKILL) after step {done}/{total}; latest checkpoint: step {resumed_from}", flush=True)
    subprocess.run(_command(workflow, flags), cwd=REPO, env=_env(home), check=True, stdout=subprocess.DEVNULL)
    return done, resumed_from


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflow", default="supervised")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--save-every", type=int, default=3)
    parser.add_argument("--kill-after-step", type=int, default=None, help="default: the first checkpoint")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument("--root", type=Path, default=None, help="where the two homes go (kept)")
    parser.add_argument("flags", nargs="*", help="more `kitchen run` flags (after --)")
    args = parser.parse_args()
    flags = [
        "--max-steps",
        str(args.max_steps),
        "--save-every",
        str(args.save_every),
        "--batch-size",
        "4",
        "--eval-examples",
        "10",
        "--gate-metric",
        "nll",
        "--gate-margin",
        "0",
        *args.flags,
    ]
    root = args.root or Path(tempfile.mkdtemp(prefix="kitchen-kill-resume-"))
    straight_home, killed_home = root / "uninterrupted", root / "killed"
    print(f"kitchen run {args.workflow} {' '.join(flags)}   (homes under {root})", flush=True)
    seconds = _straight(args.workflow, flags, straight_home)
    print(f"uninterrupted run: {seconds:.0f}s", flush=True)
    killed_home.mkdir(parents=True, exist_ok=True)
    if (straight_home / "models").is_dir() and not (killed_home / "models").exists():
        (killed_home / "models").symlink_to(straight_home / "models")  # dequantize the packaged model once
    after = args.kill_after_step or args.save_every
    done, resumed = _killed_then_rerun(args.workflow, flags, killed_home, args.max_steps, after)

    a, b = _adapter(straight_home, args.workflow), _adapter(killed_home, args.workflow)
    if sorted(a) != sorted(b):
        raise SystemExit("the two adapters hold different tensors")
    difference = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    same_history = _history(straight_home, args.workflow) == _history(killed_home, args.workflow)
    versions = _registered_versions(killed_home)
    print(f"LoRA tensors compared: {len(a)}")
    print(f"max abs difference (killed after step {done}, resumed from step {resumed}): {difference:.3g}")
    print(f"metrics history identical: {same_history}")
    print(f"registered versions in the killed home: {versions}")
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if difference <= args.tolerance and same_history and versions == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
