"""The ports for outside services beyond training: a chat LLM, sentence embeddings and a vector store.

Protocols only; ``resources/`` implements them (OpenAI-compatible endpoints, the packaged MiniLM, Chroma,
an in-memory store, Kitchen's own sampling client), and ``tests/test_ports.py`` runs one contract suite per
port over every implementation available offline. Errors are one class per port, each a one-line message
naming what failed and what to do; secrets never appear in them.
"""

from kitchen.ports.embeddings import Embedder, EmbeddingError
from kitchen.ports.llm import ChatMessage, LLMClient, LLMError, LLMResponse
from kitchen.ports.vectors import Neighbour, VectorStore, VectorStoreError

__all__ = [
    "ChatMessage",
    "Embedder",
    "EmbeddingError",
    "LLMClient",
    "LLMError",
    "LLMResponse",
    "Neighbour",
    "VectorStore",
    "VectorStoreError",
]
