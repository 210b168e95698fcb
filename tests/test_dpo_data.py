"""DPO's data: the preference row format on each public schema, counted skips, split names, the built-in
pairs, and the comparisons' rendering (pairs kept whole, reply-only weights)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from kitchen.data import SchemaError, builtin_dataset, load_dataset_source
from kitchen.data.schemas import RowSkipped
from kitchen.workflows.dpo import load_preference_dataset
from kitchen.workflows.dpo.builtin import NAME as BUILTIN
from kitchen.workflows.dpo.builtin import REJECTED_FORMS, wrong_answers
from kitchen.workflows.dpo.comparisons import render_pairs
from kitchen.workflows.dpo.config import PreferenceDatasetSection
from kitchen.workflows.dpo.format import normalize_preference

HH_CHOSEN = "\n\nHuman: What is a good name for a cat?\n\nAssistant: Whiskers is a classic choice."
HH_REJECTED = "\n\nHuman: What is a good name for a cat?\n\nAssistant: I don't know."


def test_hh_rlhf_transcripts_share_their_prompt() -> None:
    multi = "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Name a cat.\n\nAssistant: "
    row = normalize_preference({"chosen": multi + "Whiskers.", "rejected": multi + "No."}, "chosen/rejected")
    assert row == {
        "prompt": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Name a cat."},
        ],
        "chosen": "Whiskers.",
        "rejected": "No.",
        "answer": None,
    }


def test_ultrafeedback_binarized_message_lists() -> None:
    def side(reply: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": "Explain DPO."}, {"role": "assistant", "content": reply}]

    row = {
        "prompt": "Explain DPO.",
        "prompt_id": "abc",
        "chosen": side("A preference loss."),
        "rejected": side("A database."),
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    }
    assert normalize_preference(row, "prompt/chosen/rejected") == {
        "prompt": [{"role": "user", "content": "Explain DPO."}],
        "chosen": "A preference loss.",
        "rejected": "A database.",
        "answer": None,
    }


@pytest.mark.parametrize(
    ("prompt", "chosen", "rejected"),
    [
        ("What is 2 + 2?", "4", "5"),  # plain strings
        ([{"role": "user", "content": "What is 2 + 2?"}], "4", "5"),  # a message-list prompt
        (  # TRL's conversational form: replies as assistant message lists
            [{"role": "user", "content": "What is 2 + 2?"}],
            [{"role": "assistant", "content": "4"}],
            [{"role": "assistant", "content": "5"}],
        ),
        ("\n\nHuman: What is 2 + 2?\n\nAssistant:", " 4", " 5"),  # a transcript prompt
    ],
)
def test_prompt_chosen_rejected_forms_agree(prompt: Any, chosen: Any, rejected: Any) -> None:
    row = normalize_preference(
        {"prompt": prompt, "chosen": chosen, "rejected": rejected, "answer": 4}, "prompt/chosen/rejected"
    )
    assert row["prompt"] == [{"role": "user", "content": "What is 2 + 2?"}]
    assert (row["chosen"].strip(), row["rejected"].strip(), row["answer"]) == ("4", "5", "4")


@pytest.mark.parametrize(
    ("row", "schema", "reason"),
    [
        ({"chosen": HH_CHOSEN, "rejected": None}, "chosen/rejected", "missing_field"),
        ({"chosen": HH_CHOSEN}, "chosen/rejected", "missing_field"),
        ({"prompt": "Hi", "chosen": "   ", "rejected": "No."}, "prompt/chosen/rejected", "empty_content"),
        ({"chosen": HH_CHOSEN, "rejected": HH_CHOSEN}, "chosen/rejected", "identical_pair"),
        (
            {"prompt": "Hi", "chosen": "Hello", "rejected": "Hello "},
            "prompt/chosen/rejected",
            "identical_pair",
        ),
        ({"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hey"}, "chosen/rejected", "no_assistant_turn"),
        ({"chosen": "plain text", "rejected": "other text"}, "chosen/rejected", "no_assistant_turn"),
        (
            {"chosen": HH_CHOSEN, "rejected": "\n\nHuman: Another question?\n\nAssistant: No."},
            "chosen/rejected",
            "prompt_mismatch",
        ),
        (
            {"chosen": HH_CHOSEN + "\n\nHuman: thanks", "rejected": HH_REJECTED},
            "chosen/rejected",
            "no_final_assistant_turn",
        ),
        ({"chosen": "\n\nAssistant: Hi", "rejected": "\n\nAssistant: Bye"}, "chosen/rejected", "no_prompt"),
        ({"prompt": "Hi", "chosen": 3.5j, "rejected": "No."}, "prompt/chosen/rejected", "not_a_string"),
        (
            {"prompt": "Hi", "chosen": [{"role": "robot", "content": "x"}], "rejected": "No."},
            "prompt/chosen/rejected",
            "unknown_role",
        ),
    ],
)
def test_rows_that_are_no_pair_are_skipped_by_reason(row: dict[str, Any], schema: str, reason: str) -> None:
    with pytest.raises(RowSkipped) as raised:
        normalize_preference(row, schema)
    assert raised.value.reason == reason


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_file_loads_with_skips_counted(tmp_path: Path) -> None:
    good = [
        {"chosen": HH_CHOSEN.replace("cat", f"cat {i}"), "rejected": HH_REJECTED.replace("cat", f"cat {i}")}
        for i in range(10)
    ]
    bad = [
        {"chosen": HH_CHOSEN, "rejected": None},
        {"chosen": HH_CHOSEN, "rejected": HH_CHOSEN},
        {"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hey"},
    ]
    path = _write_jsonl(tmp_path / "hh.jsonl", good + bad)
    loaded = load_preference_dataset(PreferenceDatasetSection(dataset=str(path), test_size=0.2))
    assert loaded.schema_found == "chosen/rejected"
    assert loaded.skipped_rows == {"identical_pair": 1, "missing_field": 1, "no_assistant_turn": 1}
    assert (loaded.train_rows, loaded.test_rows) == (8, 2)
    assert loaded.preview_rows()[0].keys() == {"prompt", "chosen", "rejected", "answer"}


def test_a_source_with_no_usable_pair_fails_naming_why(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_CHOSEN}] * 3)
    with pytest.raises(SchemaError, match=r"all 3 skipped \(identical_pair: 3\)"):
        load_preference_dataset(PreferenceDatasetSection(dataset=str(path)))
    chat = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    no_schema = r"No recognised row schema in columns \['messages'\].*prompt/chosen/rejected"
    with pytest.raises(SchemaError, match=no_schema):
        load_preference_dataset(PreferenceDatasetSection(dataset=str(chat)))


def ultrafeedback_directory(root: Path, n_train: int = 12, n_test: int = 4) -> Path:
    """UltraFeedback-binarized's layout: data/{train,test}_{prefs,sft,gen}-00000-of-00001.parquet."""

    def rows(split: str, n: int) -> pd.DataFrame:
        out = []
        for i in range(n):
            prompt = f"{split} question {i}: name a colour."
            out.append(
                {
                    "prompt": prompt,
                    "prompt_id": f"{split}-{i}",
                    "chosen": [
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": "Blue."},
                    ],
                    "rejected": [
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": "Table."},
                    ],
                    "messages": [
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": "Blue."},
                    ],
                    "score_chosen": 9.0,
                    "score_rejected": 2.0,
                }
            )
        return pd.DataFrame(out)

    data = root / "data"
    data.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        for kind in ("prefs", "sft", "gen"):
            rows(f"{split}_{kind}", n).to_parquet(data / f"{split}_{kind}-00000-of-00001.parquet")
    return root


