"""Row formats: what a workflow's dataset rows normalise to (chat conversations, preference pairs, problems).

``load_dataset_source`` reads any source (built-in, file, directory, Hub) the same way, line by line where
it parses files itself, counting what it skips; the format says which source schemas are recognised (by
their columns, in detection order), how a row becomes the normalised shape (``RowSkipped`` for rows that
cannot, counted by reason), the Arrow features of the normalised splits, how a row reads in the UI, and
which source split names hold the training and the held-out rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Features

from kitchen.data.schemas import (
    NORMALIZED_FEATURES,
    SCHEMAS,
    NormalizedRow,
    NormalizeResult,
    describe_schemas,
    detect_schema,
    normalize_row,
    normalize_rows,
)

#: Source split names used as the test split, in order of preference.
TEST_SPLIT_NAMES: tuple[str, ...] = ("test", "validation", "valid", "dev")


@dataclass(frozen=True)
class RowFormat:
    name: str
    schemas: Mapping[str, tuple[str, ...]]
    """Accepted source schemas: name -> columns that must all be present, in detection order."""
    normalize_row: Callable[[Mapping[str, Any], str], NormalizedRow]
    """One source row of a schema -> the normalised row; raises ``RowSkipped(reason)`` for bad rows."""
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

    def detect(self, columns: Iterable[str]) -> str:
        """The first schema whose columns are all present, else a ``SchemaError`` naming the accepted."""
        return detect_schema(columns, self.schemas)

    def describe(self) -> str:
        return describe_schemas(self.schemas)

    def normalize(
        self,
        rows: Iterable[Mapping[str, Any]],
        schema: str,
        where: Sequence[str] | None = None,
        label: str = "row",
    ) -> NormalizeResult:
        return normalize_rows(rows, schema, where, label, normalize=self.normalize_row)


def _chat_preview(row: Mapping[str, Any]) -> dict[str, str]:
    turns = " / ".join(f"{m['role']}: {m['content']}" for m in row["messages"])
    return {"conversation": turns, "answer": str(row.get("answer") or "")}


#: Chat conversations ``{"messages", "answer"}``: SFT, and the prompts of distillation.
CHAT = RowFormat(
    name="chat",
    schemas=SCHEMAS,
    normalize_row=normalize_row,
    features=NORMALIZED_FEATURES,
    preview=_chat_preview,
)

__all__ = ["CHAT", "TEST_SPLIT_NAMES", "NormalizedRow", "RowFormat"]
