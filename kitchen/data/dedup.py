"""Exact-duplicate removal on normalised text, within each split and between the held-out and training splits.

Every workflow's dataset passes through ``load_dataset_source``, so this is the one place duplicates are
removed. Text is normalised (Unicode NFKC, case folded, whitespace runs collapsed) so copies that differ
only in spacing or case count as copies. A held-out row whose *prompt* is a training prompt is
contamination even when its reply differs: the model was trained on that question. Prompts are the user
turns of a row (``messages`` or a preference row's ``prompt``), so a shared system prompt or few-shot
prefix does not make distinct questions equal.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from kitchen.data.schemas import NormalizedRow

#: ``all``: duplicates within each split and held-out prompts seen in training; ``heldout``: only the
#: held-out split (training repeats kept, as RL's i.i.d. problem draws have them); ``off``: nothing.
DedupMode = Literal["all", "heldout", "off"]

_SPACE = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """NFKC, case folded, whitespace collapsed and stripped: the text two copies must share."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _canonical(value: Any) -> Any:
    if isinstance(value, str):
        return normalise_text(value)
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def row_key(row: Mapping[str, Any]) -> str:
    """The whole row, every text normalised: equal keys are exact duplicates."""
    return json.dumps(_canonical(row), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _user_turns(row: Mapping[str, Any]) -> list[str]:
    messages = row.get("prompt")
    if not isinstance(messages, list):
        messages = row.get("messages") or []
    return [
        str(m.get("content") or "") for m in messages if isinstance(m, Mapping) and m.get("role") == "user"
    ]


def prompt_text(row: Mapping[str, Any]) -> str:
    """The row's user turns, joined by newlines (``prompt`` for preference rows, else ``messages``)."""
    return "\n".join(_user_turns(row))


def request_text(row: Mapping[str, Any]) -> str:
    """The row's last user turn: the request being answered, without a few-shot prefix or earlier turns
    that many rows share (what near-duplicate search embeds)."""
    turns = _user_turns(row)
    return turns[-1] if turns else ""


@dataclass(frozen=True)
class DedupCounts:
    """Rows removed, by reason (what the dataset asset's metadata shows)."""

    mode: DedupMode = "off"
    train_duplicates: int = 0
    test_duplicates: int = 0
    test_in_train: int = 0

    @property
    def removed(self) -> int:
        return self.train_duplicates + self.test_duplicates + self.test_in_train

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "train_duplicates": self.train_duplicates,
            "test_duplicates": self.test_duplicates,
            "test_prompt_in_train": self.test_in_train,
        }


def unique_rows(rows: Iterable[NormalizedRow]) -> tuple[list[NormalizedRow], int]:
    """The first of each set of exact duplicates, in order, and how many were dropped."""
    seen: set[str] = set()
    kept: list[NormalizedRow] = []
    dropped = 0
    for row in rows:
        key = row_key(row)
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        kept.append(row)
    return kept, dropped


def heldout_rows(
    test: Iterable[NormalizedRow], train: Iterable[NormalizedRow]
) -> tuple[list[NormalizedRow], int, int]:
    """Held-out rows without exact copies of each other and without prompts seen in ``train``:
    (kept, duplicates within the held-out split, rows whose prompt is a training prompt)."""
    train_prompts = {normalise_text(prompt_text(row)) for row in train} - {""}
    unique, duplicates = unique_rows(test)
    kept = [row for row in unique if normalise_text(prompt_text(row)) not in train_prompts]
    return kept, duplicates, len(unique) - len(kept)
