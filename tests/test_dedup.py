"""Exact-duplicate removal in the one loader every workflow's dataset goes through (kitchen.data.dedup)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kitchen.data import load_dataset_source
from kitchen.data.dedup import heldout_rows, normalise_text, unique_rows
from kitchen.data.sources import DatasetSourceError
from kitchen.workflows.config import DatasetSection
from kitchen.workflows.dpo.format import PREFERENCE


def chat(question: str, reply: str, system: str | None = None) -> dict[str, object]:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    return {"messages": messages}


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_normalised_text_ignores_case_width_and_spacing() -> None:
    assert normalise_text("  Hello\t\nWORLD ") == normalise_text("hello world")
    assert normalise_text("ｆｕｌｌ width") == "full width"  # NFKC
    assert normalise_text("a b") != normalise_text("ab")


def test_unique_rows_keeps_the_first_copy_in_order() -> None:
    rows = [chat("A?", "1"), chat("a?  ", "1"), chat("B?", "2"), chat("A?", "other reply")]
    kept, dropped = unique_rows(rows)
    assert dropped == 1
    assert kept == [rows[0], rows[2], rows[3]]  # a different reply is a different row


def test_heldout_rows_drop_copies_and_prompts_seen_in_training() -> None:
    train = [chat("What is 2+2?", "4", system="Be terse."), chat("Name a colour.", "red")]
    test = [
        chat("what is 2+2? ", "four"),  # the training prompt, another reply and no system prompt
        chat("Name a fruit.", "apple"),
        chat("Name a fruit.", "apple"),  # a copy within the held-out split
        chat("Name a tree.", "oak"),
    ]
    kept, duplicates, in_train = heldout_rows(test, train)
    assert (duplicates, in_train) == (1, 1)
    assert kept == [test[1], test[3]]


def test_loader_removes_and_counts_duplicates_in_the_manifest(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    train = [chat(f"Question {i}?", f"Answer {i}") for i in range(8)]
    train += [chat("QUESTION 0?", "answer 0"), chat("Question 1?", "Answer  1")]  # 2 copies
    test = [chat("Question 3?", "a new reply"), chat("Fresh question?", "x"), chat("Fresh question?", "x")]
    write_jsonl(data / "train.jsonl", train)
    write_jsonl(data / "test.jsonl", test)

    loaded = load_dataset_source(str(data))
    assert (loaded.train_rows, loaded.test_rows) == (8, 1)
    assert loaded.dataset["test"][0]["messages"][0]["content"] == "Fresh question?"
    manifest = loaded.manifest(tmp_path / "saved")
    assert manifest.dedup == {
        "mode": "all",
        "train_duplicates": 2,
        "test_duplicates": 1,
        "test_prompt_in_train": 1,
    }

    kept_all = load_dataset_source(str(data), dedup="off")
    assert (kept_all.train_rows, kept_all.test_rows) == (10, 3)
    assert kept_all.dedup.removed == 0
    heldout_only = load_dataset_source(str(data), dedup="heldout")
    assert (heldout_only.train_rows, heldout_only.test_rows) == (10, 1)


def test_seeded_split_never_holds_out_a_training_prompt(tmp_path: Path) -> None:
    # 20 prompts, each twice with different replies: a seeded split puts some pairs on both sides.
    rows = [chat(f"Prompt {i % 20}", f"reply {i}") for i in range(40)]
    loaded = load_dataset_source(str(write_jsonl(tmp_path / "rows.jsonl", rows)), test_size=0.25, seed=0)
    train_prompts = {r["messages"][0]["content"] for r in loaded.dataset["train"]}
    test_prompts = [r["messages"][0]["content"] for r in loaded.dataset["test"]]
    assert test_prompts and not train_prompts & set(test_prompts)
    assert loaded.test_rows == 10 - loaded.dedup.test_in_train
    assert loaded.dedup.test_in_train > 0


def test_a_held_out_split_made_only_of_training_prompts_is_one_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [chat("Same?", "1"), chat("Other?", "2")])
    write_jsonl(data / "test.jsonl", [chat("same?", "3")])
    with pytest.raises(DatasetSourceError, match="every held-out row") as error:
        load_dataset_source(str(data))
    assert "dedup='off'" in str(error.value) and "\n" not in str(error.value)


def test_preference_rows_compare_their_prompts(tmp_path: Path) -> None:
    data = tmp_path / "prefs"
    data.mkdir()

    def pair(prompt: str, chosen: str, rejected: str) -> dict[str, str]:
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    write_jsonl(
        data / "train.jsonl", [pair("P1", "good", "bad"), pair("P1", "good", "bad"), pair("P2", "a", "b")]
    )
    write_jsonl(data / "test.jsonl", [pair("p1", "other", "pair"), pair("P3", "c", "d")])
    loaded = load_dataset_source(str(data), row_format=PREFERENCE)
    assert (loaded.train_rows, loaded.test_rows) == (2, 1)
    assert (loaded.dedup.train_duplicates, loaded.dedup.test_in_train) == (1, 1)


def test_every_workflow_section_passes_its_dedup_setting() -> None:
    from kitchen.workflows.rl.config import RLDatasetSection

    assert DatasetSection().dedup == "all"
    assert RLDatasetSection().dedup == "heldout"  # the cookbook's i.i.d. problem draws repeat
    loaded = DatasetSection(dataset="kitchen/arithmetic", max_rows=64, dedup="all").load()
    assert loaded.dedup.mode == "all" and loaded.dedup.removed == 0  # distinct by construction
