"""Datum rendering: masks per ``train_on``, right-shift, truncation, Parquet round-trip, hashes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from kitchen.data.datums import (
    build_datums,
    datum_to_dict,
    datums_hash,
    prompt_and_answer,
    read_datums,
    render_conversation,
    render_weighted_tokens,
    save_datums,
    tokenizer_fingerprint,
    write_datums,
)
from kitchen.data.sources import load_dataset_source

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "hello world"},
    {"role": "assistant", "content": "the cat sat on the mat"},
    {"role": "user", "content": "what is the sum of 3 plus 4?"},
    {"role": "assistant", "content": "7"},
]
END = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _weighted_runs(tokenizer: Any, tokens: list[int], weights: list[float]) -> list[str]:
    """Decoded text of each maximal run of weighted tokens."""
    runs: list[list[int]] = []
    previous = 0.0
    for token, weight in zip(tokens, weights, strict=True):
        if weight:
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = weight
    return [tokenizer.decode(run) for run in runs]


def _datum_lists(datum: Any) -> tuple[list[int], list[int], list[float]]:
    return (
        datum.model_input.to_ints(),
        datum.loss_fn_inputs["target_tokens"].tolist(),
        datum.loss_fn_inputs["weights"].tolist(),
    )


def test_full_rendering_matches_the_chat_template(tokenizer: Any) -> None:
    tokens, _ = render_weighted_tokens(CONVERSATION, tokenizer, "all_assistant")
    expected = tokenizer.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    assert tokens == list(expected)


@pytest.mark.parametrize(
    ("train_on", "expected"),
    [
        ("last_assistant", ["7" + END]),
        ("all_assistant", ["the cat sat on the mat" + END, "7" + END]),
    ],
)
def test_assistant_masks_cover_exactly_assistant_text_and_end_token(
    tokenizer: Any, train_on: Any, expected: list[str]
) -> None:
    result = render_conversation(CONVERSATION, tokenizer, train_on=train_on, max_length=512)
    assert result.datum is not None and not result.truncated
    _, targets, weights = _datum_lists(result.datum)
    assert _weighted_runs(tokenizer, targets, weights) == expected


def test_all_trains_every_target(tokenizer: Any) -> None:
    result = render_conversation(CONVERSATION, tokenizer, train_on="all", max_length=512)
    assert result.datum is not None
    _, targets, weights = _datum_lists(result.datum)
    assert weights == [1.0] * len(targets)
    assert (
        tokenizer.decode(targets)
        == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)[len("<|im_start|>") :]
    )


def test_right_shift(tokenizer: Any) -> None:
    tokens, mask = render_weighted_tokens(CONVERSATION, tokenizer, "all_assistant")
    result = render_conversation(CONVERSATION, tokenizer, train_on="all_assistant", max_length=512)
    assert result.datum is not None and result.num_tokens == len(tokens)
    inputs, targets, weights = _datum_lists(result.datum)
    assert inputs == tokens[:-1]
    assert targets == tokens[1:]
    assert weights == mask[1:]
    # each weighted target is predicted from the tokens before it: the first trained target
    # follows the assistant header in the input
    first = weights.index(1.0)
    assert tokenizer.decode(inputs[: first + 1]).endswith("<|im_start|>assistant\n")


def test_truncation_is_counted_and_cut_off_rows_dropped(tokenizer: Any) -> None:
    _, mask = render_weighted_tokens(CONVERSATION, tokenizer, "all_assistant")
    first_trained = mask.index(1.0)
    kept = render_conversation(
        CONVERSATION, tokenizer, train_on="all_assistant", max_length=first_trained + 3
    )
    assert kept.truncated and kept.datum is not None
    assert kept.datum.model_input.length == first_trained + 2
    assert _datum_lists(kept.datum)[2] == mask[1 : first_trained + 3]
    dropped = render_conversation(
        CONVERSATION, tokenizer, train_on="last_assistant", max_length=first_trained + 3
    )
    assert (dropped.datum, dropped.drop_reason, dropped.truncated) == (None, "truncated_away", True)

    dataset = DatasetDict(
        {
            "train": Dataset.from_list([{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}]),
            "test": Dataset.from_list([{"messages": CONVERSATION[:3]}]),
        }
    )
    built = build_datums(dataset, tokenizer, "last_assistant", max_length=first_trained + 5)
    assert built.train_stats.dropped == {"truncated_away": 1}
    assert built.train_stats.truncated == 1 and built.train_stats.datums == 1
    manifest = built.manifest("train.parquet", "test.parquet", "tok")
    assert manifest.truncated_rows == 2 and manifest.dropped_rows == {"truncated_away": 1}


def test_build_datums_stats(tokenizer: Any) -> None:
    loaded = load_dataset_source("kitchen/arithmetic", max_rows=100)
    built = build_datums(loaded.dataset, tokenizer, "last_assistant", max_length=128)
    stats = built.train_stats
    assert (stats.rows, stats.datums, stats.truncated, stats.dropped) == (100, 100, 0, {})
    assert len(built.test) == 100
    assert sum(stats.length_histogram.values()) == 100
    assert list(stats.length_histogram) == ["1-16", "17-32", "33-64", "65-128"]
    assert stats.tokens == sum(d.model_input.length for d in built.train)
    # the answer digits plus the end token, never the prompt
    assert 100 * 2 <= stats.trained_tokens <= 100 * 5
    assert stats.max_tokens < 60


def test_parquet_round_trip_is_exact(tokenizer: Any, tmp_path: Path) -> None:
    loaded = load_dataset_source("kitchen/arithmetic", max_rows=20)
    built = build_datums(loaded.dataset, tokenizer, "all_assistant", max_length=64)
    path = write_datums(tmp_path / "sub" / "train.parquet", built.train)
    assert [p.name for p in path.parent.iterdir()] == ["train.parquet"]
    schema = pq.read_schema(path)
    assert schema.field("input_tokens").type == pa.list_(pa.int32())
    assert schema.field("target_tokens").type == pa.list_(pa.int64())
    assert schema.field("weights").type == pa.list_(pa.float32())
    back = read_datums(path)
    assert [datum_to_dict(d) for d in back] == [datum_to_dict(d) for d in built.train]
    assert back[0].loss_fn_inputs["target_tokens"].dtype == "int64"
    assert back[0].loss_fn_inputs["weights"].dtype == "float32"
    assert datums_hash(back) == datums_hash(built.train)
    assert datums_hash(built.train) != datums_hash(built.train[1:])


def test_save_datums_writes_a_content_addressed_pair(tokenizer: Any, tmp_path: Path) -> None:
    loaded = load_dataset_source("kitchen/arithmetic", max_rows=10)
    built = build_datums(loaded.dataset, tokenizer, "last_assistant", max_length=64)
    fingerprint = tokenizer_fingerprint(tokenizer)
    manifest = save_datums(built, fingerprint, tmp_path)
    assert manifest == save_datums(built, fingerprint, tmp_path)
    for path, datums in ((manifest.train_path, built.train), (manifest.test_path, built.test)):
        assert [datum_to_dict(d) for d in read_datums(path)] == [datum_to_dict(d) for d in datums]
    assert manifest.content_hash == built.content_hash()
    assert (manifest.num_datums, manifest.num_test_datums, manifest.train_on) == (10, 10, "last_assistant")
    assert len(list(tmp_path.iterdir())) == 1


def test_prompt_and_answer(tokenizer: Any) -> None:
    with_answer = prompt_and_answer({"messages": CONVERSATION, "answer": "7"}, tokenizer)
    text = tokenizer.decode(with_answer.prompt_tokens)
    assert text.endswith("what is the sum of 3 plus 4?<|im_end|>\n<|im_start|>assistant\n")
    assert "the cat sat on the mat" in text and with_answer.answer == "7"
    without = prompt_and_answer({"messages": CONVERSATION[:3], "answer": None}, tokenizer)
    assert without.answer == "the cat sat on the mat"
    assert without.prompt_messages == CONVERSATION[:2]
