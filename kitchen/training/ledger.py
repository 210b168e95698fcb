"""The ledger: what a training run has durably written, so an interrupted run resumes instead of restarting.

A checkpoint enters the ledger only after its save future resolved and every step before it succeeded,
so the ledger never names a half-written checkpoint or one taken after a failed step. Each state
checkpoint carries the plan's state at that step (data cursor, RNG), so the plan resumes with it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LEDGER_FILE = "ledger.json"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: str
    kind: str  # "state" (weights + optimizer) or "sampler" (weights for sampling)
    plan_state: dict[str, Any] = field(default_factory=dict)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write-then-rename, so a reader (or a resumed run) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


class Ledger:
    def __init__(self, run_dir: Path, key: str) -> None:
        self.path = run_dir / LEDGER_FILE
        self.key = key
        self.checkpoints: list[Checkpoint] = []
        self.complete = False

    @classmethod
    def open(cls, run_dir: Path, key: str) -> Ledger:
        """The run's ledger; one written under another key (other inputs) is ignored, not resumed."""
        ledger = cls(run_dir, key)
        if ledger.path.is_file():
            data = json.loads(ledger.path.read_text())
            if data.get("key") == key:
                ledger.checkpoints = [Checkpoint(**c) for c in data.get("checkpoints", [])]
                ledger.complete = bool(data.get("complete"))
        return ledger

    def latest_state(self) -> Checkpoint | None:
        states = [c for c in self.checkpoints if c.kind == "state"]
        return max(states, key=lambda c: c.step) if states else None

    def truncate(self, step: int) -> None:
        """Forget checkpoints after ``step`` (a resumed run writes its own)."""
        self.checkpoints = [c for c in self.checkpoints if c.step <= step]
        self.save()

    def add(self, checkpoint: Checkpoint) -> None:
        self.checkpoints.append(checkpoint)
        self.save()

    def reset(self) -> None:
        self.checkpoints, self.complete = [], False
        self.save()

    def mark_complete(self) -> None:
        self.complete = True
        self.save()

    def save(self) -> None:
        write_json_atomic(
            self.path,
            {
                "key": self.key,
                "complete": self.complete,
                "checkpoints": [asdict(c) for c in self.checkpoints],
            },
        )