def test_ultrafeedback_directory_trains_on_train_prefs_and_holds_out_test_prefs(tmp_path: Path) -> None:
    root = ultrafeedback_directory(tmp_path / "uf")
    loaded = load_preference_dataset(PreferenceDatasetSection(dataset=str(root)))
    assert (loaded.schema_found, loaded.test_split_source) == ("prompt/chosen/rejected", "source")
    assert (loaded.train_rows, loaded.test_rows) == (12, 4)
    prompts = {row["prompt"][0]["content"].split(" question")[0] for row in loaded.dataset["train"]}
    assert prompts == {"train_prefs"}
    assert {row["prompt"][0]["content"].split(" question")[0] for row in loaded.dataset["test"]} == {
        "test_prefs"
    }
    # A chat dataset over the same directory keeps the old rule: every train_* file is "train".
    chat = load_dataset_source(str(root), max_rows=100)
    assert chat.train_rows == 36


def test_builtin_pairs_are_kitchen_arithmetic_with_a_plausible_wrong_answer() -> None:
    pairs, problems = (
        builtin_dataset(BUILTIN, train_size=50),
        builtin_dataset("kitchen/arithmetic", train_size=50),
    )
    for split in ("train", "test"):
        assert len(pairs[split]) == len(problems[split])
        for pair, problem in zip(pairs[split], problems[split], strict=True):
            system, question, _ = problem["messages"]
            worked_example = [
                {"role": "user", "content": "What is 4 + 5?"},
                {"role": "assistant", "content": "9"},
            ]
            assert pair["prompt"] == [system, *worked_example, question]  # tinker-cookbook's one-shot prefix
            assert pair["chosen"] == pair["answer"] == problem["answer"]
            expression = re.search(r"\d+ [+*-] \d+", problem["messages"][-2]["content"])
            assert expression is not None
            a, op, b = expression.group(0).split()
            wrong = int(re.findall(r"\d+", pair["rejected"])[-1])
            assert wrong in wrong_answers(int(a), op, int(b))
            form = pair["rejected"].replace(expression.group(0), "{expression}")
            assert form.replace(str(wrong), "{wrong}") in REJECTED_FORMS
        shapes = {re.sub(r"\d+", "9", p["rejected"]) for p in pairs[split]}
        assert {"9", "9 + 9 = 9", "The answer is 9."} <= shapes  # bare, worked and sentence forms
    again = builtin_dataset(BUILTIN, train_size=20)
    # the same problems and wrong answers, whatever the size
    assert list(again["test"]) == list(pairs["test"])
    assert list(again["train"]) == list(pairs["train"])[:20]
    assert builtin_dataset(BUILTIN, seed=1, train_size=20)["test"][0] != pairs["test"][0]


