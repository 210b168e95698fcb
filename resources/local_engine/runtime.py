"""Where and how the local engine runs models: device, dtype, model loading and the base-model cache."""

from __future__ import annotations

import copy
import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch

from resources.local_engine.stability import SequenceRecord

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


@dataclass(frozen=True)
class EngineRuntime:
    """Settings every client of one ``LocalServiceClient`` shares."""

    root: Path
    device: torch.device
    dtype: torch.dtype
    max_sampling_batch: int
    max_batch_tokens: int
    recorded: SequenceRecord = field(default_factory=SequenceRecord, compare=False, repr=False)
    """Sequences sampled with ``record_stability_info=True`` (what ``stable_reinforce`` checks against)."""


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit CUDA request without CUDA is an error, not a CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (bf16 matmuls are slow there), bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def check_model_dir(base_model: str | Path) -> Path:
    """The resolved directory of a local Hugging Face checkpoint, or an error naming what is wrong."""
    path = Path(base_model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"base model {str(base_model)!r}: no such directory {path}")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(
            f"base model {str(base_model)!r} is not a Hugging Face model directory "
            f"(expected {path / 'config.json'})"
        )
    if not any(any(path.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise ValueError(
            f"base model directory {path} holds no weights (*.safetensors or pytorch_model*.bin)"
        )
    return path.resolve()


def load_model(path: Path, dtype: torch.dtype) -> Any:
    """A fresh copy of the model on the CPU (callers move it, after any seeded CPU-side init)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)


@cache
def load_tokenizer(path: Path) -> Any:
    """Tokenizers are immutable in use, so one per model directory serves every client."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


_BASE_CACHE: dict[tuple[Path, str, torch.dtype], Any] = {}
_BASE_CACHE_LOCK = threading.Lock()


def shared_base_model(path: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """One frozen, eval-mode copy of a base model's weights per process, for everything that runs it.

    Samplers run this model itself, a trained adapter applied as an overlay (``overlay.applied``);
    training clients run their own module tree over the same weight tensors (``base_model_view``). So
    the base model, the policy's sampling snapshots, the DPO reference and evaluation hold one copy of
    the weights between them. Nothing may mutate them: they are frozen, and LoRA never writes them.
    """
    from resources.local_engine.overlay import prepare_for_overlays

    key = (path, str(device), dtype)
    with _BASE_CACHE_LOCK:
        model = _BASE_CACHE.get(key)
        if model is None:
            model = load_model(path, dtype).to(device)
            model.eval()
            model.requires_grad_(False)
            # Hooked now, before anyone can copy its module tree, so the tree never changes afterwards.
            prepare_for_overlays(model)
            _BASE_CACHE[key] = model
        return model


def base_model_view(path: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """A new module tree over the shared base model's own parameter and buffer tensors, for PEFT to wrap.

    A training client needs modules of its own (PEFT replaces its ``Linear`` layers with LoRA layers, and
    it runs in train mode) but not weights of its own: the base's are frozen. Sharing them saves a whole
    copy of the model (538 MB for SmolLM2-135M in float32). The samplers' overlay hooks are left out.
    """
    base = shared_base_model(path, device, dtype)
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    memo.update({id(module._forward_hooks): OrderedDict() for module in base.modules()})
    return copy.deepcopy(base, memo)


def context_window(model: Any) -> int | None:
    """The model's maximum sequence length, if its config states one."""
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if value is not None else None


def vocab_size(model: Any) -> int:
    return int(model.get_input_embeddings().num_embeddings)
