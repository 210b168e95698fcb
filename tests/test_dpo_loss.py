"""The DPO objective: tinker-cookbook's and TRL's formulas, checked against numbers computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from kitchen.workflows.dpo.loss import dpo_loss, sequence_logprob

# Two pairs: policy and reference sequence log-probabilities of the chosen and the rejected reply.
CHOSEN, REJECTED = [-10.0, -20.0], [-12.0, -18.0]
REF_CHOSEN, REF_REJECTED = [-11.0, -19.0], [-11.0, -19.0]
# Log-ratios: chosen (+1, -1), rejected (-1, +1); d = Δc - Δr = (+2, -2).


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_sigmoid_is_tinker_cookbooks_compute_dpo_loss() -> None:
    beta = 0.5
    loss, metrics = dpo_loss(_t(CHOSEN), _t(REJECTED), _t(REF_CHOSEN), _t(REF_REJECTED), beta=beta)
    # -log σ(x) = log(1 + e^-x); pairs at β d = +1 and -1
    expected = (_softplus(-1.0) + _softplus(1.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics == pytest.approx(
        {
            "dpo_loss": expected,
            "accuracy": 0.5,  # one pair of two has Δc > Δr
            "margin": 0.0,  # mean β d over (+1, -1)
            "chosen_reward": 0.0,  # mean β Δc over (+0.5, -0.5)
            "rejected_reward": 0.0,
        }
    )


def test_the_gradient_is_the_formulas() -> None:
    beta = 0.5
    chosen, rejected = _t(CHOSEN), _t(REJECTED)
    loss, _ = dpo_loss(chosen, rejected, _t(REF_CHOSEN), _t(REF_REJECTED), beta=beta)
    loss.backward()
    # d/dπc of mean(-log σ(β d)) = -β σ(-β d) / n; d/dπr is its negative
    sigma = [1 / (1 + math.exp(x)) for x in (1.0, -1.0)]
    assert chosen.grad is not None and rejected.grad is not None
    assert chosen.grad.tolist() == pytest.approx([-beta * s / 2 for s in sigma], rel=1e-6)
    assert rejected.grad.tolist() == pytest.approx([beta * s / 2 for s in sigma], rel=1e-6)


def test_trls_hinge_and_ipo() -> None:
    beta = 0.25
    hinge, _ = dpo_loss(
        _t(CHOSEN), _t(REJECTED), _t(REF_CHOSEN), _t(REF_REJECTED), beta=beta, loss_type="hinge"
    )
    assert hinge.item() == pytest.approx((max(0, 1 - 0.5) + max(0, 1 + 0.5)) / 2)
    ipo, metrics = dpo_loss(
        _t(CHOSEN), _t(REJECTED), _t(REF_CHOSEN), _t(REF_REJECTED), beta=beta, loss_type="ipo"
    )
    assert ipo.item() == pytest.approx(((2 - 2) ** 2 + (-2 - 2) ** 2) / 2)  # (d - 1/(2β))², 1/(2β) = 2
    assert metrics["dpo_loss"] == pytest.approx(8.0)


def test_policy_equal_to_reference() -> None:
    values = _t([-31.25, -7.5, -102.0])
    loss, metrics = dpo_loss(values, values - 1, values.detach(), values.detach() - 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["accuracy"] == 0.0 and metrics["margin"] == 0.0
    # Rounding in the last bits (two engines' batching) is a tie, not a preference.
    nudged = values.detach() * (1 + 2e-7)
    _, metrics = dpo_loss(nudged, values - 1, values.detach(), values.detach() - 1, beta=0.1)
    assert metrics["accuracy"] == 0.0
    _, metrics = dpo_loss(values + 0.01, values - 1, values.detach(), values.detach() - 1, beta=0.1)
    assert metrics["accuracy"] == 1.0


def test_sequence_logprob_sums_or_averages_the_weighted_tokens() -> None:
    lp, w = torch.tensor([-1.0, -2.0, -3.0, -4.0]), torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert sequence_logprob(lp, w, normalize=False).item() == -5.0
    assert sequence_logprob(lp, w, normalize=True).item() == -2.5


def test_bad_settings_are_refused() -> None:
    args = (_t(CHOSEN), _t(REJECTED), _t(REF_CHOSEN), _t(REF_REJECTED))
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(*args, beta=0.0)
    with pytest.raises(ValueError, match="unknown DPO loss 'kto'"):
        dpo_loss(*args, beta=0.1, loss_type="kto")
