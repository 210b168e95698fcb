"""Durable completions and feedback on them: one SQLite file (default ``$KITCHEN_HOME/feedback.db``).

The server records each successful completion (its id, the version that produced it, the messages it
answered and every choice's text) so that feedback posted later names exactly what was rated: the prompt,
the reply and the model version. Feedback for an id the store does not hold is refused and nothing is
written; a refused completion request is never recorded either.

Feedback is a rating (``up``/``down``), a score (higher is better), a corrected or preferred reply, or
several of these. Turning it into training data (preferred-vs-rejected pairs, corrected replies) is the
job of whatever reads ``feedback()``; this module only keeps it safe.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kitchen.home import kitchen_home

Rating = Literal["up", "down"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    model_version TEXT NOT NULL,
    messages TEXT NOT NULL,
    choices TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created REAL NOT NULL,
    completion_id TEXT NOT NULL REFERENCES completions(id),
    choice_index INTEGER NOT NULL,
    rating TEXT CHECK (rating IN ('up', 'down')),
    score REAL,
    correction TEXT
);
"""


class UnknownCompletion(LookupError):
    """Feedback names a completion id (or a choice of it) that the store does not hold."""


@dataclass(frozen=True)
class Feedback:
    """One piece of feedback with what it rates."""

    seq: int
    """Insertion order: readers remember the last ``seq`` they consumed."""
    id: str
    created: float
    completion_id: str
    model_version: str
    messages: list[dict[str, str]]
    reply: str
    choice_index: int
    rating: Rating | None
    score: float | None
    correction: str | None


def default_feedback_path() -> Path:
    return kitchen_home() / "feedback.db"


class FeedbackStore:
    """Completions and feedback in SQLite; safe to use from several threads and processes."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_feedback_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            with db:  # one transaction: committed on success, rolled back on error
                yield db
        finally:
            db.close()

    def record_completion(
        self,
        completion_id: str,
        model_version: str,
        messages: Sequence[dict[str, str]],
        choices: Sequence[str],
    ) -> None:
        texts = json.dumps(list(choices))
        row = (completion_id, time.time(), model_version, json.dumps(list(messages)), texts)
        with self._lock, self._connect() as db:
            db.execute(
                "INSERT INTO completions (id, created, model_version, messages, choices) "
                "VALUES (?, ?, ?, ?, ?)",
                row,
            )

    def add_feedback(
        self,
        completion_id: str,
        *,
        choice_index: int = 0,
        rating: Rating | None = None,
        score: float | None = None,
        correction: str | None = None,
    ) -> Feedback:
        """Store feedback on one choice of a recorded completion; ``UnknownCompletion`` stores nothing."""
        if rating is None and score is None and correction is None:
            raise ValueError("feedback needs a rating, a score or a correction")
        feedback_id = f"fb-{uuid.uuid4().hex}"
        with self._lock, self._connect() as db:
            row = db.execute("SELECT choices FROM completions WHERE id = ?", (completion_id,)).fetchone()
            if row is None:
                raise UnknownCompletion(f"no completion {completion_id!r} on record")
            if not 0 <= choice_index < len(json.loads(row[0])):
                raise UnknownCompletion(f"completion {completion_id!r} has no choice {choice_index}")
            inserted = db.execute(
                "INSERT INTO feedback (id, created, completion_id, choice_index, rating, score, correction) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (feedback_id, time.time(), completion_id, choice_index, rating, score, correction),
            )
            seq = inserted.lastrowid
        assert seq is not None
        [stored] = [f for f in self.feedback(after_seq=seq - 1) if f.id == feedback_id]
        return stored

    def feedback(self, after_seq: int = 0) -> list[Feedback]:
        """Feedback stored after ``after_seq``, oldest first, each with its prompt, reply and version."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT f.seq, f.id, f.created, f.completion_id, c.model_version, c.messages, c.choices, "
                "f.choice_index, f.rating, f.score, f.correction FROM feedback f "
                "JOIN completions c ON c.id = f.completion_id WHERE f.seq > ? ORDER BY f.seq",
                (after_seq,),
            ).fetchall()
        return [
            Feedback(
                seq=seq,
                id=fid,
                created=created,
                completion_id=cid,
                model_version=version,
                messages=json.loads(messages),
                reply=json.loads(choices)[index],
                choice_index=index,
                rating=rating,
                score=score,
                correction=correction,
            )
            for seq, fid, created, cid, version, messages, choices, index, rating, score, correction in rows
        ]

    def completion_count(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM completions").fetchone()[0])
