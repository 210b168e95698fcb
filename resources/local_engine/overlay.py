"""LoRA adapters applied, unmerged, to the one shared frozen base model while a sampler runs it.

Why: RL takes a sampling client on the current weights every step, and evaluation opens one per trained
adapter. Copying the base model and merging the adapter into it costs the whole model each time (538 MB
for SmolLM2); a ``LoraOverlay`` holds only the adapter's A and B matrices. While a sampler runs the
shared base model inside ``applied(model, overlay)``, forward hooks on the base's ``Linear`` layers add
``lora_B(lora_A(x)) * scaling`` to their outputs with ``lora_sum``, the computation the training client's
LoRA layers run too, so sampled logprobs equal the trained model's.

The active overlay is per thread, so a forward on another thread (the plain base sampler, another
adapter's sampler) never sees it; a per-model lock runs one sampler's batch on a model at a time.
"""

from __future__ import annotations

import functools
import json
import math
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from resources.local_engine.checkpoints import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, CheckpointError

_PEFT_PREFIX = "base_model.model."
_ADAPTER = "default"


@dataclass(frozen=True)
class LoraLayerWeights:
    a: torch.Tensor
    """``(rank, in_features)``"""
    b: torch.Tensor
    """``(out_features, rank)``"""
    scaling: float


@dataclass(frozen=True)
class LoraOverlay:
    """One adapter's weights, keyed by the name of the ``Linear`` module they adapt in the base model."""

    layers: Mapping[str, LoraLayerWeights]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in self.layers.values() for t in (w.a, w.b))


def snapshot_peft(peft_model: Any) -> LoraOverlay:
    """A copy of a PEFT model's current LoRA weights (small; the base weights are not copied)."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer) or _ADAPTER not in module.lora_A:
                continue
            lora: Any = module
            if lora.lora_variant.get(_ADAPTER) is not None or lora.merged:
                raise ValueError(f"LoRA layer {name} is merged or not plain LoRA; it cannot be overlaid")
            layers[name.removeprefix(_PEFT_PREFIX)] = LoraLayerWeights(
                a=lora.lora_A[_ADAPTER].weight.detach().clone(),
                b=lora.lora_B[_ADAPTER].weight.detach().clone(),
                scaling=float(lora.scaling[_ADAPTER]),
            )
    if not layers:
        raise ValueError("the model has no LoRA layers to snapshot")
    return LoraOverlay(layers)


def load_adapter(directory: Path, device: torch.device) -> LoraOverlay:
    """The overlay of a PEFT adapter directory (``save_pretrained`` output), refusing any setting the
    overlay would not reproduce exactly. Tensors keep the dtype they were trained and saved in."""
    config = json.loads((directory / PEFT_CONFIG_FILE).read_text())
    unsupported = {
        "peft_type": config.get("peft_type") != "LORA",
        "use_dora": bool(config.get("use_dora")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "bias": config.get("bias", "none") != "none",
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "modules_to_save": bool(config.get("modules_to_save")),
    }
    if any(unsupported.values()):
        bad = [key for key, is_bad in unsupported.items() if is_bad]
        raise CheckpointError(f"adapter {directory}: settings {bad} are not supported for sampling")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(directory / PEFT_WEIGHTS_FILE)).items():
        module, dot, kind = key.removeprefix(_PEFT_PREFIX).removesuffix(".weight").rpartition(".")
        if not dot or kind not in ("lora_A", "lora_B") or not key.startswith(_PEFT_PREFIX):
            raise CheckpointError(f"adapter {directory}: unexpected tensor {key!r}")
        pairs.setdefault(module, {})[kind] = tensor.to(device)
    incomplete = sorted(name for name, pair in pairs.items() if len(pair) != 2)
    if incomplete or not pairs:
        raise CheckpointError(f"adapter {directory}: incomplete LoRA pairs {incomplete[:3] or 'none found'}")
    return LoraOverlay(
        {name: LoraLayerWeights(pair["lora_A"], pair["lora_B"], scaling) for name, pair in pairs.items()}
    )


# -- applying an overlay to a shared model -------------------------------------------------------------


class _Hooked:
    """A model with overlay hooks on every ``Linear``, and the lock its samplers take."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.lock = threading.Lock()
        self.linear = {
            name: (module.in_features, module.out_features)
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
        }
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(functools.partial(_add_lora, name))


_ACTIVE = threading.local()
_HOOKED: weakref.WeakKeyDictionary[torch.nn.Module, _Hooked] = weakref.WeakKeyDictionary()
_HOOKED_LOCK = threading.Lock()


def _add_lora(
    name: str, module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor
) -> torch.Tensor | None:
    overlay: LoraOverlay | None = getattr(_ACTIVE, "overlay", None)
    layer = overlay.layers.get(name) if overlay is not None else None
    if layer is None:
        return None
    # As PEFT does: the adapter runs in its own dtype (float32 under a bfloat16 base, where PEFT upcasts
    # adapters), the sum is cast back to the layer's dtype.
    return lora_sum(output, args[0].to(layer.a.dtype), layer.a, layer.b, layer.scaling).to(output.dtype)


def lora_sum(
    output: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``output + lora_B(lora_A(x)) * scaling`` with the up-projection, scaling and sum in one ``addmm``:
    two fewer passes over the layer's output (forward and backward) than PEFT's three operations, and
    bit for bit the same values and gradients. The training client's PEFT layers and samplers' overlays
    both use it, so their numbers stay equal."""
    if output.dtype != x.dtype:  # a bfloat16 base under float32 adapters: PEFT's order of operations
        return output + F.linear(F.linear(x, a), b) * scaling
    hidden = F.linear(x, a)
    flat = torch.addmm(
        output.reshape(-1, output.shape[-1]), hidden.reshape(-1, a.shape[0]), b.t(), alpha=scaling
    )
    return flat.view(output.shape)


def prepare_for_overlays(model: torch.nn.Module) -> None:
    """Put the overlay hooks on a shared model now rather than at its first sampler."""
    _hooked(model)


def _hooked(model: torch.nn.Module) -> _Hooked:
    with _HOOKED_LOCK:
        hooked = _HOOKED.get(model)
        if hooked is None:
            hooked = _HOOKED[model] = _Hooked(model)
        return hooked


def check_fits(model: torch.nn.Module, overlay: LoraOverlay) -> None:
    """Refuse, before any sampling, an adapter whose layers the model lacks or whose shapes differ."""
    linear = _hooked(model).linear
    for name, layer in overlay.layers.items():
        rank = layer.a.shape[0]
        if name not in linear:
            raise ValueError(f"the adapter adapts {name!r}, which is not a Linear layer of the base model")
        in_features, out_features = linear[name]
        if tuple(layer.a.shape) != (rank, in_features) or tuple(layer.b.shape) != (out_features, rank):
            raise ValueError(f"the adapter's {name!r} matrices do not fit the base model's layer")


@contextmanager
def applied(model: torch.nn.Module, overlay: LoraOverlay | None) -> Iterator[None]:
    """Run ``model`` with ``overlay`` (``None``: the plain base) on this thread, holding the model's lock."""
    hooked = _hooked(model)
    with hooked.lock:
        previous = getattr(_ACTIVE, "overlay", None)
        _ACTIVE.overlay = overlay
        try:
            yield
        finally:
            _ACTIVE.overlay = previous
