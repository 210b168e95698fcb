"""What ``kitchen run`` shows while a run executes: one line per stage and a training progress bar, drawn from
Kitchen's telemetry events (the same ones every sink receives), on the terminal the user started.

Everything else the libraries print (Dagster's event log, progress bars, lm-eval's chatter) goes to the
run's log file unless ``--verbose``; the last lines of it are shown when a run fails.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from kitchen import telemetry
from kitchen.telemetry import TelemetryEvent

_HANDLER = "kitchen-cli-progress"


def _fmt_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class RunProgress:
    """Stage lines and a progress bar from telemetry events, rendered with rich."""

    def __init__(self, stream: IO[str]) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(file=stream, highlight=False)
        self.headline = "loss"
        self.progress = Progress(
            TextColumn("  training"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task: Any = None
        self.status: Any = None

    def __call__(self, event: TelemetryEvent) -> None:
        name, m, meta = event.name, event.measurements, event.metadata
        if name == telemetry.STAGE_START:
            self._stop_live()
            self.status = self.console.status(f"{self._label(meta)} …")
            self.status.start()
        elif name == telemetry.STAGE_STOP:
            took = m.get("duration_seconds", 0.0)
            status = meta.get("status")
            mark = "[green]✓[/green]" if status == "success" else "[red]✗[/red]"
            if status == "retry":
                mark = "[yellow]↻[/yellow]"
            self._stop_live()
            self.console.print(f"{mark} {self._label(meta)} [dim]({_fmt_seconds(float(took))})[/dim]")
        elif name == telemetry.TRAINING_START:
            self._stop_live()
            start, total = int(m["start_step"]), int(m["total_steps"])
            self.headline = str(meta.get("headline") or "loss")
            if meta.get("resumed_from"):
                # soft_wrap: a checkpoint URI is never folded across lines
                self.console.print(
                    f"  resuming at step {start}/{total} from {meta['resumed_from']}",
                    soft_wrap=True,
                    markup=False,
                )
            self.progress.start()
            self.task = self.progress.add_task("train", total=total, completed=start, stats="")
        elif name == telemetry.TRAINING_STEP and self.task is not None:
            stats = f"loss {m['loss']:.4f}"
            if self.headline != "loss" and self.headline in m:
                stats += f"  {self.headline} {m[self.headline]:.4f}"
            stats += f"  {m['tokens_per_second']:.0f} tok/s"
            self.progress.update(self.task, completed=int(m["step"]), stats=stats)
        elif name == telemetry.EVAL_COMPLETE:
            shown = {k: v for k, v in m.items() if k not in ("examples",) and isinstance(v, float)}
            text = ", ".join(f"{k} {v:.3f}" for k, v in list(shown.items())[:3])
            self.console.print(f"  {meta.get('model')}: {text}")

    @staticmethod
    def _label(meta: Any) -> str:
        checks = meta.get("check_keys") or []
        if checks:
            return f"check {', '.join(map(str, checks))}"
        return str(meta.get("asset_key") or meta.get("stage") or "step")

    def _stop_live(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None
        if self.task is not None:
            self.progress.stop()
            self.task = None

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        telemetry.attach(_HANDLER, ("kitchen.stage", "kitchen.training", "kitchen.eval"), self)
        try:
            yield
        finally:
            telemetry.detach(_HANDLER)
            self._stop_live()


@contextlib.contextmanager
def quiet_output(log_path: Path) -> Iterator[IO[str]]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so subprocesses and C libraries
    too) to ``log_path`` for the block; yields a stream on the real terminal for the progress display."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved_out), "w", buffering=1)
    with log_path.open("a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            terminal.close()


def tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
