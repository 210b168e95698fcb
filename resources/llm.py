"""Chat LLMs (the ``llm`` resource): any OpenAI-compatible endpoint (vendor APIs, vLLM, Ollama,
``kitchen serve``), or a Kitchen sampling client (local engine or Tinker) so a judge runs offline."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import dagster as dg
from pydantic import Field
from tinker import types

from kitchen.contract import SamplingClient
from kitchen.data.datums import generation_prompt
from kitchen.models.base import DEFAULT_MODEL
from kitchen.ports.llm import ChatMessage, LLMClient, LLMError, LLMResponse
from resources.openai_http import post_json
from resources.training import TrainingBackend


class LLMResource(dg.ConfigurableResource, ABC):
    """Opens an ``LLMClient``; the training backend is there for implementations that sample from it."""

    @abstractmethod
    def client(self, training: TrainingBackend) -> LLMClient: ...


class OpenAIChatClient:
    """``POST {base_url}/chat/completions``; bounded timeout and retries, the key from ``$api_key_env``."""

    def __init__(
        self, base_url: str, model: str, api_key_env: str | None, timeout_s: float, max_retries: int
    ) -> None:
        self.base_url, self.model = base_url, model
        self.api_key_env, self.timeout_s, self.max_retries = api_key_env, timeout_s, max_retries

    @property
    def model_id(self) -> str:
        return f"{self.model}@{self.base_url}"

    def chat(
        self, messages: Sequence[ChatMessage], *, max_tokens: int = 256, temperature: float = 0.0
    ) -> LLMResponse:
        started = time.perf_counter()
        body = post_json(
            self.base_url,
            "chat/completions",
            {
                "model": self.model,
                "messages": [dict(m) for m in messages],
                "max_tokens": max_tokens,
                "temperature": temperature,
            },
            key_env=self.api_key_env,
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            error=LLMError,
        )
        try:
            content = body["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise LLMError(f"{self.base_url}/chat/completions answered without choices[0].message") from None
        usage = body.get("usage") or {}
        return LLMResponse(
            content=str(content),
            model=str(body.get("model") or self.model),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            latency_s=time.perf_counter() - started,
        )


class OpenAICompatibleLLM(LLMResource):
    base_url: str = Field(
        description="e.g. https://api.openai.com/v1, or http://localhost:8000/v1 (kitchen serve)"
    )
    model: str = Field(description="The endpoint's model name.")
    api_key_env: str | None = Field(
        default="OPENAI_API_KEY", description="Environment variable with the key."
    )
    timeout_s: float = Field(default=60.0, gt=0, le=600)
    max_retries: int = Field(default=2, ge=0, le=10)

    def client(self, training: TrainingBackend) -> LLMClient:
        return OpenAIChatClient(self.base_url, self.model, self.api_key_env, self.timeout_s, self.max_retries)


class SamplingChatClient:
    """Chat on a contract ``SamplingClient``: the conversation through the model's chat template (as
    training and ``kitchen serve`` render it), one sample, decoded up to end of turn."""

    def __init__(self, sampler: SamplingClient, model_id: str, tokenizer: Any | None = None) -> None:
        self.sampler, self._model_id = sampler, model_id
        self.tokenizer = tokenizer if tokenizer is not None else sampler.get_tokenizer()

    @property
    def model_id(self) -> str:
        return self._model_id

    def chat(
        self, messages: Sequence[ChatMessage], *, max_tokens: int = 256, temperature: float = 0.0
    ) -> LLMResponse:
        started = time.perf_counter()
        try:
            prompt = generation_prompt(
                [{"role": m["role"], "content": m["content"]} for m in messages], self.tokenizer
            )
            eos = getattr(self.tokenizer, "eos_token", None)
            params = types.SamplingParams(
                max_tokens=max_tokens, temperature=temperature, stop=[eos] if eos else None
            )
            result = self.sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result()
        except Exception as failure:
            reason = " ".join(str(failure).split())[:200]
            raise LLMError(
                f"sampling from {self._model_id} failed: {type(failure).__name__}: {reason}"
            ) from None
        tokens = list(result.sequences[0].tokens)
        return LLMResponse(
            content=self.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
            model=self._model_id,
            prompt_tokens=len(prompt),
            completion_tokens=len(tokens),
            latency_s=time.perf_counter() - started,
        )


class KitchenSamplingLLM(LLMResource):
    """A model the training backend samples from: the packaged model by default (offline, weak, but the
    whole judge path runs), or trained weights (``sampler_path``, e.g. a registered champion's)."""

    model: str = Field(default=DEFAULT_MODEL, description="Base model, as --model takes it.")
    sampler_path: str | None = Field(default=None, description="Weights to sample from instead of the base.")

    def client(self, training: TrainingBackend) -> LLMClient:
        service = training.service_client()
        base = training.resolve_base_model(self.model)
        if self.sampler_path:
            sampler = service.create_sampling_client(model_path=self.sampler_path).result()
            model_id = f"{base.name}+{self.sampler_path}"
        else:
            sampler = service.create_sampling_client(base_model=base.backend_model).result()
            model_id = f"{base.name}@{base.content_hash[:12]}"
        return SamplingChatClient(sampler, model_id)
