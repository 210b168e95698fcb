"""The chat LLM port: one request shape (chat messages) and one response shape, whatever answers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypedDict, runtime_checkable


class ChatMessage(TypedDict):
    role: str
    content: str


class LLMError(RuntimeError):
    """The LLM could not answer (unreachable, refused the key, timed out after its retries, bad reply)."""


@dataclass(frozen=True)
class LLMResponse:
    content: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float


@runtime_checkable
class LLMClient(Protocol):
    @property
    def model_id(self) -> str:
        """What answers (an endpoint's model name, or a Kitchen model and its weights): for lineage."""
        ...

    def chat(
        self, messages: Sequence[ChatMessage], *, max_tokens: int = 256, temperature: float = 0.0
    ) -> LLMResponse:
        """One completion of ``messages``; raises ``LLMError`` with one clear line on failure."""
        ...