def test_wrong_answers_are_human_slips() -> None:
    assert 65 in wrong_answers(48, "+", 27)  # the carry forgotten: 48 + 27 = 75
    assert 35 in wrong_answers(52, "-", 27)  # the smaller digit subtracted from the larger: 25
    assert 121 in wrong_answers(47, "*", 3)  # 141 with the carry forgotten
    assert {56, 22} <= set(wrong_answers(56, "+", 22))  # a number copied from the question
    assert all(w >= 0 and w != 0 for w in wrong_answers(14, "-", 14))


def test_comparisons_keep_pairs_whole_and_weight_only_the_reply(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    loaded = load_preference_dataset(PreferenceDatasetSection(max_rows=8))
    rows = list(loaded.dataset["train"])
    long_row = {**rows[0], "prompt": [{"role": "user", "content": "word " * 200}]}
    pairs = render_pairs([*rows, long_row], tokenizer, max_length=160)
    assert len(pairs) == len(rows) and len(pairs.datums) == 2 * len(rows)
    assert pairs.dropped == {"truncated_away": 1}
    for i, row in enumerate(rows):
        chosen, rejected = pairs.datums[2 * i], pairs.datums[2 * i + 1]
        for datum, reply in ((chosen, row["chosen"]), (rejected, row["rejected"])):
            targets = datum.loss_fn_inputs["target_tokens"].tolist()
            weights = datum.loss_fn_inputs["weights"].tolist()
            trained = [t for t, w in zip(targets, weights, strict=True) if w > 0]
            assert tokenizer.decode(trained) == reply + "<|im_end|>"
        # The two sides share the prompt's tokens exactly.
        first = next(k for k, w in enumerate(chosen.loss_fn_inputs["weights"].tolist()) if w > 0)
        assert rejected.model_input.to_ints()[: first + 1] == chosen.model_input.to_ints()[: first + 1]
