"""Stored feedback (``kitchen.serve.feedback``) as training data, in the public schemas the workflows read.

- Supervised (SFT): each corrected reply becomes a chat row, ``{"messages": [...prompt, {"role":
  "assistant", "content": correction}]}``.
- Preference (DPO): ``{"prompt": [...messages], "chosen": reply, "rejected": reply}``. A correction is
  chosen over the served reply it corrects; on the same prompt, an up-voted reply is chosen over a
  down-voted one, and a higher-scored reply over a lower-scored one.

A *batch* is the feedback with ``seq`` in ``(after_seq, last_seq]``. A pair belongs to the batch holding
the later of its two pieces of feedback, so an up-vote pairs with a down-vote that arrives batches later;
a pair or correction repeated on the same prompt is made once, by its first feedback. Feedback is
append-only, so rebuilding a batch gives the same rows, and no row is in two batches: a retraining run
per batch never trains on the same feedback twice.

What could not be used is counted by reason, per part of a piece of feedback (its correction, rating and
score): ``bad_prompt`` (no user turn to answer last), ``empty_correction``, ``correction_equals_reply``
(still an SFT row, but no pair), ``unpaired`` (a rating or score with nothing opposite on the same prompt
yet; it pairs when that arrives), ``same_reply`` (the opposite feedback rates the same text) and
``duplicate`` (made already by earlier feedback).
"""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kitchen.hashing import hash_bytes
from kitchen.home import home_dir
from kitchen.serve.feedback import Feedback

Message = dict[str, str]
Row = dict[str, Any]


@dataclass(frozen=True)
class Batch:
    """Feedback with ``after_seq < seq <= last_seq`` (``seq`` is the store's insertion order)."""

    after_seq: int
    last_seq: int

    def __post_init__(self) -> None:
        if not 0 <= self.after_seq <= self.last_seq:
            raise ValueError(f"a feedback batch needs 0 <= after_seq <= last_seq, got {self}")

    @property
    def id(self) -> str:
        """Names the batch's files and its retraining run's key."""
        return f"{self.after_seq:06d}-{self.last_seq:06d}"


@dataclass
class VersionCounts:
    feedback: int = 0
    pairs: int = 0
    sft_rows: int = 0


@dataclass
class TrainingData:
    batch: Batch
    feedback: int
    pairs: list[Row]
    sft_rows: list[Row]
    skipped: Counter[str] = field(default_factory=Counter)
    by_version: dict[str, VersionCounts] = field(default_factory=dict)
    """Per served version: feedback on its replies in the batch, and the pairs and rows that feedback made."""
    model_names: list[str] = field(default_factory=list)
    """Registered models the batch's feedback rates (``NAME`` of ``NAME/3``), most recent last."""


def _usable_prompt(messages: Sequence[Message]) -> bool:
    return bool(messages) and messages[-1].get("role") == "user"


def _reply(text: str) -> Message:
    return {"role": "assistant", "content": text}


class _Builder:
    """Walks the feedback in order, remembering what earlier feedback made so nothing is made twice."""

    def __init__(self) -> None:
        self.seen_pairs: set[tuple[str, str, str]] = set()
        self.seen_rows: set[tuple[str, str]] = set()
        self.earlier: dict[str, list[Feedback]] = {}

    def add(self, item: Feedback, data: TrainingData | None) -> None:
        """Record ``item``; with ``data`` (it is in the batch) append what it makes and why not."""
        skipped: Counter[str] = Counter()
        pairs: list[Row] = []
        rows: list[Row] = []
        key = json.dumps(item.messages, sort_keys=True)
        if not _usable_prompt(item.messages):
            skipped["bad_prompt"] += 1
        else:
            if item.correction is not None:
                self._correction(item, key, pairs, rows, skipped)
            earlier = self.earlier.get(key, [])
            if item.rating is not None:
                opposite = "down" if item.rating == "up" else "up"
                others = [(o.reply, o.rating == "down") for o in earlier if o.rating == opposite]
                self._pairs(item, key, others, item.rating == "up", pairs, skipped)
            if item.score is not None:
                score = item.score
                scored = [(o.reply, o.score) for o in earlier if o.score is not None and o.score != score]
                self._pairs(
                    item, key, [(reply, other < score) for reply, other in scored], None, pairs, skipped
                )
            self.earlier.setdefault(key, []).append(item)
        if data is None:
            return
        data.pairs += pairs
        data.sft_rows += rows
        data.skipped.update(skipped)
        counts = data.by_version.setdefault(item.model_version, VersionCounts())
        counts.feedback += 1
        counts.pairs += len(pairs)
        counts.sft_rows += len(rows)

    def _correction(
        self, item: Feedback, key: str, pairs: list[Row], rows: list[Row], skipped: Counter[str]
    ) -> None:
        corrected = (item.correction or "").strip()
        if not corrected:
            skipped["empty_correction"] += 1
            return
        if (key, corrected) in self.seen_rows:
            skipped["duplicate"] += 1
        else:
            self.seen_rows.add((key, corrected))
            rows.append({"messages": [*item.messages, _reply(corrected)]})
        if corrected == item.reply.strip():
            skipped["correction_equals_reply"] += 1
        else:
            self._pair(item.messages, key, corrected, item.reply, pairs, skipped)

    def _pairs(
        self,
        item: Feedback,
        key: str,
        others: list[tuple[str, bool]],
        item_wins: bool | None,
        pairs: list[Row],
        skipped: Counter[str],
    ) -> None:
        """Pair ``item``'s reply with each earlier opposite ``(reply, item wins over it)``."""
        if not others:
            skipped["unpaired"] += 1
            return
        made = len(pairs)
        reasons: Counter[str] = Counter()
        for reply, wins in others:
            wins = wins if item_wins is None else item_wins
            chosen, rejected = (item.reply, reply) if wins else (reply, item.reply)
            self._pair(item.messages, key, chosen, rejected, pairs, reasons)
        if len(pairs) == made:  # nothing new: say why once, for this part of the feedback
            skipped[reasons.most_common(1)[0][0]] += 1

    def _pair(
        self,
        prompt: list[Message],
        key: str,
        chosen: str,
        rejected: str,
        pairs: list[Row],
        skipped: Counter[str],
    ) -> None:
        if chosen.strip() == rejected.strip():
            skipped["same_reply"] += 1
            return
        identity = (key, chosen.strip(), rejected.strip())
        if identity in self.seen_pairs:
            skipped["duplicate"] += 1
            return
        self.seen_pairs.add(identity)
        pairs.append({"prompt": [dict(m) for m in prompt], "chosen": chosen, "rejected": rejected})


