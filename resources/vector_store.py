"""Vector stores (the ``vector_store`` resource): exact cosine search in memory, or Chroma (persistent
under ``$KITCHEN_HOME/chroma``, or a Chroma server by URL)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import dagster as dg
import numpy as np
import numpy.typing as npt
from pydantic import Field, PrivateAttr

from kitchen.home import home_dir
from kitchen.ports.vectors import Neighbour, VectorStoreError, check_collection_name

_CHROMA_INSTALL = "pip install 'kitchen[vectors]' (chromadb==1.5.9)"


def _check_batch(ids: Sequence[str], vectors: npt.NDArray[np.float32], documents: Sequence[str]) -> None:
    if vectors.ndim != 2 or not len(ids) == len(documents) == vectors.shape[0]:
        raise VectorStoreError(
            f"add: {len(ids)} ids, {len(documents)} documents, vectors {vectors.shape}: counts must match"
        )


class VectorStoreResource(dg.ConfigurableResource, ABC):
    """The ``vector_store`` resource: a ``VectorStore`` (kitchen.ports) Dagster can configure and bind."""

    @abstractmethod
    def count(self, collection: str) -> int: ...

    @abstractmethod
    def add(
        self, collection: str, ids: Sequence[str], vectors: npt.NDArray[np.float32], documents: Sequence[str]
    ) -> None: ...

    @abstractmethod
    def query(
        self, collection: str, vectors: npt.NDArray[np.float32], k: int = 1
    ) -> list[list[Neighbour]]: ...

    @abstractmethod
    def delete(self, collection: str) -> None: ...


class InMemoryVectorStore(VectorStoreResource):
    """Exact nearest neighbours by a matrix product: no index to build, nothing kept after the process;
    faster than an approximate index below some hundred thousand vectors, and what tests bind."""

    _collections: dict[str, tuple[list[str], npt.NDArray[np.float32], list[str]]] = PrivateAttr(
        default_factory=dict
    )

    def count(self, collection: str) -> int:
        found = self._collections.get(check_collection_name(collection))
        return 0 if found is None else len(found[0])

    def add(
        self, collection: str, ids: Sequence[str], vectors: npt.NDArray[np.float32], documents: Sequence[str]
    ) -> None:
        check_collection_name(collection)
        vectors = np.asarray(vectors, dtype=np.float32)
        _check_batch(ids, vectors, documents)
        old_ids, old_vectors, old_docs = self._collections.get(
            collection, ([], np.zeros((0, vectors.shape[1]), np.float32), [])
        )
        if old_vectors.shape[1] != vectors.shape[1]:
            raise VectorStoreError(
                f"collection {collection!r} holds {old_vectors.shape[1]}-d vectors; got {vectors.shape[1]}-d"
            )
        position = {id_: i for i, id_ in enumerate(old_ids)}
        merged_ids, merged_docs = list(old_ids), list(old_docs)
        merged = old_vectors.copy()
        fresh: list[int] = []
        for row, (id_, doc) in enumerate(zip(ids, documents, strict=True)):
            if id_ in position:
                merged[position[id_]] = vectors[row]
                merged_docs[position[id_]] = doc
            else:
                position[id_] = len(merged_ids)
                merged_ids.append(id_)
                merged_docs.append(doc)
                fresh.append(row)
        merged = np.concatenate([merged, vectors[fresh]]) if fresh else merged
        self._collections[collection] = (merged_ids, merged, merged_docs)

    def query(self, collection: str, vectors: npt.NDArray[np.float32], k: int = 1) -> list[list[Neighbour]]:
        found = self._collections.get(check_collection_name(collection))
        queries = np.asarray(vectors, dtype=np.float32)
        if found is None or not found[0]:
            return [[] for _ in range(len(queries))]
        ids, stored, docs = found
        if queries.ndim != 2 or queries.shape[1] != stored.shape[1]:
            raise VectorStoreError(
                f"query vectors of shape {queries.shape}; {collection!r} holds {stored.shape[1]}-d"
            )
        k = min(k, len(ids))
        scores = queries @ stored.T
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [[Neighbour(ids[j], float(scores[i, j]), docs[j]) for j in row] for i, row in enumerate(top)]

    def delete(self, collection: str) -> None:
        self._collections.pop(check_collection_name(collection), None)


class ChromaVectorStore(VectorStoreResource):
    """Chroma with cosine distance: an embedded persistent store (``path``, default
    ``$KITCHEN_HOME/chroma``) or a Chroma server (``url``, e.g. ``http://localhost:8000``)."""

    path: str | None = Field(default=None, description="Directory of an embedded store.")
    url: str | None = Field(default=None, description="A Chroma server; overrides path.")
    _client: Any = PrivateAttr(default=None)

    def _chroma(self) -> Any:
        if self._client is not None:
            return self._client
        try:
            import chromadb
            from chromadb.config import Settings
        except ImportError:
            raise VectorStoreError(f"chromadb is not installed: {_CHROMA_INSTALL}") from None
        settings = Settings(anonymized_telemetry=False)
        try:
            if self.url:
                parsed = urlparse(self.url)
                if not parsed.hostname:
                    raise VectorStoreError(
                        f"Chroma URL {self.url!r} names no host; e.g. http://localhost:8000"
                    )
                self._client = chromadb.HttpClient(
                    host=parsed.hostname,
                    port=parsed.port or (443 if parsed.scheme == "https" else 8000),
                    ssl=parsed.scheme == "https",
                    settings=settings,
                )
                self._client.heartbeat()
            else:
                path = self.path or str(home_dir("chroma"))
                self._client = chromadb.PersistentClient(path=path, settings=settings)
        except VectorStoreError:
            raise
        except Exception as failure:
            where = self.url or self.path or "$KITCHEN_HOME/chroma"
            reason = " ".join(str(failure).split())[:200]
            raise VectorStoreError(
                f"cannot open Chroma at {where}: {type(failure).__name__}: {reason}"
            ) from None
        return self._client

    def _existing(self, collection: str) -> Any | None:
        client = self._chroma()
        try:
            return client.get_collection(check_collection_name(collection), embedding_function=None)
        except VectorStoreError:
            raise
        except Exception as failure:
            if type(failure).__name__ == "NotFoundError":
                return None
            raise VectorStoreError(f"Chroma: {type(failure).__name__}: {failure}") from None

    def count(self, collection: str) -> int:
        found = self._existing(collection)
        return 0 if found is None else int(found.count())

    def add(
        self, collection: str, ids: Sequence[str], vectors: npt.NDArray[np.float32], documents: Sequence[str]
    ) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        _check_batch(ids, vectors, documents)
        if not len(ids):
            return
        target = self._chroma().get_or_create_collection(
            check_collection_name(collection), metadata={"hnsw:space": "cosine"}, embedding_function=None
        )
        # Chroma caps one request's size; 1000 rows stay well under it.
        for start in range(0, len(ids), 1000):
            end = start + 1000
            target.upsert(
                ids=list(ids[start:end]), embeddings=vectors[start:end], documents=list(documents[start:end])
            )

    def query(self, collection: str, vectors: npt.NDArray[np.float32], k: int = 1) -> list[list[Neighbour]]:
        queries = np.asarray(vectors, dtype=np.float32)
        found = self._existing(collection)
        if found is None or found.count() == 0 or len(queries) == 0:
            return [[] for _ in range(len(queries))]
        result = found.query(
            query_embeddings=queries, n_results=min(k, found.count()), include=["distances", "documents"]
        )
        return [
            [
                Neighbour(id_, 1.0 - float(dist), doc or "")
                for id_, dist, doc in zip(ids, dists, docs, strict=True)
            ]
            for ids, dists, docs in zip(result["ids"], result["distances"], result["documents"], strict=True)
        ]

    def delete(self, collection: str) -> None:
        if self._existing(collection) is not None:
            self._chroma().delete_collection(collection)
