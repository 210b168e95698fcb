"""The registry of loss functions ``forward_backward`` accepts, with Tinker's semantics.

A loss receives, per datum, the log-probabilities the model assigns to ``target_tokens`` plus that
datum's other per-token ``loss_fn_inputs``, and returns a scalar to differentiate, per-datum outputs
and metrics. Tinker's built-in losses are sums over datums, so the engine may split a batch into
micro-batches and accumulate gradients; a loss that couples datums would have to say so here.
DPO and RL losses are added by registering another ``LossFn``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

LossConfig = Mapping[str, float | str]


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor
    """Scalar summed over the datums given; ``backward`` is called on it."""
    outputs: list[dict[str, torch.Tensor]]
    """Per datum, detached: becomes ``ForwardBackwardOutput.loss_fn_outputs``."""
    metrics: dict[str, float]
    """Named ``<metric>:<reduction>`` as Tinker does, so micro-batch parts can be combined."""


LossCompute = Callable[
    [Sequence[torch.Tensor], Sequence[Mapping[str, torch.Tensor]], LossConfig, torch.Generator],
    LossOutput,
]


@dataclass(frozen=True)
class LossFn:
    name: str
    inputs: tuple[str, ...]
    """Per-token ``loss_fn_inputs`` a datum must carry (always including ``target_tokens``)."""
    config_keys: frozenset[str]
    compute: LossCompute

    def check_config(self, config: LossConfig | None) -> LossConfig:
        config = dict(config or {})
        unknown = sorted(set(config) - self.config_keys)
        if unknown:
            accepted = sorted(self.config_keys) or "none"
            raise ValueError(
                f"loss {self.name!r} got unknown loss_fn_config keys {unknown}; accepts {accepted}"
            )
        return config


def _cross_entropy(
    logprobs: Sequence[torch.Tensor],
    inputs: Sequence[Mapping[str, torch.Tensor]],
    config: LossConfig,
    generator: torch.Generator,
) -> LossOutput:
    """Tinker's ``cross_entropy``: the sum over datums and tokens of ``-weights * logprobs``.

    A sum, not a mean: normalising (per token, per sequence) is the caller's choice, made through
    the weights, exactly as on the Tinker service.
    """
    total = torch.stack(
        [-(inp["weights"] * lp).sum() for lp, inp in zip(logprobs, inputs, strict=True)]
    ).sum()
    return LossOutput(
        loss=total,
        outputs=[{"logprobs": lp.detach()} for lp in logprobs],
        metrics={"loss:sum": float(total.detach())},
    )


LOSS_FNS: dict[str, LossFn] = {
    "cross_entropy": LossFn(
        name="cross_entropy",
        inputs=("target_tokens", "weights"),
        config_keys=frozenset(),
        compute=_cross_entropy,
    ),
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