def served_model_name(version: str) -> str | None:
    """``NAME`` of a served registered version ``NAME/3``; None for a sampler path or an unregistered name."""
    if "://" in version or version.startswith("/"):
        return None
    name, sep, number = version.rpartition("/")
    return name if sep and name and number.isdigit() else None


def build_training_data(
    history: Sequence[Feedback], after_seq: int, last_seq: int | None = None
) -> TrainingData:
    """The pairs and SFT rows of the batch ``(after_seq, last_seq]`` (default: up to the newest feedback).

    ``history`` is the store's feedback from the start (``FeedbackStore.feedback()``), at least up to
    ``last_seq``: earlier feedback is what a rating in the batch pairs with, and what marks a repeat.
    """
    ordered = sorted(history, key=lambda f: f.seq)
    newest = max((f.seq for f in ordered), default=0)
    last = max(after_seq, newest) if last_seq is None else last_seq
    batch = Batch(after_seq, last)
    data = TrainingData(batch=batch, feedback=0, pairs=[], sft_rows=[])
    builder = _Builder()
    for item in ordered:
        if item.seq > last:
            break
        in_batch = item.seq > after_seq
        builder.add(item, data if in_batch else None)
        if in_batch:
            data.feedback += 1
            name = served_model_name(item.model_version)
            if name is not None:
                if name in data.model_names:
                    data.model_names.remove(name)
                data.model_names.append(name)
    return data


@dataclass(frozen=True)
class WrittenData:
    """The batch's files (None when it made no such rows) and the sha256 of each file's bytes."""

    directory: Path
    pairs_path: Path | None
    pairs_hash: str | None
    sft_path: Path | None
    sft_hash: str | None


def _jsonl(rows: list[Row]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def _write(directory: Path, stem: str, rows: list[Row]) -> tuple[Path | None, str | None]:
    """``<stem>-<hash12>.jsonl``, written atomically (a reader sees the whole file or none); an existing
    file of that name holds the same bytes, so it is kept."""
    if not rows:
        return None, None
    content = _jsonl(rows)
    digest = hash_bytes(content)
    path = directory / f"{stem}-{digest[:12]}.jsonl"
    if not path.is_file():
        tmp = directory / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        try:
            tmp.write_bytes(content)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path, digest


def write_training_data(data: TrainingData, root: Path | None = None) -> WrittenData:
    """Write the batch's ``pairs-*.jsonl`` and ``sft-*.jsonl`` under ``root`` (default
    ``$KITCHEN_HOME/feedback/batches``)/``<batch id>``; named by content, so a file never changes."""
    directory = (root or home_dir("feedback", "batches")) / data.batch.id
    directory.mkdir(parents=True, exist_ok=True)
    pairs_path, pairs_hash = _write(directory, "pairs", data.pairs)
    sft_path, sft_hash = _write(directory, "sft", data.sft_rows)
    return WrittenData(directory, pairs_path, pairs_hash, sft_path, sft_hash)
