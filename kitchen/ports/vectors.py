"""The vector-store port: named collections of (id, unit vector, document), nearest neighbours by cosine."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt


class VectorStoreError(RuntimeError):
    """The store could not be opened or reached, or a request does not fit a collection."""


@dataclass(frozen=True)
class Neighbour:
    id: str
    score: float
    """Cosine similarity to the query (1.0 = same direction)."""
    document: str


@runtime_checkable
class VectorStore(Protocol):
    def count(self, collection: str) -> int:
        """Vectors in ``collection`` (0 when it does not exist)."""
        ...

    def add(
        self,
        collection: str,
        ids: Sequence[str],
        vectors: npt.NDArray[np.float32],
        documents: Sequence[str],
    ) -> None:
        """Add (or replace, by id) vectors; the collection is created on first use."""
        ...

    def query(self, collection: str, vectors: npt.NDArray[np.float32], k: int = 1) -> list[list[Neighbour]]:
        """For each query row, up to ``k`` nearest stored vectors, most similar first."""
        ...

    def delete(self, collection: str) -> None:
        """Drop ``collection`` (nothing happens when it does not exist)."""
        ...


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,510}[A-Za-z0-9]$")


def check_collection_name(name: str) -> str:
    """Names every store accepts (Chroma's rule): 3-512 of ``[A-Za-z0-9._-]``, alphanumeric ends."""
    if not _NAME.match(name):
        raise VectorStoreError(
            f"collection name {name!r}: use 3-512 characters from [A-Za-z0-9._-], starting and ending "
            "with a letter or digit"
        )
    return name
