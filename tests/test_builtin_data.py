"""The built-in arithmetic dataset: deterministic, disjoint splits, correct answers, short sequences."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kitchen.data import builtin
from kitchen.data.builtin import builtin_dataset, get_builtin, list_builtin_datasets, register_builtin
from kitchen.data.sources import load_dataset_source, preview_text

_PROBLEM = re.compile(r"^What is (\d+) ([-+*]) (\d+)\?$")


def _prompts(rows: list[dict]) -> list[str]:
    return [row["messages"][1]["content"] for row in rows]


def test_registry_lists_the_default_and_its_alias() -> None:
    names = [entry.name for entry in list_builtin_datasets()]
    assert names.count("kitchen/arithmetic") == 1
    assert get_builtin("arithmetic") is get_builtin("kitchen/arithmetic")
    assert get_builtin("nope") is None


def test_default_sizes_and_determinism_by_seed() -> None:
    first = builtin_dataset("kitchen/arithmetic", seed=0)
    again = builtin_dataset("arithmetic", seed=0)
    other = builtin_dataset("kitchen/arithmetic", seed=1)
    assert (len(first["train"]), len(first["test"])) == (1280, 200)
    assert first["train"].to_list() == again["train"].to_list()
    assert first["test"].to_list() == again["test"].to_list()
    assert _prompts(first["test"].to_list()) != _prompts(other["test"].to_list())


def test_splits_are_disjoint_and_test_does_not_depend_on_train_size() -> None:
    small = builtin_dataset("kitchen/arithmetic", seed=5, train_size=100, test_size=50)
    big = builtin_dataset("kitchen/arithmetic", seed=5, train_size=3000, test_size=50)
    train, test = _prompts(big["train"].to_list()), _prompts(big["test"].to_list())
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)
    assert small["test"].to_list() == big["test"].to_list()
    with pytest.raises(ValueError, match="at most"):
        builtin_dataset("kitchen/arithmetic", train_size=100_000)


def test_answers_are_correct_and_rows_are_chat_shaped() -> None:
    data = builtin_dataset("kitchen/arithmetic", seed=2, train_size=500, test_size=100)
    ops = set()
    for row in data["train"].to_list() + data["test"].to_list():
        system, user, assistant = row["messages"]
        assert [system["role"], user["role"], assistant["role"]] == ["system", "user", "assistant"]
        match = _PROBLEM.match(user["content"])
        assert match, user["content"]
        a, op, b = int(match[1]), match[2], int(match[3])
        expected = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert assistant["content"] == row["answer"] == str(expected)
        assert expected >= 0
        ops.add(op)
    assert ops == {"+", "-", "*"}


def test_load_through_sources(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    loaded = load_dataset_source("kitchen/arithmetic", seed=0, max_rows=300)
    assert (loaded.source, loaded.schema_found, loaded.test_split_source) == ("builtin", "messages", "source")
    assert (loaded.train_rows, loaded.test_rows) == (300, 200)
    assert loaded.revision is None and len(loaded.content_hash) == 64
    assert preview_text(loaded).startswith("system: Reply with only the number.\nuser: What is ")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lengths = [
        len(tokenizer(tokenizer.apply_chat_template(row["messages"], tokenize=False))["input_ids"])
        for row in loaded.dataset["test"]
    ]
    assert max(lengths) < 60


def test_register_another_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin, "_REGISTRY", dict(builtin._REGISTRY))

    @register_builtin("test/echo", description="echo", train_size=4, test_size=2)
    def echo(seed: int, train_size: int, test_size: int) -> dict[str, list[dict]]:
        rows = [
            {
                "messages": [
                    {"role": "user", "content": f"say {i}"},
                    {"role": "assistant", "content": str(i)},
                ],
                "answer": str(i),
            }
            for i in range(seed, seed + train_size + test_size)
        ]
        return {"train": rows[:train_size], "test": rows[train_size:]}

    assert "test/echo" in [entry.name for entry in list_builtin_datasets()]
    loaded = load_dataset_source("test/echo", seed=10)
    assert loaded.dataset["test"]["answer"] == ["14", "15"]
    with pytest.raises(ValueError, match="already registered"):
        register_builtin("test/echo", description="dup", train_size=1, test_size=1)(echo)
