"""Turn a list of datums into the per-step batches the training loop consumes (seeded, per-epoch shuffle)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from tinker import types

from kitchen.training.loop import Batch


def make_batches(
    datums: Sequence[types.Datum],
    *,
    batch_size: int,
    epochs: int,
    seed: int,
    max_steps: int | None = None,
) -> list[Batch]:
    """Shuffle each epoch with ``seed + epoch`` and cut full batches (the remainder is dropped, as in
    tinker-cookbook); stop after ``max_steps`` batches if given."""
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size and epochs must be >= 1 (got {batch_size}, {epochs})")
    per_epoch = len(datums) // batch_size
    if per_epoch == 0:
        raise ValueError(
            f"batch_size {batch_size} is larger than the {len(datums)} training datums; lower --batch-size"
        )
    batches: list[Batch] = []
    for epoch in range(epochs):
        order = list(range(len(datums)))
        random.Random(seed + epoch).shuffle(order)
        for b in range(per_epoch):
            if max_steps is not None and len(batches) >= max_steps:
                return batches
            idx = order[b * batch_size : (b + 1) * batch_size]
            batches.append(Batch(epoch=epoch, datums=[datums[i] for i in idx]))
    return batches
