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
) -> list[torch.Tensor]:
    """``log p(targets[i][t] | inputs[i][: t + 1])`` for each sequence, unpadded, float32.

    Sequences are right-padded into one batch. No attention mask is needed: under a causal mask a
    real position never sees the padding after it, and leaving the mask out keeps SDPA on its fused
    causal path. Gradients flow when the caller has them enabled.
    """
    lengths = [len(seq) for seq in inputs]
    batch, width = len(inputs), max(lengths)
    input_ids = torch.zeros((batch, width), dtype=torch.long)
    target_ids = torch.zeros((batch, width), dtype=torch.long)
    for row, (seq, tgt) in enumerate(zip(inputs, targets, strict=True)):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        target_ids[row, : len(seq)] = tgt.to(torch.long)
    logits = model(input_ids=input_ids.to(device), use_cache=False).logits
    vocab = logits.shape[-1]
    logprobs = -F.cross_entropy(
        logits.float().reshape(-1, vocab), target_ids.to(device).reshape(-1), reduction="none"
    ).reshape(batch, width)
    return [logprobs[row, :length] for row, length in enumerate(lengths)]


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
