"""Near-duplicate decontamination: held-out rows whose prompt is a near copy of a training prompt.

Exact copies are gone already (``kitchen.data.dedup``); this catches paraphrases and light edits. The
requests (each row's last user turn, ``dedup.request_text``: a few-shot prefix shared by every row would
make all prompts look alike) are embedded, the training prompts indexed in
the vector store, and each held-out prompt's nearest training prompt looked up; at or above
``threshold`` cosine similarity (default: ``DatasetSection.decontaminate_threshold``, where the measured
justification is) the held-out row is flagged, and dropped unless told to keep it.
Embeddings are cached on disk by the model and the prompts' content hash, so an unchanged dataset is not
embedded again, and the index is reused while the store holds it.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from datasets import Dataset, DatasetDict

from kitchen.data.dedup import request_text
from kitchen.data.sources import DatasetSourceError, LoadedDataset, content_hash
from kitchen.home import home_dir
from kitchen.ports.embeddings import Embedder, EmbeddingError
from kitchen.ports.vectors import VectorStore

#: Above this share of flagged held-out rows the report warns: templated prompts, not contamination.
MOSTLY_FLAGGED = 0.5
PAIRS_SHOWN = 5
EMBED_BATCH = 256

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Decontamination:
    """What the dataset asset's metadata shows."""

    model: str
    threshold: float
    test_rows: int
    flagged: int
    dropped: int
    pairs: list[dict[str, Any]] = field(default_factory=list)
    """The most similar flagged pairs: held-out prompt, training prompt, cosine."""
    embedded: int = 0
    """Prompts embedded now (0 when every vector came from the cache)."""
    seconds: float = 0.0

    @property
    def warning(self) -> str:
        if self.test_rows and self.flagged > MOSTLY_FLAGGED * self.test_rows:
            return (
                f"{self.flagged} of {self.test_rows} held-out rows flagged: templated prompts embed alike "
                "whatever their details; raise the threshold or turn decontamination off for such data"
            )
        return ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "threshold": self.threshold,
            "test_rows_checked": self.test_rows,
            "flagged": self.flagged,
            "dropped": self.dropped,
            "embedded_now": self.embedded,
            "seconds": round(self.seconds, 2),
            "pairs": self.pairs,
            **({"warning": self.warning} if self.warning else {}),
        }


def _digest(model: str, texts: Sequence[str]) -> str:
    h = hashlib.sha256(f"{model}\0{len(texts)}\0".encode())
    for text in texts:
        h.update(text.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def cached_embeddings(
    embedder: Embedder,
    texts: Sequence[str],
    *,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> tuple[npt.NDArray[np.float32], int]:
    """Vectors for ``texts`` (from the cache when this model embedded these texts before) and how many
    were embedded now; batches of ``EMBED_BATCH`` with a progress line each."""
    root = cache_dir if cache_dir is not None else home_dir("cache", "embeddings")
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{_digest(embedder.model_id, texts)}.npy"
    if path.exists():
        return np.load(path), 0
    parts: list[npt.NDArray[np.float32]] = []
    started = time.perf_counter()
    for start in range(0, len(texts), EMBED_BATCH):
        parts.append(embedder.embed(list(texts[start : start + EMBED_BATCH])))
        done = min(start + EMBED_BATCH, len(texts))
        if progress is not None:
            rate = done / max(time.perf_counter() - started, 1e-9)
            progress(f"embedded {done}/{len(texts)} prompts ({rate:.0f}/s)")
    vectors = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    if vectors.shape[0] != len(texts):
        raise EmbeddingError(
            f"{embedder.model_id} returned {vectors.shape[0]} vectors for {len(texts)} texts"
        )
    staging = path.with_suffix(f".{time.time_ns()}.tmp.npy")
    np.save(staging, vectors)
    staging.replace(path)  # atomic: a reader never sees half a file
    return vectors, len(texts)


def nearest_train(
    train_prompts: Sequence[str],
    test_prompts: Sequence[str],
    embedder: Embedder,
    store: VectorStore,
    *,
    progress: Progress | None = None,
    cache_dir: Path | None = None,
) -> tuple[list[tuple[int, float]], int]:
    """For each held-out prompt, (index of its nearest training prompt, cosine), and the prompts embedded
    now. The training prompts are indexed once per (model, content) in a collection named by its hash."""
    train_vectors, embedded = cached_embeddings(
        embedder, train_prompts, cache_dir=cache_dir, progress=progress
    )
    test_vectors, more = cached_embeddings(embedder, test_prompts, cache_dir=cache_dir, progress=progress)
    collection = f"kitchen-train-{_digest(embedder.model_id, train_prompts)[:32]}"
    if store.count(collection) != len(train_prompts):
        store.delete(collection)
        for start in range(0, len(train_prompts), 4096):
            end = min(start + 4096, len(train_prompts))
            store.add(
                collection,
                [str(i) for i in range(start, end)],
                train_vectors[start:end],
                list(train_prompts[start:end]),
            )
    hits = store.query(collection, test_vectors, k=1)
    return [(int(h[0].id), h[0].score) if h else (-1, -1.0) for h in hits], embedded + more


def decontaminate(
    loaded: LoadedDataset,
    embedder: Embedder,
    store: VectorStore,
    *,
    threshold: float,
    drop: bool = True,
    progress: Progress | None = None,
    cache_dir: Path | None = None,
) -> tuple[LoadedDataset, Decontamination]:
    """``loaded`` with held-out rows whose nearest training prompt scores ``>= threshold`` removed (kept
    when ``drop`` is False), and the report."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"decontamination threshold {threshold} must be in (0, 1]")
    started = time.perf_counter()
    train, test = loaded.dataset["train"], loaded.dataset["test"]
    train_prompts = [request_text(row) for row in train.to_list()]
    test_rows = test.to_list()
    test_prompts = [request_text(row) for row in test_rows]
    nearest, embedded = nearest_train(
        train_prompts, test_prompts, embedder, store, progress=progress, cache_dir=cache_dir
    )
    flagged = [i for i, (j, score) in enumerate(nearest) if j >= 0 and score >= threshold and test_prompts[i]]
    pairs = [
        {
            "test": _short(test_prompts[i]),
            "train": _short(train_prompts[nearest[i][0]]),
            "cosine": round(nearest[i][1], 4),
        }
        for i in sorted(flagged, key=lambda i: -nearest[i][1])[:PAIRS_SHOWN]
    ]
    dropped = len(flagged) if drop else 0
    result = loaded
    if dropped:
        if dropped == len(test_rows):
            raise DatasetSourceError(
                f"Dataset {loaded.name!r}: all {dropped} held-out rows are near duplicates of training rows "
                f"(cosine >= {threshold}); raise --decontaminate-threshold, or give a distinct test split"
            )
        gone = set(flagged)
        kept = Dataset.from_list(
            [row for i, row in enumerate(test_rows) if i not in gone], features=test.features
        )
        dataset = DatasetDict({"train": train, "test": kept})
        result = replace(loaded, dataset=dataset, content_hash=content_hash(dataset))
    report = Decontamination(
        model=embedder.model_id,
        threshold=threshold,
        test_rows=len(test_rows),
        flagged=len(flagged),
        dropped=dropped,
        pairs=pairs,
        embedded=embedded,
        seconds=time.perf_counter() - started,
    )
    return result, report


def _short(text: str, limit: int = 160) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"
