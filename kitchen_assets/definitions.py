"""The Dagster ``Definitions`` that ``workspace.yaml``, ``dagster dev`` and the ``kitchen`` CLI load.

Every registered workflow (``kitchen.workflows``) contributes its asset group, job, evaluation job and
sensors. ``KITCHEN_BACKEND`` (``local`` by default) picks the training resource bound as ``training``; no
asset code changes between backends. ``service_resources`` binds ``embeddings``, ``vector_store`` and
``llm`` from ``KITCHEN_EMBEDDINGS_*``, ``KITCHEN_VECTOR_STORE`` and ``KITCHEN_LLM_*`` (README), offline
implementations by default.
"""

from __future__ import annotations

import os

import dagster as dg

from jobs import kitchen_automation
from kitchen.workflows import workflows
from kitchen_assets.feedback import feedback_assets, feedback_settings
from kitchen_assets.io import ManifestIOManager
from kitchen_assets.workflows import workflow_assets
from resources.embeddings import EmbeddingsResource, OpenAIEmbeddings, SentenceTransformerEmbeddings
from resources.llm import KitchenSamplingLLM, LLMResource, OpenAICompatibleLLM
from resources.mlflow_registry import MlflowRegistry
from resources.training import LocalBackend, TrainingBackend
from resources.vector_store import ChromaVectorStore, InMemoryVectorStore, VectorStoreResource


def training_backend(name: str | None = None) -> TrainingBackend:
    """The training resource for ``name`` (``local`` or ``tinker``)."""
    name = (name or os.environ.get("KITCHEN_BACKEND") or "local").lower()
    if name == "local":
        return LocalBackend()
    if name == "tinker":
        from resources.tinker_backend import TinkerBackend

        return TinkerBackend.from_env()
    raise ValueError(f"unknown training backend {name!r}; expected 'local' or 'tinker'")


def _env(name: str) -> str | None:
    return os.environ.get(name, "").strip() or None


def embeddings_resource() -> EmbeddingsResource:
    """``KITCHEN_EMBEDDINGS_URL`` (+ ``_MODEL``, key in ``$KITCHEN_EMBEDDINGS_KEY_ENV``, default
    ``OPENAI_API_KEY``): an OpenAI-compatible endpoint; else the packaged MiniLM, or ``_MODEL`` (a
    directory)."""
    url, model = _env("KITCHEN_EMBEDDINGS_URL"), _env("KITCHEN_EMBEDDINGS_MODEL")
    if url:
        if not model:
            raise ValueError(
                "KITCHEN_EMBEDDINGS_URL is set but KITCHEN_EMBEDDINGS_MODEL is not: name the model"
            )
        return OpenAIEmbeddings(
            base_url=url, model=model, api_key_env=_env("KITCHEN_EMBEDDINGS_KEY_ENV") or "OPENAI_API_KEY"
        )
    return SentenceTransformerEmbeddings(model=model or "packaged")


def vector_store_resource() -> VectorStoreResource:
    """``KITCHEN_VECTOR_STORE``: ``memory`` (default: exact search, nothing to install), ``chroma``
    (persistent under ``$KITCHEN_HOME/chroma``), or a Chroma server's ``http(s)://`` URL."""
    choice = _env("KITCHEN_VECTOR_STORE") or "memory"
    if choice == "memory":
        return InMemoryVectorStore()
    if choice == "chroma":
        return ChromaVectorStore()
    if choice.startswith(("http://", "https://")):
        return ChromaVectorStore(url=choice)
    raise ValueError(f"KITCHEN_VECTOR_STORE={choice!r}: expected memory, chroma or a Chroma server URL")


def llm_resource() -> LLMResource:
    """``KITCHEN_LLM_URL`` (+ ``_MODEL``, key in ``$KITCHEN_LLM_KEY_ENV``; an empty value: no key): an
    OpenAI-compatible chat endpoint; else ``KITCHEN_LLM_MODEL`` (default the packaged model) sampled
    through the training backend."""
    url, model = _env("KITCHEN_LLM_URL"), _env("KITCHEN_LLM_MODEL")
    if url:
        if not model:
            raise ValueError("KITCHEN_LLM_URL is set but KITCHEN_LLM_MODEL is not: name the judge model")
        key_env = os.environ.get("KITCHEN_LLM_KEY_ENV", "OPENAI_API_KEY").strip() or None
        return OpenAICompatibleLLM(base_url=url, model=model, api_key_env=key_env)
    return KitchenSamplingLLM(model=model) if model else KitchenSamplingLLM()


def service_resources() -> dict[str, dg.ConfigurableResource]:
    """The outside-service resources beyond training and the registry, as the environment chooses them."""
    return {
        "embeddings": embeddings_resource(),
        "vector_store": vector_store_resource(),
        "llm": llm_resource(),
    }


def build_definitions(backend: str | None = None) -> dg.Definitions:
    registered = workflows()
    automation = kitchen_automation(registered)
    return dg.Definitions(
        assets=[
            *(asset for workflow in registered for asset in workflow_assets(workflow)),
            *feedback_assets(feedback_settings(), registered),  # off unless KITCHEN_FEEDBACK=on
        ],
        jobs=automation.jobs,
        sensors=automation.sensors,
        resources={
            "training": training_backend(backend),
            "registry": MlflowRegistry(),  # MLFLOW_TRACKING_URI, else the SQLite store under KITCHEN_HOME
            "io_manager": ManifestIOManager(),
            **service_resources(),
        },
        # Steps share one process: models loaded for training are reused by evaluation, and no step pays
        # a re-import of the code location.
        executor=dg.in_process_executor,
    )


defs = build_definitions()
