"""The DPO objective on sequence log-probabilities: tinker-cookbook's ``compute_dpo_loss`` and TRL's variants.

With log-ratios ``Δc = π(chosen) - ref(chosen)`` and ``Δr = π(rejected) - ref(rejected)`` per pair
(sequence log-probabilities: the token sum of the weighted log-probabilities, no length normalisation)
and ``d = Δc - Δr``, the per-pair losses are

- ``sigmoid`` (DPO, the default): ``-log σ(β d)``, exactly tinker-cookbook's ``compute_dpo_loss``;
- ``hinge`` (TRL, from RSO): ``max(0, 1 - β d)``;
- ``ipo`` (TRL): ``(d - 1 / (2β))²`` on *length-normalised* log-probabilities (a sequence's weighted
  sum divided by its weight sum), as TRL's ``DPOTrainer`` computes them for IPO;

and the loss is their mean over pairs. The metrics are tinker-cookbook's: ``dpo_loss``, ``accuracy``
(share of pairs with ``Δc > Δr``, strictly, so a policy equal to its reference scores 0), ``margin``
(mean ``β d``), ``chosen_reward`` and ``rejected_reward`` (mean ``β Δc``, ``β Δr``).

"Strictly" allows for float32 rounding: the policy's log-probabilities come from the training forward and
the reference's from the sampler, which may batch and pad the same sequence differently and so differ in
the last bits (about 1e-7 relative on the local engine). A ``d`` within ``TIE_TOLERANCE`` of the four
sequence log-probabilities' magnitude is a tie, so a policy equal to its reference scores 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F

LossType = Literal["sigmoid", "ipo", "hinge"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
#: Relative size of a difference of sequence log-probabilities that is float32 rounding, not preference.
TIE_TOLERANCE = 16 * float(torch.finfo(torch.float32).eps)


def sequence_logprob(token_logprobs: torch.Tensor, weights: torch.Tensor, *, normalize: bool) -> torch.Tensor:
    """``Σ w_t log p_t`` (tinker-cookbook's ``torch.dot``), divided by ``Σ w_t`` when ``normalize`` (IPO)."""
    total = torch.dot(token_logprobs.float(), weights.float())
    return total / weights.float().sum() if normalize else total


def normalizes_length(loss_type: str) -> bool:
    """Whether the variant works on length-normalised sequence log-probabilities (TRL: IPO only)."""
    return loss_type == "ipo"


def tie_tolerance(*values: torch.Tensor) -> torch.Tensor:
    """Per pair: how large a difference of these sequence log-probabilities rounding alone can make."""
    return TIE_TOLERANCE * sum((v.detach().abs() for v in values), torch.zeros(()))


def _stacked(values: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    return values if isinstance(values, torch.Tensor) else torch.stack(list(values))


def dpo_loss(
    chosen: Sequence[torch.Tensor] | torch.Tensor,
    rejected: Sequence[torch.Tensor] | torch.Tensor,
    ref_chosen: Sequence[torch.Tensor] | torch.Tensor,
    ref_rejected: Sequence[torch.Tensor] | torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean loss over pairs and the step's metrics; inputs are per-pair sequence log-probabilities."""
    if beta <= 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    values = [_stacked(v) for v in (chosen, rejected, ref_chosen, ref_rejected)]
    chosen_log_ratio = values[0] - values[2]
    rejected_log_ratio = values[1] - values[3]
    logits = chosen_log_ratio - rejected_log_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    loss = losses.mean()
    chosen_rewards = beta * chosen_log_ratio.detach()
    rejected_rewards = beta * rejected_log_ratio.detach()
    metrics = {
        "dpo_loss": loss.item(),
        "accuracy": (logits.detach() > tie_tolerance(*values)).float().mean().item(),
        "margin": (chosen_rewards - rejected_rewards).mean().item(),
        "chosen_reward": chosen_rewards.mean().item(),
        "rejected_reward": rejected_rewards.mean().item(),
    }
    return loss, metrics
