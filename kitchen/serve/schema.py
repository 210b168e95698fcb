"""OpenAI's chat-completions wire format: the requests ``kitchen serve`` accepts and what it answers.

Only the fields Kitchen honours are modelled; unknown fields are ignored as OpenAI's own server ignores
fields it does not know, but fields that would change the answer and cannot be honoured on the
sampling-client contract (tools, logprobs, penalties, JSON mode) are refused with a 400 rather than
silently dropped (``unsupported_fields``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 4  # OpenAI's limit


class TextPart(BaseModel):
    """A text part of a message's ``content`` list (images and audio are not served)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``. ``None`` for an optional field means OpenAI's default."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(items)}")
        if any(not s for s in items):
            raise ValueError("stop sequences must be non-empty")
        return value

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (the newer name) wins over the deprecated ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported_fields(self) -> list[str]:
        """Fields set to something this server cannot honour."""
        extra: dict[str, Any] = self.model_extra or {}
        found = [k for k in ("tools", "functions", "function_call", "audio", "prediction") if extra.get(k)]
        if extra.get("tool_choice") not in (None, "none"):
            found.append("tool_choice")
        if extra.get("logprobs") or extra.get("top_logprobs"):
            found.append("logprobs")
        if extra.get("logit_bias"):
            found.append("logit_bias")
        found += [k for k in ("presence_penalty", "frequency_penalty") if extra.get(k) not in (None, 0)]
        response_format = extra.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
            found.append("response_format")
        if extra.get("modalities") not in (None, ["text"]):
            found.append("modalities")
        return found


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kitchen"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FeedbackRequest(BaseModel):
    """``POST /v1/feedback``: a rating, a score (higher is better) and/or a corrected or preferred reply
    for one choice of a completion this server returned."""

    model_config = ConfigDict(extra="forbid")

    completion_id: str = Field(min_length=1)
    choice_index: int = Field(default=0, ge=0)
    rating: Literal["up", "down"] | None = None
    score: float | None = Field(default=None, allow_inf_nan=False)
    correction: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _something(self) -> FeedbackRequest:
        if self.rating is None and self.score is None and self.correction is None:
            raise ValueError("give a rating ('up' or 'down'), a score or a correction")
        return self


class FeedbackReceipt(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    created: int
    completion_id: str
    choice_index: int
    model: str = Field(description="The version that produced the rated reply.")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail
