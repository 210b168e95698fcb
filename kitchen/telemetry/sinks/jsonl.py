"""The JSONL sink: each run's events, one JSON object a line, in ``$KITCHEN_HOME/telemetry/<run_id>.jsonl``.

On by default because it needs nothing running and is the one record that holds every event; each line
is flushed as written so a crashed run still leaves its events behind.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import IO, Any

from kitchen.home import home_dir
from kitchen.telemetry.events import RUN_COMPLETED, RUN_FAILED, WORKFLOW_STOP, TelemetryEvent

#: Events after which a run writes nothing more from this process: its file is closed.
LAST_EVENTS = (WORKFLOW_STOP, RUN_COMPLETED, RUN_FAILED)


def jsonl_path(run_id: str, directory: Path | None = None) -> Path:
    """Where the JSONL sink writes ``run_id``'s events."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", run_id):
        raise ValueError(f"run id {run_id!r} is not usable as a file name")
    return (directory or home_dir("telemetry")) / f"{run_id}.jsonl"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The events a JSONL sink wrote, as dicts (``TelemetryEvent.to_dict`` form)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class JsonlSink:
    """Appends events to one file per run; the file closes when the run's ``workflow.stop`` arrives (in the
    run's process) or its ``run.completed``/``run.failed`` (in the daemon's, from the run status sensors)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self._files: dict[str, IO[str]] = {}
        self._lock = threading.Lock()

    def __call__(self, event: TelemetryEvent) -> None:
        run_id = str(event.metadata["run_id"])
        line = json.dumps(event.to_dict(), allow_nan=False) + "\n"
        with self._lock:
            handle = self._files.get(run_id)
            if handle is None:
                path = jsonl_path(run_id, self.directory)
                path.parent.mkdir(parents=True, exist_ok=True)
                handle = self._files[run_id] = path.open("a", encoding="utf-8")
            handle.write(line)
            handle.flush()
            if event.name in LAST_EVENTS:
                self._files.pop(run_id).close()

    def close(self) -> None:
        with self._lock:
            for handle in self._files.values():
                handle.close()
            self._files.clear()
