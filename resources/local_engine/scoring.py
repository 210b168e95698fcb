"""Per-token log-probabilities of target tokens: the one computation training and scoring share.

Training's ``forward``/``forward_backward`` and sampling's ``compute_logprobs`` both go through
``target_logprobs``, so the numbers they report agree by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from resources.local_engine import vocab


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

    A prefix every sequence shares (a chat template's system turn, a DPO pair's prompt, an RL group's
    problem) runs through the decoder once, and the rest of each sequence attends to its keys and values
    (``shared_prefix``): the same function of the weights, with gradients summed over the sequences by
    autograd, in far fewer FLOPs when the prefix is a large part of the batch. On the CPU only: a GPU at
    these sizes is bound by kernel launches, not FLOPs, and the second decoder pass doubles them (an H200
    with SmolLM2-135M trained the default workload at 2.5x less speed with the prefix shared).
    """
    lengths = [len(seq) for seq in inputs]
    head = _split_head(model)
    # Everything the host decides (targets, which positions keep a graph, the shared prefix) is decided
    # from host tensors and copied to the device ahead of the model's work, so nothing here makes the host
    # wait for the device mid-step (on a GPU, a wait stops the host queueing work while the device runs).
    host_targets = [t.to(dtype=torch.long) for t in targets]
    flat_targets = _to_device(torch.cat(host_targets), device)
    if head is None:
        logits = model(input_ids=_to_device(_right_padded(inputs), device), use_cache=False).logits
        real = [logits[row, :length] for row, length in enumerate(lengths)]
        return list(_logprobs(torch.cat(real), flat_targets).split(lengths))
    decoder, lm_head = head
    target_rows = list(flat_targets.split(lengths))
    wanted = None
    if torch.is_grad_enabled() and grad_positions is not None:
        wanted = [mask.to(dtype=torch.bool, device="cpu") for mask in grad_positions]
    prefix = shared_prefix(inputs) if device.type == "cpu" else 0
    if not prefix:
        hidden = decoder(
            input_ids=_to_device(_right_padded(inputs), device), use_cache=False
        ).last_hidden_state
        rows = [hidden[row, :length] for row, length in enumerate(lengths)]
        return _project(lm_head, rows, target_rows, wanted, device)
    # Positions before ``agreed`` have the same input prefix and the same target in every row: their
    # logprob is one number, projected once and shared (autograd sums the rows' gradients into it).
    agreed = _agreed_targets(host_targets, prefix)
    prefix_hidden, rest_hidden = _decode_with_shared_prefix(decoder, inputs, prefix, device)
    rows = [
        torch.cat([prefix_hidden[agreed:], rest_hidden[row, : length - prefix]])
        for row, length in enumerate(lengths)
    ]
    shared = [prefix_hidden[:agreed]] if agreed else []
    shared_targets = [target_rows[0][:agreed]] if agreed else []
    row_wanted = None
    if wanted is not None:
        shared_wanted = [torch.stack([mask[:agreed] for mask in wanted]).any(dim=0)] if agreed else []
        row_wanted = shared_wanted + [mask[agreed:] for mask in wanted]
    projected = _project(
        lm_head, shared + rows, shared_targets + [t[agreed:] for t in target_rows], row_wanted, device
    )
    if not agreed:
        return projected
    common, own = projected[0], projected[1:]
    return [torch.cat([common, row]) for row in own]


def _project(
    lm_head: Any,
    rows: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    wanted: Sequence[torch.Tensor] | None,
    device: torch.device,
) -> list[torch.Tensor]:
    """Each row's hidden states projected onto the vocabulary and scored against its targets; with
    ``wanted`` (host masks) only those positions keep a graph (the rest are projected without one, in
    blocks)."""
    lengths = [len(row) for row in rows]
    real_hidden, flat_targets = torch.cat(list(rows)), torch.cat(list(targets))
    if not torch.is_grad_enabled():
        return list(_projected_logprobs(lm_head, real_hidden, flat_targets).split(lengths))
    if wanted is None:
        return list(_graded_logprobs(lm_head, real_hidden, flat_targets).split(lengths))
    flat_wanted = torch.cat(list(wanted))
    # One position stays in the graph even when none needs it, so the loss can still be back-propagated
    # (to zero gradients, as before) and the optimizer's step counts stay what they were.
    flat_wanted[0] = True
    with_grad = _to_device(flat_wanted.nonzero().squeeze(1), device)
    without = _to_device((~flat_wanted).nonzero().squeeze(1), device)
    with torch.no_grad():
        flat = torch.zeros(len(flat_targets), dtype=torch.float32, device=device)
        if len(without):
            flat[without] = _projected_logprobs(lm_head, real_hidden[without], flat_targets[without])
    graded = _graded_logprobs(lm_head, real_hidden[with_grad], flat_targets[with_grad])
    return list(flat.index_put((with_grad,), graded).split(lengths))


