"""Learning-rate schedules (tinker-cookbook's names: linear, cosine, constant) with linear warmup."""

from __future__ import annotations

import math
from typing import Literal

LRSchedule = Literal["linear", "cosine", "constant"]

# Hidden sizes (from the models' Hugging Face configs) of base models trained without a local config,
# i.e. by name on Tinker, so their default learning rate follows the same rule as a local checkpoint's.
KNOWN_HIDDEN_SIZES: dict[str, int] = {
    "meta-llama/Llama-3.2-1B": 2048,
    "meta-llama/Llama-3.2-3B": 3072,
    "meta-llama/Llama-3.1-8B": 4096,
    "meta-llama/Llama-3.1-8B-Instruct": 4096,
    "meta-llama/Llama-3.1-70B": 8192,
    "meta-llama/Llama-3.3-70B-Instruct": 8192,
    "Qwen/Qwen3-4B-Instruct-2507": 2560,
    "Qwen/Qwen3-8B": 4096,
    "Qwen/Qwen3-8B-Base": 4096,
    "Qwen/Qwen3-30B-A3B": 2048,
    "Qwen/Qwen3-32B": 5120,
}


def learning_rate_at(
    step: int, *, total_steps: int, base_lr: float, schedule: LRSchedule, warmup_steps: int = 0
) -> float:
    """The learning rate for 0-based ``step`` of ``total_steps``.

    Warmup ramps linearly from ``base_lr / warmup_steps`` to ``base_lr``; after it, ``linear`` decays to
    zero at ``total_steps``, ``cosine`` follows a half cosine to zero, ``constant`` stays at ``base_lr``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} outside [0, {total_steps})")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = (step - warmup_steps) / decay_steps
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}; expected linear, cosine or constant")


def recommended_lora_lr(hidden_size: int | None, architecture: str | None) -> float:
    """tinker-cookbook's ``hyperparam_utils.get_lr`` rule for LoRA: 5e-5 · 10 · (2000 / hidden)^p.

    ``p`` is 0.781 for Llama-family models and 0.0775 for Qwen; unknown models get sl_basic's 2e-4.
    """
    if not hidden_size:
        return 2e-4
    arch = (architecture or "").lower()
    if "llama" in arch:
        exponent = 0.781
    elif "qwen" in arch:
        exponent = 0.0775
    else:
        return 2e-4
    return 5e-5 * 10 * (2000 / hidden_size) ** exponent
