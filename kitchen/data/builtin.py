"""Datasets generated from code: always available offline, deterministic by seed, with checkable answers.

The default dataset, ``kitchen/arithmetic``, is small two-digit arithmetic: short enough (about 35
tokens with SmolLM2's template) for CPU training, and exact-match checkable, so evaluation can show a
clear base-vs-trained difference. Register more with ``@register_builtin``: one function per
dataset, returning normalised rows (see ``kitchen.data.schemas``) for the train and test splits.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from datasets import Dataset, DatasetDict, Features

from kitchen.data.schemas import NORMALIZED_FEATURES, NormalizedRow

#: (seed, train_size, test_size) -> {"train": rows, "test": rows}, prompts disjoint across splits.
Generator = Callable[[int, int, int], dict[str, list[NormalizedRow]]]


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    description: str
    generate: Generator
    train_size: int
    test_size: int
    aliases: tuple[str, ...] = ()
    features: Features = field(default_factory=lambda: NORMALIZED_FEATURES)
    """Arrow schema of the generated rows: chat rows by default; a workflow's own built-in (DPO's
    preference pairs) generates rows in a schema its row format accepts."""


_REGISTRY: dict[str, BuiltinDataset] = {}


def register_builtin(
    name: str,
    *,
    description: str,
    train_size: int,
    test_size: int,
    aliases: tuple[str, ...] = (),
    features: Features = NORMALIZED_FEATURES,
) -> Callable[[Generator], Generator]:
    """Register ``fn`` as built-in dataset ``name`` (also reachable under ``aliases``); its rows have
    ``features`` (chat rows unless a workflow's built-in says otherwise)."""

    def decorator(fn: Generator) -> Generator:
        entry = BuiltinDataset(name, description, fn, train_size, test_size, aliases, features)
        for key in (name, *aliases):
            if key in _REGISTRY:
                raise ValueError(f"Built-in dataset name {key!r} is already registered")
            _REGISTRY[key] = entry
        return fn

    return decorator


def list_builtin_datasets() -> list[BuiltinDataset]:
    """Every registered built-in, once each (aliases folded in)."""
    return list({entry.name: entry for entry in _REGISTRY.values()}.values())


def get_builtin(name: str) -> BuiltinDataset | None:
    return _REGISTRY.get(name)


def builtin_dataset(
    name: str, *, seed: int = 0, train_size: int | None = None, test_size: int | None = None
) -> DatasetDict:
    """Generate built-in ``name`` as a normalised ``DatasetDict`` with ``train`` and ``test`` splits."""
    entry = get_builtin(name)
    if entry is None:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"No built-in dataset {name!r}; known: {known}")
    splits = entry.generate(
        seed,
        entry.train_size if train_size is None else train_size,
        entry.test_size if test_size is None else test_size,
    )
    return DatasetDict(
        {split: Dataset.from_list(rows, features=entry.features) for split, rows in splits.items()}
    )


ARITHMETIC_SYSTEM_PROMPT = "Reply with only the number."
#: tinker-cookbook's worked example for arithmetic (``ArithmeticEnv``'s few-shot prefix), for prompts that
#: show the answer format once before the question (RL's ``integer`` problems, the built-in DPO pairs).
ARITHMETIC_FEWSHOT: tuple[tuple[str, str], ...] = (("What is 4 + 5?", "9"),)


def _arithmetic_problem(rng: random.Random) -> tuple[str, int]:
    """One problem: mostly 2-digit addition/subtraction (non-negative results), some 2x1-digit products."""
    kind = rng.random()
    if kind < 0.45:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"{a} + {b}", a + b
    if kind < 0.8:
        a = rng.randint(10, 99)
        b = rng.randint(10, a)
        return f"{a} - {b}", a - b
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    return f"{a} * {b}", a * b


# 8100 sums + 4095 differences + 720 products: the most distinct prompts the generator can produce.
_ARITHMETIC_SPACE = 90 * 90 + sum(range(1, 91)) + 90 * 8


@register_builtin(
    "kitchen/arithmetic",
    description="Two-digit addition/subtraction and small multiplication; the answer is the number.",
    train_size=1280,
    test_size=200,
    aliases=("arithmetic",),
)
def arithmetic(seed: int, train_size: int, test_size: int) -> dict[str, list[NormalizedRow]]:
    """Distinct problems drawn from one seeded stream; the test split is drawn first so that it
    stays the same whatever ``train_size`` is, and no prompt appears in both splits."""
    if train_size < 0 or test_size < 0 or train_size + test_size > _ARITHMETIC_SPACE // 2:
        raise ValueError(
            f"arithmetic sizes must be non-negative and total at most {_ARITHMETIC_SPACE // 2} "
            f"(got train={train_size}, test={test_size})"
        )
    rng = random.Random(f"kitchen/arithmetic:{seed}")
    seen: set[str] = set()
    problems: list[tuple[str, int]] = []
    while len(problems) < test_size + train_size:
        expression, value = _arithmetic_problem(rng)
        if expression not in seen:
            seen.add(expression)
            problems.append((expression, value))
    rows = [
        {
            "messages": [
                {"role": "system", "content": ARITHMETIC_SYSTEM_PROMPT},
                {"role": "user", "content": f"What is {expression}?"},
                {"role": "assistant", "content": str(value)},
            ],
            "answer": str(value),
        }
        for expression, value in problems
    ]
    return {"train": rows[test_size:], "test": rows[:test_size]}