def _graded_logprobs(lm_head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Target logprobs with a graph; many rows walk the vocabulary in slices (``vocab``), keeping no
    rows x vocabulary tensor."""
    if vocab.eligible(lm_head, hidden):
        return vocab.target_logprobs(hidden, lm_head.weight, targets)
    return _logprobs(lm_head(hidden), targets)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor's copy on ``device``, queued without waiting for the device's earlier work (the
    host tensor is not reused, so the copy may complete later)."""
    return tensor.to(device, non_blocking=True)


def _agreed_targets(targets: Sequence[torch.Tensor], prefix: int) -> int:
    """How many of the first ``prefix`` positions have the same target in every row (host tensors)."""
    first = targets[0][:prefix]
    differs = torch.zeros(prefix, dtype=torch.bool, device=first.device)
    for row in targets[1:]:
        differs |= row[:prefix] != first
    return int(differs.nonzero()[0]) if bool(differs.any()) else prefix


#: The shortest shared prefix worth its own decoder pass: below it, the saving is smaller than the cost
#: of the extra pass and of copying the prefix's keys and values to every sequence.
MIN_SHARED_PREFIX = 8


def shared_prefix(inputs: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every sequence of the batch has in common, if worth sharing, else 0.

    At least one token of each sequence is left out of the prefix, so every sequence has a part of its
    own to decode after it.
    """
    if len(inputs) < 2:
        return 0
    first, limit = inputs[0], min(len(seq) for seq in inputs) - 1
    length = 0
    while length < limit and all(seq[length] == first[length] for seq in inputs):
        length += 1
    return length if length >= MIN_SHARED_PREFIX else 0


def _decode_with_shared_prefix(
    decoder: Any, inputs: Sequence[Sequence[int]], prefix: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's last hidden states for ``inputs`` whose first ``prefix`` tokens are the same in every
    row: the prefix's ``(prefix, hidden)``, decoded once (batch 1), and the right-padded remainders'
    ``(rows, width, hidden)``, decoded at positions ``prefix, prefix + 1, ...`` attending to the prefix's
    keys and values (repeated for every row)."""
    batch = len(inputs)
    head = _to_device(torch.tensor([list(inputs[0][:prefix])], dtype=torch.long), device)
    out = decoder(input_ids=head, use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(batch)
    rest = _to_device(_right_padded([seq[prefix:] for seq in inputs]), device)
    positions = torch.arange(prefix, prefix + rest.shape[1], device=device).expand(batch, -1)
    tail = decoder(input_ids=rest, past_key_values=cache, position_ids=positions, use_cache=True)
    return out.last_hidden_state[0], tail.last_hidden_state


def _right_padded(inputs: Sequence[Sequence[int]]) -> torch.Tensor:
    width = max(len(seq) for seq in inputs)
    input_ids = torch.zeros((len(inputs), width), dtype=torch.long)
    for row, seq in enumerate(inputs):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return input_ids


def _logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(logits.float(), targets, reduction="none")


#: Positions projected onto the vocabulary at once without a graph: bounds the logits' memory
#: (256 x 49152 floats is 50 MB, twice that with their log-softmax) whatever the batch's length, while
#: each block is still a large matrix product.
PROJECTION_ROWS = 256
#: From this many positions without a graph, the vocabulary is walked in slices instead (``vocab``): as
#: fast from here on (this CPU: 120 against 123 ms at 230 rows, 64 against 64 at 128), and it holds one
#: slice of logits (8 MB) where a block holds the block's logits and their log-softmax (100 MB at 256
#: rows, coming on top of the forward's saved activations: the step's peak).
SLICED_PROJECTION_ROWS = 128


def _projected_logprobs(lm_head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``_logprobs(lm_head(hidden), targets)`` without a graph: from ``SLICED_PROJECTION_ROWS`` rows the
    vocabulary is walked in slices (``vocab``: one pass over the projection matrix, where every row block
    would read all of it again, and one slice of logits held); fewer, or a projection ``vocab`` does not
    take, go in row blocks. Either way no rows x vocabulary tensor is kept."""
    if vocab.eligible(lm_head, hidden, min_rows=SLICED_PROJECTION_ROWS):
        return vocab.target_logprobs(hidden, lm_head.weight, targets)
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
