"""Batched autoregressive generation with a KV cache, honouring Tinker's ``SamplingParams``.

Our own loop rather than ``transformers.generate`` because rows of one batch come from different
requests: each row needs its own seed (same seed ⇒ same sample, whatever it was batched with), its
own ``max_tokens``, temperature, top-k/top-p and stop rule.

Stop semantics follow the Tinker service (tinker-cookbook's renderers rely on them): generation ends
right after the token that emits a stop token id, completes a stop string, or is EOS, and that token
**is included** in the returned tokens (and logprobs). Tokens are atomic, so a stop string completed
mid-token keeps the whole token. Stop strings are matched in the generated text only, never the
prompt. ``stop=None`` stops at EOS only; a non-empty ``stop`` adds to EOS; ``stop=[]`` disables
stopping altogether, EOS included, so generation runs to ``max_tokens``.

Returned logprobs are the model's own ``log p(token | prefix)`` (temperature 1, before top-k/top-p),
the same quantity ``compute_logprobs`` and training's ``forward`` report.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tinker import types

_MAX_BYTES_PER_CHAR = 4
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StopRule:
    token_ids: frozenset[int]
    strings: tuple[str, ...]

    @property
    def window(self) -> int:
        """Generated tokens to decode when looking for a stop string: enough to hold the longest one
        even if every token carries a single byte, plus the token it may start inside."""
        return _MAX_BYTES_PER_CHAR * max((len(s) for s in self.strings), default=0) + 2


def stop_rule(stop: str | Sequence[str] | Sequence[int] | None, eos_ids: frozenset[int]) -> StopRule:
    if stop is None:
        return StopRule(eos_ids, ())
    items: list[Any] = [stop] if isinstance(stop, str) else list(stop)
    if not items:
        return StopRule(frozenset(), ())
    if all(isinstance(item, str) for item in items):
        if any(not item for item in items):
            raise ValueError("stop strings must be non-empty")
        return StopRule(eos_ids, tuple(items))
    if all(isinstance(item, int) and not isinstance(item, bool) for item in items):
        return StopRule(eos_ids | frozenset(items), ())
    raise ValueError(f"stop must be strings or token ids, not a mix: {items!r}")


@dataclass(frozen=True)
class RowParams:
    """One sequence to generate: a prompt and the validated sampling settings for it."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stop: StopRule
    seed: int
    on_token: Callable[[int], None] | None = field(default=None, compare=False)
    """Called with each token as it is chosen (streaming); a listener that raises is dropped, not the row."""


@dataclass
class RowResult:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: types.StopReason | None = None


