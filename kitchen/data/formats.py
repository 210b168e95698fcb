"""Row formats: what a workflow's dataset rows normalise to (chat conversations, preference pairs, problems).

``load_dataset_source`` reads any source (built-in, file, directory, Hub) the same way; the format says
which source schemas are recognised, how a row becomes the normalised shape (``RowSkipped`` for rows that
cannot, counted by reason), the Arrow features of the normalised splits, and how a row reads in the UI.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from datasets import Features

from kitchen.data.schemas import (
    NORMALIZED_FEATURES,
    NormalizedRow,
    NormalizeResult,
    detect_schema,
    normalize_rows,
)

#: Source split names used as the test split, in order of preference.
TEST_SPLIT_NAMES: tuple[str, ...] = ("test", "validation", "valid", "dev")


@dataclass(frozen=True)
class RowFormat:
    name: str
    detect: Callable[[Iterable[str]], str]
    """Columns -> the name of the source schema found; ``SchemaError`` naming the accepted ones."""
    normalize: Callable[[Iterable[Mapping[str, Any]], str], NormalizeResult]
    features: Features
    preview: Callable[[Mapping[str, Any]], dict[str, str]]
    """One normalised row as a few readable columns (the dataset asset's preview table)."""
    train_splits: tuple[str, ...] = ("train",)
    """Source split names to train on, in order of preference (UltraFeedback's ``train_prefs``)."""
    test_splits: tuple[str, ...] = TEST_SPLIT_NAMES
    """Source split names to hold out, in order of preference (``test_prefs``, then ``test``, ...)."""

    @property
    def split_names(self) -> tuple[str, ...]:
        """Every split name this format recognises, plus the common ones (data-file names pick splits)."""
        return tuple(dict.fromkeys((*self.train_splits, *self.test_splits, "train", *TEST_SPLIT_NAMES)))


def _chat_preview(row: Mapping[str, Any]) -> dict[str, str]:
    turns = " / ".join(f"{m['role']}: {m['content']}" for m in row["messages"])
    return {"conversation": turns, "answer": str(row.get("answer") or "")}


#: Chat conversations ``{"messages", "answer"}``: SFT, and the prompts of distillation.
CHAT = RowFormat(
    name="chat",
    detect=detect_schema,
    normalize=normalize_rows,
    features=NORMALIZED_FEATURES,
    preview=_chat_preview,
)

__all__ = ["CHAT", "TEST_SPLIT_NAMES", "NormalizedRow", "RowFormat"]
