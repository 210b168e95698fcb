"""Property: whatever a user's JSON, JSONL or CSV file holds, loading it ends in usable rows plus counted,
located skips, or in one clear ``DatasetSourceError``/``SchemaError`` line; never another exception.

Files are generated in every accepted row schema, mixed, with wrong types, nulls, huge strings, empty
strings, invalid UTF-8, lone surrogates, truncated lines, JSON values that are not objects, CSV records
with the wrong field count, one-row files and files smaller than a training batch.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kitchen.data.schemas import SCHEMAS, SchemaError
from kitchen.data.sources import DatasetSourceError, load_dataset_source
from kitchen.training.batching import EpochBatches

SKIP_REASONS = {
    # lines or records that hold no row
    "invalid_json",
    "not_an_object",
    "invalid_utf8",
    "wrong_field_count",
    "malformed_csv",
    # rows that do not fit the schema
    "missing_field",
    "not_a_string",
    "empty_content",
    "not_a_message_list",
    "unknown_role",
    "no_assistant_turn",
    "bad_role_order",
    "no_final_assistant_turn",
}
# Each error says what to do about it.
ADVICE = re.compile(r"expected|rename|fix those|add rows|save the file|give each column|check", re.IGNORECASE)
HUGE = "x" * 100_000
PROPERTY = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same files every run: a failure here is reproducible, not flaky
    database=None,  # nothing written into the checkout
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)

good_text = st.one_of(
    st.text(min_size=1, max_size=12).filter(str.strip),
    st.sampled_from([HUGE, "Ω≈ç√ 😀", "a\nb", 'quote " , comma', "-25", "0"]),
)
bad_text = st.sampled_from(["", "   ", "\n\t"])
junk = st.one_of(
    st.none(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@st.composite
def chat(draw: st.DrawFn, role_key: str, content_key: str, roles: tuple[str, str]) -> list[Any]:
    return [
        {role_key: role, content_key: draw(good_text)}
        for _ in range(draw(st.integers(1, 2)))
        for role in roles
    ]


@st.composite
def good_row(draw: st.DrawFn, schema: str) -> dict[str, Any]:
    """A row in ``schema`` that should be usable."""
    if schema == "messages":
        built: dict[str, Any] = {"messages": draw(chat("role", "content", ("user", "assistant")))}
    elif schema == "conversations":
        built = {"conversations": draw(chat("from", "value", ("human", "gpt")))}
    else:
        built = {column: draw(good_text) for column in SCHEMAS[schema]}
        if schema.startswith("instruction") and draw(st.booleans()):
            built["input"] = draw(st.one_of(good_text, bad_text))
    if draw(st.integers(0, 3)) == 0:
        built["system"] = draw(st.one_of(good_text, bad_text, junk))
    return built


@st.composite
def broken_row(draw: st.DrawFn, schema: str, flat_only: bool = False) -> dict[str, Any]:
    """A row in ``schema`` with one thing wrong: a field missing, null, empty or of the wrong type, or
    (chat schemas) a turn with a wrong role, a turn that is not an object, a turn missing."""
    built = draw(good_row(schema))
    column = draw(st.sampled_from(SCHEMAS[schema]))
    kinds = ["empty"] if flat_only else ["missing", "null", "empty", "type"]
    if schema in ("messages", "conversations"):
        kinds += ["role", "turn", "drop", "content"]
    kind = draw(st.sampled_from(kinds))
    turns = built.get(column)
    if kind == "missing":
        built.pop(column)
    elif kind == "null":
        built[column] = None
    elif kind == "empty":
        built[column] = draw(bad_text)
    elif kind == "type":
        built[column] = draw(junk)
    elif kind == "role":
        turns[draw(st.integers(0, len(turns) - 1))]["role" if schema == "messages" else "from"] = "tool"
    elif kind == "turn":
        turns[draw(st.integers(0, len(turns) - 1))] = draw(junk)
    elif kind == "drop":
        turns.pop()  # ends on the user's turn
    else:
        turns[0]["content" if schema == "messages" else "value"] = draw(st.one_of(junk, bad_text))
    return built


def row(schema: str, flat_only: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(good_row(schema), good_row(schema), broken_row(schema, flat_only))


FLAT_SCHEMAS = [name for name in SCHEMAS if name not in ("messages", "conversations")]


@st.composite
def jsonl_file(draw: st.DrawFn) -> bytes:
    main = draw(st.sampled_from(list(SCHEMAS)))
    lines: list[bytes] = []
    for _ in range(draw(st.integers(0, 14))):
        kind = draw(
            st.sampled_from(["row", "row", "row", "other", "truncated", "utf8", "surrogate", "scalar"])
        )
        if kind in ("row", "other", "truncated"):
            schema = main if kind != "other" else draw(st.sampled_from(list(SCHEMAS)))
            encoded = json.dumps(draw(row(schema)), ensure_ascii=draw(st.booleans())).encode()
            if kind == "truncated":
                encoded = encoded[: draw(st.integers(1, max(1, len(encoded) - 1)))]
            lines.append(encoded)
        elif kind == "utf8":
            lines.append(b'{"prompt": "caf\xe9", "completion": "\xff\xfe"}')
        elif kind == "surrogate":
            lines.append(b'{"question": "\\ud800", "answer": "x", "prompt": "\\udfff", "completion": "y"}')
        else:
            lines.append(json.dumps(draw(st.one_of(st.none(), st.integers(), st.text(max_size=5)))).encode())
        if draw(st.integers(0, 6)) == 0:
            lines.append(b"   ")  # blank lines are not rows
    return b"\n".join(lines) + (b"\n" if draw(st.booleans()) else b"")


@st.composite
def json_array_file(draw: st.DrawFn) -> bytes:
    schemas = draw(st.lists(st.sampled_from(list(SCHEMAS)), min_size=1, max_size=2))
    items = draw(st.lists(st.one_of(*[st.sampled_from(schemas).flatmap(row)] * 4, junk), max_size=14))
    return json.dumps(items, indent=draw(st.sampled_from([None, 2]))).encode()


@st.composite
def csv_file(draw: st.DrawFn) -> bytes:
    schema = draw(st.sampled_from(FLAT_SCHEMAS))
    header = list(SCHEMAS[schema]) + draw(st.sampled_from([[], ["system"], ["extra"]]))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for _ in range(draw(st.integers(0, 14))):
        record = [draw(st.one_of(good_text, good_text, good_text, bad_text)) for _ in header]
        kind = draw(st.sampled_from(["row"] * 5 + ["long", "short", "utf8"]))
        if kind == "long":
            record.append(draw(good_text))
        elif kind == "short":
            record = record[: draw(st.integers(1, len(header) - 1))]
        elif kind == "utf8":
            record[0] = "BADBYTES"
        writer.writerow(record)
    return out.getvalue().encode().replace(b"BADBYTES", b"caf\xe9\xff")


def _units(path: Path, data: bytes) -> int:
    """What the file holds as candidate rows, by the formats' own rules: a JSON document that is an
    array holds its items, one object is one row; otherwise each non-blank line (JSON lines), or each
    CSV record after the header."""
    if path.suffix == ".csv":
        records = list(csv.reader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline="")))
        return sum(1 for r in records[1:] if r)
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return sum(1 for line in data.split(b"\n") if line.strip())
    return len(document) if isinstance(document, list) else 1


def _check(name: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        try:
            loaded = load_dataset_source(str(path), test_size=0.25, seed=0)
        except (DatasetSourceError, SchemaError) as error:
            message = str(error)
            assert message and "\n" not in message and len(message) < 2000, message
            assert name in message, message
            assert ADVICE.search(message), message
            return
        skipped = sum(loaded.skipped_rows.values())
        assert loaded.train_rows >= 1 and loaded.test_rows >= 1
        # Every row is kept, skipped (counted by reason) or removed as an exact duplicate (counted too).
        removed = loaded.dedup.train_duplicates + loaded.dedup.test_duplicates + loaded.dedup.test_in_train
        assert loaded.train_rows + loaded.test_rows + skipped + removed == _units(path, data)
        assert set(loaded.skipped_rows) <= SKIP_REASONS
        assert len(loaded.skipped_examples) == min(skipped, 20)
        for example in loaded.skipped_examples:
            found = re.match(rf"^{re.escape(name)} (?:line \d+|lines \d+-\d+|item \d+): (\w+)", example)
            assert found and found.group(1) in loaded.skipped_rows, example
        for split in ("train", "test"):
            for normalised in loaded.dataset[split]:
                assert all(
                    isinstance(m["content"], str) and m["content"].strip() for m in normalised["messages"]
                )
        # A dataset smaller than a batch is one clear line too, from the batch builder.
        try:
            EpochBatches(loaded.train_rows, batch_size=16, epochs=1, seed=0)
        except ValueError as error:
            assert "lower --batch-size" in str(error) and "\n" not in str(error)


@PROPERTY
@given(jsonl_file())
def test_any_jsonl_file_loads_or_fails_clearly(data: bytes) -> None:
    _check("export.jsonl", data)


@settings(PROPERTY, max_examples=30)
@given(json_array_file())
def test_any_json_array_file_loads_or_fails_clearly(data: bytes) -> None:
    _check("rows.json", data)


@settings(PROPERTY, max_examples=40)
@given(csv_file())
def test_any_csv_file_loads_or_fails_clearly(data: bytes) -> None:
    _check("table.csv", data)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("one.jsonl", b'{"prompt": "p", "completion": "c"}\n'),  # one row: nothing to hold out
        ("two.csv", b"question,answer\nq1,a1\nq2,a2\n"),  # smaller than a batch
        ("huge.jsonl", json.dumps({"prompt": HUGE, "completion": HUGE}).encode() * 1 + b"\n" * 2),
        ("nested.jsonl", b"[" * 100_000 + b"\n" + b'{"prompt": "p", "completion": "c"}\n'),
    ],
)
def test_edge_files(name: str, data: bytes) -> None:
    _check(name, data)
