"""The registry of loss functions ``forward_backward`` accepts, with Tinker's semantics.

A loss receives, per datum, the log-probabilities the model assigns to ``target_tokens`` plus that
datum's other per-token ``loss_fn_inputs``, and returns a scalar to differentiate, per-datum outputs
and metrics. Tinker's built-in losses are per-token sums over datums, so the engine may split a batch
into micro-batches and accumulate gradients; a loss that couples datums goes through
``forward_backward_custom`` instead.

The formulas and ``loss_fn_config`` defaults are Tinker's documented ones (tinker-docs, "Loss
functions"): PPO clips the ratio to [0.8, 1.2], CISPO to [0.0, 4.0]. Tinker documents no default for
DRO's ``beta``, so here it is required rather than guessed. GSPO is the documented GSPO-token variant
(the sequence ratio's value, each token's own gradient) with PPO's clip range, the ε = 0.2 the docs give
for both. ``stable_reinforce`` is the tinker SDK's ``LossFnType`` of that name; Tinker publishes its
inputs (``target_tokens``, ``logprobs``, ``advantages`` and provenance naming sequences sampled with
``record_stability_info=True``) but not its objective, which uses information only the service records.
The local engine checks the provenance as the service would and trains with the importance-sampling
REINFORCE objective, ``q`` taken from what its own sampler recorded for those tokens: on the local
engine sampler and trainer share weights and numerics, so the ratio is 1 up to float error and the
gradient is REINFORCE's ``-A * grad(logprob)``, which any REINFORCE variant reduces to on-policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

LossConfig = Mapping[str, float | str]
"""``loss_fn_config`` as callers pass it (the SDK's type)."""
Config = Mapping[str, float]
"""A checked config with every default filled in: what a loss computes with."""
Inputs = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor
    """Scalar summed over the datums given; ``backward`` is called on it."""
    outputs: list[dict[str, torch.Tensor]]
    """Per datum, detached: becomes ``ForwardBackwardOutput.loss_fn_outputs``."""
    metrics: dict[str, torch.Tensor]
    """Named ``<metric>:<reduction>`` as Tinker does, so micro-batch parts can be combined. Scalar
    tensors, read only after the backward pass: reading one earlier would make the host wait for the
    device's forward before it could queue the backward (on a GPU, the two then no longer overlap)."""


LossCompute = Callable[
    [Sequence[torch.Tensor], Sequence[Inputs], Config, torch.Generator],
    LossOutput,
]


@dataclass(frozen=True)
class LossFn:
    name: str
    inputs: tuple[str, ...]
    """Per-token ``loss_fn_inputs`` a datum must carry (always including ``target_tokens``)."""
    compute: LossCompute
    config: Mapping[str, float | None] = field(default_factory=dict)
    """Accepted ``loss_fn_config`` keys and their defaults; ``None`` marks a required key."""
    check: Callable[[Config], None] | None = None
    """Relations between config values (e.g. low <= high), raising ``ValueError``."""
    check_inputs: Callable[[Inputs], str | None] | None = None
    """A datum's inputs checked before any work: the problem, or ``None`` when they are fine."""
    needs_provenance: bool = False
    """Datums must carry ``loss_fn_input_spans`` naming sequences recorded at sampling time."""
    grad_input: str | None = None
    """The per-token input where zero means the loss has no gradient at that token (cross-entropy's
    weights, the policy losses' advantages), so the engine skips back-propagating the vocabulary projection
    there; ``None``: every token may have one (DRO's quadratic term does without an advantage)."""

    def grad_positions(self, inputs: Inputs) -> torch.Tensor | None:
        """Per token, whether the loss can have a gradient there (``None``: everywhere)."""
        return None if self.grad_input is None else inputs[self.grad_input] != 0

    def check_config(self, config: LossConfig | None) -> dict[str, float]:
        """The full config, defaults filled in, or one ``ValueError`` naming what is wrong."""
        given = dict(config or {})
        unknown = sorted(set(given) - set(self.config))
        if unknown:
            accepted = sorted(self.config) or "none"
            raise ValueError(
                f"loss {self.name!r} got unknown loss_fn_config keys {unknown}; accepts {accepted}"
            )
        resolved: dict[str, float] = {}
        for key, default in self.config.items():
            value = given.get(key, default)
            if value is None:
                raise ValueError(f"loss {self.name!r} needs loss_fn_config[{key!r}] (no default)")
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(
                    f"loss {self.name!r}: loss_fn_config[{key!r}] must be a finite number, got {value!r}"
                )
            resolved[key] = float(value)
        if self.check is not None:
            self.check(resolved)
        return resolved


PerToken = Callable[[torch.Tensor, Inputs, Config], torch.Tensor]


def _summed(per_token: PerToken) -> LossCompute:
    """A loss that is the sum over datums and tokens of ``per_token``; outputs the logprobs, as Tinker's
    built-ins all do."""

    def compute(
        logprobs: Sequence[torch.Tensor], inputs: Sequence[Inputs], config: Config, _: torch.Generator
    ) -> LossOutput:
        total = torch.stack(
            [per_token(lp, inp, config).sum() for lp, inp in zip(logprobs, inputs, strict=True)]
        ).sum()
        return LossOutput(
            loss=total,
            outputs=[{"logprobs": lp.detach()} for lp in logprobs],
            metrics={"loss:sum": total.detach()},
        )

    return compute


def _cross_entropy(lp: torch.Tensor, inp: Inputs, config: Config) -> torch.Tensor:
    """``-weights * logprobs``. A sum, not a mean: normalising (per token, per sequence) is the caller's
    choice, made through the weights, exactly as on the Tinker service."""
    return -(inp["weights"] * lp)


def _ratio(lp: torch.Tensor, inp: Inputs) -> torch.Tensor:
    """``p_theta / q`` per token, ``q`` being the sampler's logprobs the datum carries."""
    return torch.exp(lp - inp["logprobs"])


def _importance_sampling(lp: torch.Tensor, inp: Inputs, config: Config) -> torch.Tensor:
    return -(_ratio(lp, inp) * inp["advantages"])


def _ppo(lp: torch.Tensor, inp: Inputs, config: Config) -> torch.Tensor:
    ratio, advantages = _ratio(lp, inp), inp["advantages"]
    clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    return -torch.minimum(ratio * advantages, clipped * advantages)


def _cispo(lp: torch.Tensor, inp: Inputs, config: Config) -> torch.Tensor:
    """The clipped ratio is a constant coefficient (stop-gradient): every token keeps a gradient."""
    clipped = torch.clamp(_ratio(lp, inp), config["clip_low_threshold"], config["clip_high_threshold"])
    return -(clipped.detach() * lp * inp["advantages"])


def _dro(lp: torch.Tensor, inp: Inputs, config: Config) -> torch.Tensor:
    return -(lp * inp["advantages"] - 0.5 * config["beta"] * (lp - inp["logprobs"]) ** 2)


def _gspo(lp: torch.Tensor, inp: Inputs, config: Config) -> torch.Tensor:
    """GSPO-token: every token carries the sequence ratio (geometric mean of the per-token ratios over the
    tokens ``sequence_ratio_mask`` marks) as its value, and its own logprob's gradient."""
    in_ratio = inp["sequence_ratio_mask"] != 0
    log_ratio = (lp.detach() - inp["logprobs"])[in_ratio].mean()
    ratio = torch.exp(log_ratio + lp - lp.detach())
    clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    advantages = inp["advantages"]
    return -torch.minimum(ratio * advantages, clipped * advantages)


def _some_ratio_token(inp: Inputs) -> str | None:
    if not bool((inp["sequence_ratio_mask"] != 0).any()):
        return "sequence_ratio_mask marks no token, so the sequence ratio is undefined"
    return None


def _check_clip(config: Config) -> None:
    low, high = config["clip_low_threshold"], config["clip_high_threshold"]
    if not 0 <= low <= high:
        raise ValueError(
            f"clip thresholds must satisfy 0 <= clip_low_threshold <= clip_high_threshold, got {low}, {high}"
        )


def _check_beta(config: Config) -> None:
    if config["beta"] < 0:
        raise ValueError(f"dro: beta must be >= 0, got {config['beta']}")


_RL_INPUTS = ("target_tokens", "logprobs", "advantages")

LOSS_FNS: dict[str, LossFn] = {
    loss.name: loss
    for loss in (
        LossFn("cross_entropy", ("target_tokens", "weights"), _summed(_cross_entropy), grad_input="weights"),
        LossFn("importance_sampling", _RL_INPUTS, _summed(_importance_sampling), grad_input="advantages"),
        LossFn(
            "ppo",
            _RL_INPUTS,
            _summed(_ppo),
            config={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
            check=_check_clip,
            grad_input="advantages",
        ),
        LossFn(
            "cispo",
            _RL_INPUTS,
            _summed(_cispo),
            config={"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
            check=_check_clip,
            grad_input="advantages",
        ),
        LossFn("dro", _RL_INPUTS, _summed(_dro), config={"beta": None}, check=_check_beta),
        LossFn(
            "gspo",
            (*_RL_INPUTS, "sequence_ratio_mask"),
            _summed(_gspo),
            config={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
            check=_check_clip,
            check_inputs=_some_ratio_token,
            grad_input="advantages",
        ),
        LossFn(
            "stable_reinforce",
            _RL_INPUTS,
            _summed(_importance_sampling),
            needs_provenance=True,
            grad_input="advantages",
        ),
    )
}


def get_loss_fn(name: str) -> LossFn:
    loss = LOSS_FNS.get(name)
    if loss is None:
        raise ValueError(
            f"loss_fn {name!r} is not supported by the local engine; supported: {sorted(LOSS_FNS)}"
        )
    return loss


_REDUCERS: dict[str, Callable[[list[float]], float]] = {"sum": sum, "max": max, "min": min}


def combine_metrics(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Merge per-micro-batch metrics by the reduction their name ends with (``loss:sum`` adds up)."""
    collected: dict[str, list[float]] = {}
    for part in parts:
        for key, value in part.items():
            collected.setdefault(key, []).append(value)
    combined: dict[str, float] = {}
    for key, values in collected.items():
        reduction = key.rpartition(":")[2]
        if reduction not in _REDUCERS:
            raise ValueError(f"metric {key!r} must end in one of :{', :'.join(_REDUCERS)} to be combined")
        combined[key] = float(_REDUCERS[reduction](values))
    return combined
