"""The sentence-embedding port: texts in, unit-length float32 vectors out (cosine = dot product)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt


class EmbeddingError(RuntimeError):
    """The embedder could not be loaded or reached, or answered with something that is not vectors."""


@runtime_checkable
class Embedder(Protocol):
    @property
    def model_id(self) -> str:
        """Names the model, so cached vectors are keyed by it."""
        ...

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """``(len(texts), dim)`` unit-length rows, in the order of ``texts`` (empty input: ``(0, dim)``
        or ``(0, 0)``)."""
        ...


def unit_rows(vectors: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Rows scaled to unit length (zero rows stay zero): what every embedder returns."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim != 2:
        raise EmbeddingError(f"expected a 2-d array of vectors, got shape {array.shape}")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return np.divide(array, norms, out=np.zeros_like(array), where=norms > 0)
