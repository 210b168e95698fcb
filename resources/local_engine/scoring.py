"""Per-token log-probabilities of target tokens: the one computation training and scoring share.

Training's ``forward``/``forward_backward`` and sampling's ``compute_logprobs`` both go through
``target_logprobs``, so the numbers they report agree by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def target_logprobs(
    model: Any,
    inputs: Sequence[Sequence[int]],
    targets: Sequence[torch.Tensor],
    device: torch.device,
    grad_positions: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """``log p(targets[i][t] | inputs[i][: t + 1])`` for each sequence, unpadded, float32.

    Sequences are right-padded into one batch. No attention mask is needed: under a causal mask a
    real position never sees the padding after it, and leaving the mask out keeps SDPA on its fused
    causal path. Gradients flow when the caller has them enabled.

    The vocabulary projection (a fifth of a small model's FLOPs) runs only on real positions, never on
    padding. ``grad_positions`` (per sequence, a bool mask) names the positions whose logprob the loss can
    differentiate; the others (the prompt, in SFT most of the sequence) get their logprob without a
    graph, so their logits are neither kept nor back-propagated. Their gradient would be zero anyway.
    """
    lengths = [len(seq) for seq in inputs]
    batch, width = len(inputs), max(lengths)
    input_ids = torch.zeros((batch, width), dtype=torch.long)
    for row, seq in enumerate(inputs):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    head = _split_head(model)
    if head is None:
        logits = model(input_ids=input_ids.to(device), use_cache=False).logits
        real = [logits[row, :length] for row, length in enumerate(lengths)]
        flat_logprobs = _logprobs(torch.cat(real), torch.cat(list(targets)).to(device))
        return list(flat_logprobs.split(lengths))
    decoder, lm_head = head
    hidden = decoder(input_ids=input_ids.to(device), use_cache=False).last_hidden_state
    real_hidden = torch.cat([hidden[row, :length] for row, length in enumerate(lengths)])
    flat_targets = torch.cat([t.to(torch.long) for t in targets]).to(device)
    if not torch.is_grad_enabled():
        return list(_projected_logprobs(lm_head, real_hidden, flat_targets).split(lengths))
    if grad_positions is None:
        return list(_logprobs(lm_head(real_hidden), flat_targets).split(lengths))
    wanted = torch.cat([mask.to(torch.bool) for mask in grad_positions]).to(device)
    # One position stays in the graph even when none needs it, so the loss can still be back-propagated
    # (to zero gradients, as before) and the optimizer's step counts stay what they were.
    wanted[0] = True
    with_grad = wanted.nonzero().squeeze(1)
    without = (~wanted).nonzero().squeeze(1)
    with torch.no_grad():
        flat = torch.zeros(len(flat_targets), dtype=torch.float32, device=device)
        if len(without):
            flat[without] = _projected_logprobs(lm_head, real_hidden[without], flat_targets[without])
    graded = _logprobs(lm_head(real_hidden[with_grad]), flat_targets[with_grad])
    return list(flat.index_put((with_grad,), graded).split(lengths))


def _logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(logits.float(), targets, reduction="none")


#: Positions projected onto the vocabulary at once without a graph: bounds the logits' memory
#: (1024 x 49152 floats is 200 MB) whatever the batch's length.
PROJECTION_ROWS = 1024


def _projected_logprobs(lm_head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``_logprobs(lm_head(hidden), targets)`` in blocks of rows; only without a graph (no autograd)."""
    return torch.cat(
        [
            _logprobs(
                lm_head(hidden[start : start + PROJECTION_ROWS]), targets[start : start + PROJECTION_ROWS]
            )
            for start in range(0, len(targets), PROJECTION_ROWS)
        ]
    )


#: Configs that change logits after the vocabulary projection: such models take the whole forward.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def _split_head(model: Any) -> tuple[Any, Any] | None:
    """The model as (decoder -> final hidden states, vocabulary projection), when logits are exactly
    ``lm_head(hidden)`` (the Llama-style causal LMs); ``None`` for anything else."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(inner, "get_decoder", None)
    lm_head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if get_decoder is None or lm_head is None:
        return None
    if any(getattr(inner.config, key, None) not in (None, 1, 1.0) for key in _LOGIT_POSTPROCESSING):
        return None
    decoder = get_decoder()
    if decoder is None or decoder is inner:
        return None
    return decoder, lm_head


def token_budget_chunks(lengths: Sequence[int], max_tokens: int, max_rows: int | None = None) -> list[range]:
    """Consecutive index ranges whose padded size (rows x longest) stays within ``max_tokens``.

    A single sequence longer than the budget gets a chunk of its own rather than being refused.
    """
    chunks: list[range] = []
    start, longest = 0, 0
    for index, length in enumerate(lengths):
        rows = index - start + 1
        widest = max(longest, length)
        too_big = rows * widest > max_tokens or (max_rows is not None and rows > max_rows)
        if index > start and too_big:
            chunks.append(range(start, index))
            start, widest = index, length
        longest = widest
    if lengths:
        chunks.append(range(start, len(lengths)))
    return chunks
