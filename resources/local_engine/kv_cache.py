"""A KV cache for generation that writes each step into reserved buffers instead of concatenating.

Its own module because it subclasses ``transformers``' cache layer, and importing ``transformers`` costs
seconds that importing the engine should not pay until it generates.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

#: Positions a cache reserves beyond what it holds when it grows: large enough that growing (a copy of
#: the cache) is rare, small enough that a long ``max_tokens`` does not reserve memory it may never use.
RESERVE_BLOCK = 256


class ReservedLayer(DynamicLayer):
    """A full-attention layer's keys and values written into buffers reserved ahead of time.

    ``DynamicLayer`` grows by ``torch.cat``, copying the layer's whole cache at every step (a tenth of
    ``transformers.generate``'s time at batch 32 on SmolLM2-135M, more than attention takes); here a step
    writes one position into the buffer and ``keys``/``values`` are views of the filled part. The buffer
    grows by ``reserve`` positions when full.
    """

    def __init__(self, reserve: int) -> None:
        super().__init__()
        self.reserve = max(1, reserve)
        self.length = 0
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self.key_buffer is None or self.value_buffer is None or end > self.key_buffer.shape[-2]:
            self.key_buffer = self._grown(self.key_buffer, key_states, end)
            self.value_buffer = self._grown(self.value_buffer, value_states, end)
        self.key_buffer[:, :, self.length : end].copy_(key_states)
        self.value_buffer[:, :, self.length : end].copy_(value_states)
        self.length = end
        return self._expose()

    def _grown(self, buffer: torch.Tensor | None, states: torch.Tensor, end: int) -> torch.Tensor:
        batch, heads, _, dim = states.shape
        grown = states.new_empty((batch, heads, end + self.reserve, dim))
        if buffer is not None:
            grown[:, :, : self.length].copy_(buffer[:, :, : self.length])
        return grown

    def _expose(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Point ``keys``/``values`` (what attention and ``transformers`` read) at the filled part."""
        assert self.key_buffer is not None and self.value_buffer is not None
        self.keys = keys = self.key_buffer[:, :, : self.length]
        self.values = values = self.value_buffer[:, :, : self.length]
        return keys, values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.key_buffer is None or self.value_buffer is None:
            return
        self.key_buffer = self.key_buffer.index_select(0, indices)
        self.value_buffer = self.value_buffer.index_select(0, indices)
        self._expose()

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = None
        self.length = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a reserved cache layer is not cropped (generation never needs it)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a reserved cache layer is not repeated (generation never needs it)")


def reserved_cache(model: Any, reserve: int) -> Any:
    """The model's own ``DynamicCache`` with every plain full-attention layer a ``ReservedLayer``; layers of
    other kinds (sliding-window, linear attention) keep their own cache."""
    cache = DynamicCache(config=model.config)
    cache.layers = [
        ReservedLayer(reserve) if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache
