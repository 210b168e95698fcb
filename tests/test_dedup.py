"""Exact-duplicate removal in the one loader every workflow's dataset goes through (kitchen.data.dedup)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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


# -- near duplicates (kitchen.data.decontaminate) with a stand-in embedder ------------------------------


class TopicEmbedder:
    """Vectors by topic word: rows about the same topic are near copies (cosine 0.99), others orthogonal."""

    TOPICS = ("cat", "dog", "tea", "sea", "car")

    def __init__(self) -> None:
        self.calls = 0
        self.seen: list[str] = []

    @property
    def model_id(self) -> str:
        return "topics"

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls += len(texts)
        self.seen += texts
        rows = []
        for text in texts:
            row = [1.0 if t in text.lower() else 0.0 for t in self.TOPICS] + [0.14]
            rows.append(row)
        array = np.asarray(rows, dtype=np.float32)
        return array / np.linalg.norm(array, axis=1, keepdims=True)


def fewshot(question: str, reply: str) -> dict[str, object]:
    """An RL-style prompt: the same worked example before every question."""
    return {
        "messages": [
            {"role": "user", "content": "Tell me about the car."},
            {"role": "assistant", "content": "It drives."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": reply},
        ]
    }


def test_decontamination_drops_near_copies_counts_them_and_caches_vectors(tmp_path: Path) -> None:
    from kitchen.data.decontaminate import decontaminate
    from resources.vector_store import InMemoryVectorStore

    data = tmp_path / "d"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [fewshot("Describe a cat.", "x"), fewshot("Describe a dog.", "y")])
    test = [fewshot("Say something on cats", "a"), fewshot("Brew tea how?", "b"), fewshot("The sea?", "c")]
    write_jsonl(data / "test.jsonl", test)
    loaded = load_dataset_source(str(data))
    embedder, store, cache = TopicEmbedder(), InMemoryVectorStore(), tmp_path / "cache"

    cleaned, report = decontaminate(loaded, embedder, store, threshold=0.9, cache_dir=cache)
    # Only the cat question is near a training question; the shared few-shot "car" turn is not embedded.
    assert (report.test_rows, report.flagged, report.dropped) == (3, 1, 1)
    assert [r["messages"][2]["content"] for r in cleaned.dataset["test"]] == ["Brew tea how?", "The sea?"]
    assert (
        report.pairs[0]["test"] == "Say something on cats" and report.pairs[0]["train"] == "Describe a cat."
    )
    assert report.pairs[0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert not any("car" in text for text in embedder.seen)  # the few-shot turn is not what is compared
    assert cleaned.content_hash != loaded.content_hash and cleaned.train_rows == loaded.train_rows
    assert report.embedded == 5 and embedder.calls == 5

    kept, again = decontaminate(
        loaded, embedder, InMemoryVectorStore(), threshold=0.9, drop=False, cache_dir=cache
    )
    assert (again.flagged, again.dropped, again.embedded) == (1, 0, 0) and embedder.calls == 5  # cached
    assert kept.test_rows == 3 and not again.warning

    with pytest.raises(DatasetSourceError, match="all 3 held-out rows are near duplicates"):
        decontaminate(loaded, embedder, store, threshold=0.01, cache_dir=cache)
    _, mostly = decontaminate(loaded, embedder, store, threshold=0.01, drop=False, cache_dir=cache)
    assert "templated prompts" in mostly.as_dict()["warning"]
    with pytest.raises(ValueError, match="threshold"):
        decontaminate(loaded, embedder, store, threshold=1.5, cache_dir=cache)
