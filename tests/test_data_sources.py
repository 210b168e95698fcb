"""Schemas normalise to chat messages; every local source loads through ``datasets``; errors say why."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import datasets
import pytest
from datasets import Dataset, DatasetDict

from kitchen.data import sources
from kitchen.data.schemas import SCHEMAS, RowSkipped, SchemaError, detect_schema, normalize_row
from kitchen.data.sources import (
    DatasetSourceError,
    load_dataset_source,
    load_saved_dataset,
    save_dataset,
)
from kitchen.manifests import DatasetManifest


def _chat(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _qa_rows(n: int, prefix: str = "q") -> list[dict[str, Any]]:
    return [{"question": f"{prefix}{i}?", "answer": f"a{i}"} for i in range(n)]


def _prompts(ds: Dataset) -> list[str]:
    return [row["messages"][-2]["content"] for row in ds]


# -- schemas --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "schema", "messages", "answer"),
    [
        ({"messages": _chat("hi", "hello"), "answer": "hello"}, "messages", _chat("hi", "hello"), "hello"),
        (
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
            "conversations",
            _chat("hi", "yo"),
            None,
        ),
        ({"prompt": "2+2?", "completion": "4"}, "prompt/completion", _chat("2+2?", "4"), None),
        (
            {
                "prompt": [{"role": "system", "content": "terse"}, {"role": "user", "content": "2+2?"}],
                "completion": [{"role": "assistant", "content": "4"}],
            },
            "prompt/completion",
            [{"role": "system", "content": "terse"}, *_chat("2+2?", "4")],
            None,
        ),
        ({"instruction": "Say hi", "response": "hi"}, "instruction/response", _chat("Say hi", "hi"), None),
        (
            {"instruction": "Translate", "input": "chat", "output": "cat"},
            "instruction/output",
            _chat("Translate\n\nchat", "cat"),
            None,
        ),
        ({"instruction": "Add", "input": "", "output": "2"}, "instruction/output", _chat("Add", "2"), None),
        ({"input": "ping", "output": "pong"}, "input/output", _chat("ping", "pong"), None),
        (
            {"question": "3 apples + 4?", "answer": "3 + 4 = 7\n#### 7"},
            "question/answer",
            _chat("3 apples + 4?", "3 + 4 = 7\n#### 7"),
            "7",
        ),
    ],
)
def test_each_schema_normalises(row: dict[str, Any], schema: str, messages: list, answer: str | None) -> None:
    assert detect_schema(row) == schema
    assert normalize_row(row, schema) == {"messages": messages, "answer": answer}


def test_unknown_schema_error_lists_accepted_schemas_and_columns(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "odd.jsonl", [{"foo": "x", "bar": "y"}] * 3)
    with pytest.raises(SchemaError) as info:
        load_dataset_source(str(path))
    message = str(info.value)
    assert "'bar'" in message and "'foo'" in message
    for name in SCHEMAS:
        assert name in message


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"messages": None}, "missing_field"),
        ({"messages": []}, "empty_content"),
        ({"messages": _chat("hi", "   ")}, "empty_content"),
        (
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
            "not_a_string",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no_assistant_turn"),
        ({"messages": _chat("a", "b")[::-1]}, "bad_role_order"),
        ({"messages": [*_chat("a", "b"), {"role": "user", "content": "c"}]}, "no_final_assistant_turn"),
        ({"messages": [{"role": "tool", "content": "a"}, *_chat("a", "b")]}, "unknown_role"),
    ],
)
def test_malformed_rows_raise_with_reason(row: dict[str, Any], reason: str) -> None:
    with pytest.raises(RowSkipped) as info:
        normalize_row(row, "messages")
    assert info.value.reason == reason


def test_malformed_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    good = [{"messages": _chat(f"q{i}", f"a{i}")} for i in range(10)]
    bad = [
        {"messages": _chat("q", "")},
        {"messages": _chat("q", "")},
        {"messages": [{"role": "user", "content": "only user"}]},
        {"messages": _chat("a", "b")[::-1]},
    ]
    path = _write_jsonl(tmp_path / "mixed.jsonl", good + bad)
    loaded = load_dataset_source(str(path), test_size=2)
    assert loaded.skipped_rows == {"bad_role_order": 1, "empty_content": 2, "no_assistant_turn": 1}
    assert loaded.train_rows + loaded.test_rows == 10


def test_all_bad_rows_is_an_error(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "completion": ""}] * 4)
    with pytest.raises(SchemaError, match=r"No usable rows.*empty_content: 4"):
        load_dataset_source(str(path))


# -- local sources --------------------------------------------------------------------------------


def test_jsonl_file_with_seeded_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "qa.jsonl", _qa_rows(50))
    first = load_dataset_source(str(path), test_size=0.2, seed=3)
    again = load_dataset_source(str(path), test_size=0.2, seed=3)
    other = load_dataset_source(str(path), test_size=0.2, seed=4)
    assert first.source == "jsonl" and first.schema_found == "question/answer"
    assert first.test_split_source == "seeded-split"
    assert (first.train_rows, first.test_rows) == (40, 10)
    assert _prompts(first.dataset["test"]) == _prompts(again.dataset["test"])
    assert first.content_hash == again.content_hash != other.content_hash
    assert not set(_prompts(first.dataset["train"])) & set(_prompts(first.dataset["test"]))
    assert set(first.dataset["train"].column_names) == {"messages", "answer"}
    assert first.preview and first.preview[0]["messages"][0]["role"] == "user"


def test_a_file_with_no_readable_line_says_which_lines_and_why(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{not json\n\n[1, 2]\n{"question": "q"\n')
    with pytest.raises(DatasetSourceError) as raised:
        load_dataset_source(str(path))
    message = str(raised.value)
    assert "\n" not in message
    assert "all 3 non-blank lines were skipped (invalid_json: 2, not_an_object: 1)" in message
    assert "broken.jsonl line 1: invalid_json" in message and "broken.jsonl line 3: not_an_object" in message


# -- bad lines in real exports: skipped, counted, located ------------------------------------------


def _qa_line(i: int) -> str:
    return json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)})


def test_one_truncated_line_among_thirty_is_skipped_and_located(tmp_path: Path) -> None:
    lines = [_qa_line(i) for i in range(30)]
    lines.insert(17, _qa_line(99)[:25])  # line 18 of the file: cut off mid-string
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    loaded = load_dataset_source(str(path), test_size=5)
    assert loaded.skipped_rows == {"invalid_json": 1}
    (example,) = loaded.skipped_examples
    # The cut-off value opens at column 14, after '{"question": ' (13 characters).
    assert example == "chats.jsonl line 18: invalid_json (column 14: Unterminated string starting at)"
    assert loaded.train_rows + loaded.test_rows == 30
    manifest = loaded.manifest(tmp_path / "saved")
    assert manifest.skipped_rows == {"invalid_json": 1} and manifest.skipped_examples == [example]


def test_a_100k_line_export_with_one_bad_line_loads(tmp_path: Path) -> None:
    bad_line = 61_234
    path = tmp_path / "export.jsonl"
    with path.open("w") as handle:
        for number in range(1, 100_001):
            line = _qa_line(number)
            handle.write((line[:-7] if number == bad_line else line) + "\n")
    started = time.perf_counter()
    loaded = load_dataset_source(str(path), test_size=1000)
    assert time.perf_counter() - started < 60
    assert loaded.skipped_rows == {"invalid_json": 1}
    assert loaded.skipped_examples[0].startswith(f"export.jsonl line {bad_line}: invalid_json")
    assert (loaded.train_rows, loaded.test_rows) == (98_999, 1000)


def test_invalid_utf8_and_non_objects_cost_only_their_line(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    good = [_qa_line(i).encode() for i in range(6)]
    bad_utf8 = b'{"question": "caf\xe9?", "answer": "x"}'
    lone_surrogate = b'{"question": "\\ud800?", "answer": "x"}'  # valid JSON, not encodable text
    path.write_bytes(b"\n".join([*good[:3], bad_utf8, b"null", b'"text"', lone_surrogate, *good[3:]]))
    loaded = load_dataset_source(str(path), test_size=2)
    assert loaded.skipped_rows == {"invalid_utf8": 2, "not_an_object": 2}
    assert [e.split(":")[0] for e in loaded.skipped_examples] == [
        "mixed.jsonl line 4",
        "mixed.jsonl line 5",
        "mixed.jsonl line 6",
        "mixed.jsonl line 7",
    ]
    assert loaded.train_rows + loaded.test_rows == 6


def test_rows_of_mixed_types_are_judged_one_at_a_time(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)]
    rows += [
        {"question": "six times seven", "answer": 42},  # a number answer is text to train on
        {"question": {"nested": True}, "answer": "x"},  # Arrow could not hold this beside strings
        {"question": None, "answer": "x"},
        {"prompt": "p", "completion": "c"},  # another schema's row
    ]
    path = _write_jsonl(tmp_path / "types.jsonl", rows)
    loaded = load_dataset_source(str(path), test_size=1)
    assert loaded.schema_found == "question/answer"
    assert loaded.skipped_rows == {"missing_field": 2, "not_a_string": 1}
    assert loaded.train_rows + loaded.test_rows == 6
    answers = {row["answer"] for split in ("train", "test") for row in loaded.dataset[split]}
    assert "42" in answers


def test_csv_rows_with_the_wrong_field_count_are_skipped_with_their_lines(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    lines = ["question,answer"] + [f"q{i},a{i}" for i in range(12)]
    lines.insert(4, "q,a,extra")  # line 5: one field too many
    lines.insert(8, "lonely")  # line 9: one too few
    lines.append('"multi\nline question",answer,extra')  # lines 16-17: one record over two lines
    path.write_text("\n".join(lines) + "\n")
    loaded = load_dataset_source(str(path), test_size=2)
    assert loaded.skipped_rows == {"wrong_field_count": 3}
    assert loaded.skipped_examples == [
        "pairs.csv line 5: wrong_field_count (3 fields, the header has 2)",
        "pairs.csv line 9: wrong_field_count (1 fields, the header has 2)",
        "pairs.csv lines 16-17: wrong_field_count (3 fields, the header has 2)",
    ]
    assert loaded.train_rows + loaded.test_rows == 12


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        (
            "empty.jsonl",
            b"",
            r"empty\.jsonl is empty \(0 bytes\): it holds no rows; expected one JSON object",
        ),
        ("blank.jsonl", b"\n  \n", r"blank\.jsonl is empty \(only whitespace\)"),
        ("empty.csv", b"", r"empty\.csv is empty \(0 bytes\): it holds no rows; expected a header row"),
        (
            "header.csv",
            b"question,answer\n",
            r"No rows in '.*header\.csv' split 'train'; expected a header row",
        ),
        ("array.json", b"[]", r"No rows in '.*array\.json' split 'train'; expected one JSON object per line"),
        ("twice.csv", b"q,q\n1,2\n", r"the CSV header names column\(s\) \['q'\] more than once"),
    ],
)
def test_empty_files_say_so(tmp_path: Path, name: str, content: bytes, says: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DatasetSourceError, match=says) as raised:
        load_dataset_source(str(path))
    assert "\n" not in str(raised.value)


def test_a_json_array_file_loads_and_names_items(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([*_qa_rows(6), "not a row"], indent=2))
    loaded = load_dataset_source(str(path), test_size=2)
    assert loaded.skipped_rows == {"not_an_object": 1}
    assert loaded.skipped_examples == ["rows.json item 7: not_an_object (a JSON str, not an object)"]
    assert loaded.train_rows + loaded.test_rows == 6


def test_the_dataset_asset_shows_skipped_lines_in_its_metadata(tmp_path: Path) -> None:
    import dagster as dg

    from kitchen.workflows import get_workflow
    from kitchen_assets.common import dataset_asset
    from kitchen_assets.definitions import service_resources

    lines = [_qa_line(i) for i in range(20)]
    lines.insert(6, _qa_line(6)[:-3])
    path = tmp_path / "export.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [dataset_asset(get_workflow("supervised"))],
            run_config={"ops": {"supervised__dataset": {"config": {"dataset": str(path)}}}},
            instance=instance,
            resources=service_resources(),
        )
    (event,) = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert metadata["skipped_rows"].value == {"invalid_json": 1}
    (example,) = metadata["skipped_examples"].value
    assert example.startswith("export.jsonl line 7: invalid_json")
    assert metadata["train_rows"].value + metadata["test_rows"].value == 20


def test_schema_skips_are_located_too(tmp_path: Path) -> None:
    rows = _qa_rows(6)
    rows.insert(2, {"question": "q", "answer": "   "})
    path = _write_jsonl(tmp_path / "qa.jsonl", rows)
    loaded = load_dataset_source(str(path), test_size=2)
    assert loaded.skipped_examples == ["qa.jsonl line 3: empty_content"]


def test_a_truncated_parquet_file_names_the_root_cause(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    Dataset.from_list(_qa_rows(8)).to_parquet(str(path))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DatasetSourceError) as raised:
        load_dataset_source(str(path))
    message = str(raised.value)
    assert "rows.parquet" in message and "as parquet: " in message and "\n" not in message
    assert "An error occurred while generating the dataset" not in message


def test_csv_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "alpaca.csv"
    Dataset.from_list(
        [{"instruction": f"Repeat {i:03d}", "input": "", "output": f"{i:03d}"} for i in range(20)]
    ).to_csv(str(path), index=False)
    loaded = load_dataset_source(str(path), test_size=5)
    assert (loaded.source, loaded.schema_found) == ("data-files", "instruction/output")
    assert (loaded.train_rows, loaded.test_rows) == (15, 5)
    row = loaded.dataset["train"][0]["messages"]
    assert row[0]["content"] == "Repeat " + row[1]["content"]  # "007" stays text, not the number 7


def test_numeric_answers_in_flat_columns_become_text() -> None:
    assert normalize_row({"question": "6 * 7?", "answer": 42}, "question/answer")["answer"] == "42"


def test_save_to_disk_directory_keeps_its_splits(tmp_path: Path) -> None:
    saved = DatasetDict(
        {
            "train": Dataset.from_list([{"input": f"i{i}", "output": f"o{i}"} for i in range(12)]),
            "validation": Dataset.from_list([{"input": f"v{i}", "output": f"o{i}"} for i in range(3)]),
        }
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    loaded = load_dataset_source(str(tmp_path / "saved"))
    assert (loaded.source, loaded.test_split_source) == ("local-dir", "source")
    assert (loaded.train_rows, loaded.test_rows) == (12, 3)
    assert _prompts(loaded.dataset["test"]) == ["v0", "v1", "v2"]


def test_saved_single_dataset_gets_a_seeded_test_split(tmp_path: Path) -> None:
    Dataset.from_list(_qa_rows(10)).save_to_disk(str(tmp_path / "single"))
    loaded = load_dataset_source(str(tmp_path / "single"), test_size=0.3)
    assert (loaded.source, loaded.test_split_source) == ("local-dir", "seeded-split")
    assert (loaded.train_rows, loaded.test_rows) == (7, 3)


def test_data_files_directory_maps_train_and_test_names(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "d" / "train.jsonl", _qa_rows(8, "train"))
    _write_jsonl(tmp_path / "d" / "test.jsonl", _qa_rows(2, "test"))
    loaded = load_dataset_source(str(tmp_path / "d"))
    assert (loaded.source, loaded.test_split_source) == ("data-files", "source")
    assert _prompts(loaded.dataset["test"]) == ["test0?", "test1?"]
    assert loaded.train_rows == 8


def test_hub_style_parquet_layout_loads(tmp_path: Path) -> None:
    data = tmp_path / "repo" / "data"
    data.mkdir(parents=True)
    rows = [{"messages": _chat(f"p{i}", f"c{i}")} for i in range(6)]
    Dataset.from_list(rows[:4]).to_parquet(str(data / "train-00000-of-00001.parquet"))
    Dataset.from_list(rows[4:]).to_parquet(str(data / "test-00000-of-00001.parquet"))
    loaded = load_dataset_source(str(tmp_path / "repo"))
    assert (loaded.train_rows, loaded.test_rows, loaded.schema_found) == (4, 2, "messages")


def test_split_choice_and_max_rows(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "d" / "train.jsonl", _qa_rows(30))
    _write_jsonl(tmp_path / "d" / "test.jsonl", _qa_rows(30, "t"))
    capped = load_dataset_source(str(tmp_path / "d"), max_rows=10)
    assert (capped.train_rows, capped.test_rows) == (10, 10)
    chosen = load_dataset_source(str(tmp_path / "d"), split="test", test_size=5)
    assert chosen.test_split_source == "seeded-split"
    assert all(p.startswith("t") for p in _prompts(chosen.dataset["train"]))
    with pytest.raises(DatasetSourceError, match="no split 'dev'"):
        load_dataset_source(str(tmp_path / "d"), split="dev")


def test_save_dataset_is_content_addressed_and_atomic(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "qa.jsonl", _qa_rows(20))
    loaded = load_dataset_source(str(path))
    out = save_dataset(loaded, tmp_path / "out")
    assert out.name.endswith(loaded.content_hash[:16])
    assert save_dataset(loaded, tmp_path / "out") == out
    assert [p.name for p in (tmp_path / "out").iterdir()] == [out.name]  # no temp dirs left behind
    reread = load_saved_dataset(out)
    assert reread["test"].to_list() == loaded.dataset["test"].to_list()
    manifest = loaded.manifest(out)
    assert isinstance(manifest, DatasetManifest)
    assert (manifest.train_rows, manifest.test_rows, manifest.source) == (18, 2, "jsonl")


def test_save_dataset_defaults_to_kitchen_home(kitchen_home: Path) -> None:
    out = save_dataset(load_dataset_source("kitchen/arithmetic", max_rows=20))
    assert out.parent == kitchen_home.resolve() / "datasets"


# -- unknown names and the Hub --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nobody/no-such-dataset", "no-such-thing", "missing/file.jsonl"])
def test_unknown_name_names_everything_tried_without_hanging(name: str) -> None:
    start = time.monotonic()
    with pytest.raises(DatasetSourceError) as info:
        load_dataset_source(name)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert name in message and "kitchen/arithmetic" in message
    assert "no such file or directory" in message
    assert "Hugging Face Hub" in message


def test_unreachable_hub_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi

    def unreachable(self: HfApi, repo_id: str, **kwargs: Any) -> None:
        assert kwargs["timeout"] == 10.0
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(sources, "_hub_offline", lambda: (False, False))
    monkeypatch.setattr(HfApi, "dataset_info", unreachable)
    with pytest.raises(DatasetSourceError, match="Hub could not be reached"):
        load_dataset_source("owner/dataset")


def test_hub_dataset_is_pinned_to_the_revision_sha(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi

    calls: list[tuple[Any, ...]] = []

    def fake_load(path: str, name: str | None = None, **kwargs: Any) -> DatasetDict:
        calls.append((path, name, kwargs.get("revision")))
        return DatasetDict({"train": Dataset.from_list(_qa_rows(10))})

    monkeypatch.setattr(sources, "_hub_offline", lambda: (False, False))
    monkeypatch.setattr(HfApi, "dataset_info", lambda self, repo_id, **kw: SimpleNamespace(sha="abc123"))
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    loaded = load_dataset_source("owner/dataset:main", test_size=2)
    assert calls == [("owner/dataset", "main", "abc123")]
    assert (loaded.source, loaded.revision, loaded.test_rows) == ("hub", "abc123", 2)
