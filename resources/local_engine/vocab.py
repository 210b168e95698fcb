"""Log-probabilities of target tokens over a large vocabulary, a slice of the vocabulary at a time.

Why: for a long batch the plain computation materialises logits, their log-softmax and, in the
backward pass, two more tensors of the same size (rows x vocabulary: 400 MB each for 2,048 positions of
SmolLM2's 49,152 tokens), each a pass over memory and, freshly allocated, a page fault per 4 KB. Blocking by
rows instead reads the whole projection matrix again for every block. Here the projection is walked in
vocabulary slices: every slice's logits for all rows are small enough to stay in cache while a running
log-sum-exp absorbs them; the backward pass turns the saved logits into probabilities in place, slice by
slice, each slice's product with the projection following while it is in cache. One rows x vocabulary
tensor in all, instead of four.

The value is the plain computation's up to float rounding (the log-sum-exp is accumulated in a different
order); ``tests/test_local_engine_speed.py`` checks values and gradients against ``F.cross_entropy``.
"""

from __future__ import annotations

from typing import Any

import torch

#: Logits of one slice for all rows, in floats: 2M floats is 8 MB, about what stays in this CPU's cache.
SLICE_FLOATS = 1 << 21
#: Fewer rows than this take the plain path when a graph is kept: their logits are small, and the plain
#: path is exact.
MIN_ROWS = 512


def eligible(lm_head: Any, hidden: torch.Tensor, min_rows: int = MIN_ROWS) -> bool:
    """A plain, frozen, bias-free float32 projection on the CPU and enough rows for slicing to pay. The
    slices are sized for a CPU's cache; on a GPU the fused ``cross_entropy`` over the whole logits is the
    faster path (the slice loop's small kernels and per-slice index lookups cost more than the memory
    passes they save)."""
    return (
        hidden.device.type == "cpu"
        and type(lm_head) is torch.nn.Linear
        and lm_head.bias is None
        and not lm_head.weight.requires_grad
        and lm_head.weight.dtype == torch.float32
        and hidden.dtype == torch.float32
        and hidden.shape[0] >= min_rows
    )


def target_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(hidden @ weight.T)[i, targets[i]]`` for every row ``i``, differentiable in ``hidden``
    when gradients are enabled (without them, only one slice of logits is held at a time)."""
    if not torch.is_grad_enabled():
        return _forward(hidden, weight, targets, keep=False)[0]
    out: torch.Tensor = _SlicedLogprobs.apply(hidden, weight, targets)
    return out


def _slice(rows: int, vocab: int) -> int:
    return max(256, min(vocab, SLICE_FLOATS // max(rows, 1)))


def _forward(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, keep: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(target logprobs, logsumexp, logits) per row, the vocabulary walked in slices; ``keep``: the logits
    of the whole vocabulary are returned, else only the last slice's buffer."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    width = _slice(rows, vocab)
    logits = torch.empty((rows, vocab if keep else width), dtype=torch.float32, device=hidden.device)
    running_max = torch.full((rows,), float("-inf"), dtype=torch.float32, device=hidden.device)
    running_sum = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
    target_logit = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    for start in range(0, vocab, width):
        end = min(start + width, vocab)
        part = logits[:, start:end] if keep else logits[:, : end - start]
        torch.mm(hidden, weight[start:end].T, out=part)
        inside = ((targets >= start) & (targets < end)).nonzero().squeeze(1)
        target_logit[inside] = part[inside, targets[inside] - start]
        new_max = torch.maximum(running_max, part.amax(dim=1))
        exp_sum = torch.exp(part - new_max[:, None]).sum(dim=1)
        running_sum = running_sum * torch.exp(running_max - new_max) + exp_sum
        running_max = new_max
    logsumexp = running_max + running_sum.log()
    return target_logit - logsumexp, logsumexp, logits


class _SlicedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logprobs, logsumexp, logits = _forward(hidden, weight, targets, keep=True)
        ctx.save_for_backward(weight, targets, logsumexp, logits)
        return logprobs

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        """d logprob_i / d hidden_i = weight[target_i] - softmax_i @ weight, times the incoming gradient;
        the softmax is made in place of the saved logits, a slice at a time."""
        weight, targets, logsumexp, logits = ctx.saved_tensors
        rows, vocab = logits.shape
        grad = grad.to(torch.float32)
        grad_hidden = grad[:, None] * weight[targets]
        width = _slice(rows, vocab)
        for start in range(0, vocab, width):
            probs = logits[:, start : start + width].sub_(logsumexp[:, None]).exp_().mul_(grad[:, None])
            grad_hidden.sub_(probs @ weight[start : start + width])
        return grad_hidden, None, None