def check_sampling_params(params: types.SamplingParams) -> None:
    """Refuse settings the sampler cannot honour, at submission time rather than mid-batch."""
    if params.max_tokens is not None and params.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {params.max_tokens}")
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise ValueError(f"temperature must be finite and >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < -1:
        raise ValueError(f"top_k must be -1 or 0 (off) or positive, got {params.top_k}")


def sample_token(logits: torch.Tensor, row: RowParams, generator: torch.Generator) -> int:
    """A draw from the temperature-scaled (temperature > 0), top-k/top-p-truncated distribution with the
    row's own generator; greedy rows never come here (``choose_tokens`` takes their argmax on the device)."""
    scaled = logits / row.temperature
    if 0 < row.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, row.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if row.top_p < 1:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        preceding = torch.cumsum(probs, dim=-1) - probs
        drop = torch.zeros_like(scaled, dtype=torch.bool)
        drop[order] = preceding >= row.top_p
        scaled = scaled.masked_fill(drop, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(
    model: Any, tokenizer: Any, rows: Sequence[RowParams], device: torch.device, pad_id: int
) -> list[RowResult]:
    """Generate every row in one left-padded batch; finished rows are dropped from the batch.

    Rows with the same prompt (a request's ``num_samples``, RL's group) share one prefill: each distinct
    prompt is run once and its KV cache copied to every row that starts from it.

    Per step, greedy rows take their token by one on-device argmax over the batch and every row's logprob
    is gathered on the device from the batch's ``log_softmax``; only sampled rows' logits leave it (each
    row draws with its own generator), and one copy brings the chosen tokens and logprobs to the host.
    """
    from resources.local_engine.kv_cache import RESERVE_BLOCK, reserved_cache  # imports transformers

    results = [RowResult() for _ in rows]
    generators = [torch.Generator().manual_seed(row.seed) for row in rows]
    distinct: dict[tuple[int, ...], int] = {}
    source = [distinct.setdefault(tuple(row.prompt), len(distinct)) for row in rows]
    prompts = list(distinct)
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        attention[i, width - len(prompt) :] = 1
    attention = attention.to(device)
    positions = (attention.cumsum(dim=-1) - 1).clamp(min=0)
    next_position = attention.sum(dim=-1, keepdim=True)
    active = list(range(len(rows)))
    deaf: set[int] = set()
    cache = reserved_cache(model, reserve=min(max(row.max_tokens for row in rows), RESERVE_BLOCK))
    with torch.inference_mode():
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=attention,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = out.past_key_values
        last_logits = out.logits[:, -1, :]
        if len(prompts) < len(rows):
            index = torch.tensor(source, device=device)
            cache.batch_select_indices(index)
            attention, next_position, last_logits = attention[index], next_position[index], last_logits[index]
        while True:
            tokens, logprobs = choose_tokens(
                last_logits, [rows[i] for i in active], [generators[i] for i in active]
            )
            for batch_index, row_index in enumerate(active):
                row, result = rows[row_index], results[row_index]
                token = tokens[batch_index]
                result.tokens.append(token)
                result.logprobs.append(logprobs[batch_index])
                result.stop_reason = _stop_reason(tokenizer, row, result)
                if row.on_token is not None and row_index not in deaf:
                    try:
                        row.on_token(token)
                    except Exception:  # the listener's failure (a client gone) must not fail the batch
                        log.warning(
                            "a token listener raised; row %d streams no more", row_index, exc_info=True
                        )
                        deaf.add(row_index)
            keep = [i for i, row_index in enumerate(active) if results[row_index].stop_reason is None]
            if not keep:
                return results
            if len(keep) < len(active):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                attention, next_position = attention[index], next_position[index]
                active = [active[i] for i in keep]
                tokens = [tokens[i] for i in keep]
            attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=-1)
            out = model(
                input_ids=torch.tensor(tokens, dtype=torch.long, device=device)[:, None],
                attention_mask=attention,
                position_ids=next_position,
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            last_logits = out.logits[:, -1, :]
            next_position = next_position + 1


def choose_tokens(
    last_logits: torch.Tensor, rows: Sequence[RowParams], generators: Sequence[torch.Generator]
) -> tuple[list[int], list[float]]:
    """Each row's next token and its logprob under the model (temperature 1, untruncated).

    Greedy rows: ``argmax`` over the batch at once (the first maximum); sampled rows: ``sample_token``.
    The logprob is ``log_softmax(logits)[token]``, gathered on the device: the same kernel on the same
    logits as training's ``cross_entropy``, so the values are bit-identical to a full ``log_softmax``.
    """
    logits = last_logits.float()
    chosen = torch.argmax(logits, dim=-1)
    sampled = [i for i, row in enumerate(rows) if row.temperature != 0]
    if sampled:
        host = logits[sampled].cpu()
        picks = [sample_token(host[j], rows[i], generators[i]) for j, i in enumerate(sampled)]
        chosen[sampled] = torch.tensor(picks, dtype=chosen.dtype, device=chosen.device)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, chosen[:, None])[:, 0]
    return chosen.tolist(), logprobs.tolist()


def _stop_reason(tokenizer: Any, row: RowParams, result: RowResult) -> types.StopReason | None:
    if result.tokens[-1] in row.stop.token_ids:
        return "stop"
    if row.stop.strings:
        tail = tokenizer.decode(result.tokens[-row.stop.window :], skip_special_tokens=False)
        if any(s in tail for s in row.stop.strings):
            return "stop"
    if len(result.tokens) >= row.max_tokens:
        return "length"
    return None
