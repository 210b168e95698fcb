"""Which examples make up step N's batch: a seeded per-epoch shuffle, computed per step rather than listed.

Every workflow that walks a fixed set of examples (SFT datums, DPO pairs, RL problems) uses this, so
step N's batch is a pure function of (N, seed): a resumed run needs no data cursor to continue exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EpochBatches:
    """Shuffle each epoch with ``seed + epoch`` and cut full batches (the remainder is dropped, as in
    tinker-cookbook); stop after ``max_steps`` batches if given."""

    num_examples: int
    batch_size: int
    epochs: int
    seed: int
    max_steps: int | None = None
    _orders: dict[int, list[int]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError(f"batch_size and epochs must be >= 1 (got {self.batch_size}, {self.epochs})")
        if self.num_examples // self.batch_size == 0:
            raise ValueError(
                f"batch_size {self.batch_size} is larger than the {self.num_examples} training examples; "
                "lower --batch-size"
            )

    @property
    def per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    @property
    def total_steps(self) -> int:
        total = self.per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps is not None else total

    def epoch_of(self, step: int) -> int:
        return step // self.per_epoch

    def indices(self, step: int) -> list[int]:
        """The example indices of 0-based ``step``."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside [0, {self.total_steps})")
        epoch, b = divmod(step, self.per_epoch)
        order = self._orders.get(epoch)
        if order is None:
            order = list(range(self.num_examples))
            random.Random(self.seed + epoch).shuffle(order)
            self._orders.clear()  # one epoch's order at a time: steps are visited in order
            self._orders[epoch] = order
        return order[b * self.batch_size : (b + 1) * self.batch_size]
