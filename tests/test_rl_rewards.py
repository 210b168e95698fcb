"""RL's pieces without a model: reward checks and their bounds, problem rows, advantages, settings."""

from __future__ import annotations

import statistics
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from kitchen.data import SchemaError, builtin_dataset, load_dataset_source
from kitchen.workflows.rl.config import RLConfig
from kitchen.workflows.rl.plan import by_group_fractions, group_advantages, total_reward
from kitchen.workflows.rl.problems import ProblemPrompt, problem_format
from kitchen.workflows.rl.rewards import (
    RewardRunner,
    RewardSpecError,
    check_boxed,
    check_integer,
    check_math_verify,
    gsm8k_final_answer,
    last_boxed,
    validate_reward,
)

# -- the checks ------------------------------------------------------------------------------------


def test_integer_takes_the_last_integer_commas_removed() -> None:
    assert check_integer("I think 12 + 30 = 42", "42").correct == 1.0
    assert check_integer("42, no wait, 41", "42").correct == 0.0
    assert check_integer("It is 1,234.", "1234").correct == 1.0
    assert check_integer("minus -7", "-7").correct == 1.0
    assert check_integer("no number", "3") == check_integer("no number", "3")
    assert check_integer("no number", "3").correct == 0.0
    assert check_integer("anything", "3").format == 1.0  # the cookbook's arithmetic checks only the stop


def test_boxed_reads_the_last_balanced_box() -> None:
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed 7") == "7"
    assert last_boxed("no box") is None
    assert check_boxed(r"so \boxed{ \dfrac{1}{2} }", r"\frac{1}{2}").correct == 1.0
    assert check_boxed(r"\boxed{0.50}", "0.5").correct == 1.0
    assert check_boxed(r"\boxed{3}", "4").correct == 0.0
    missing = check_boxed("42", "42")
    assert (missing.correct, missing.format) == (0.0, 0.0)


def test_gsm8k_answer_is_after_the_last_marker_without_commas() -> None:
    assert gsm8k_final_answer("He pays 2 * 500 = <<2*500=1000>>1,000.\n#### 1,000") == "1000"
    assert gsm8k_final_answer("#### 3\nthen\n#### 5") == "5"
    assert gsm8k_final_answer("no marker") is None


def test_math_verify_puts_the_gold_answer_first(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_math_verify(r"The answer is $\frac{1}{2}$.", "0.5").correct == 1.0
    assert check_math_verify("It is 0.5", r"\frac{1}{2}").correct == 1.0
    assert check_math_verify(r"\boxed{72}", "72").correct == 1.0
    wrong = check_math_verify("It is 71", "72")
    assert (wrong.correct, wrong.format) == (0.0, 1.0)
    nothing = check_math_verify("I do not know", "72")
    assert (nothing.correct, nothing.format) == (0.0, 0.0)

    import math_verify

    calls = []
    real = math_verify.verify

    def spy(gold, target, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((gold, target, kwargs))
        return real(gold, target, **kwargs)

    monkeypatch.setattr(math_verify, "verify", spy)
    check_math_verify("so 71", "72")
    ((gold, target, kwargs),) = calls
    assert 72 in gold and 71 in target  # verify(parse(gold), parse(answer)): not symmetric
    assert kwargs == {"timeout_seconds": None}  # signal-based timeouts off; bounded by the runner


def test_reward_is_correct_plus_format_penalty() -> None:
    assert total_reward(1.0, 1.0, 0.1) == 1.0
    assert total_reward(1.0, 0.0, 0.1) == pytest.approx(0.9)
    assert total_reward(0.0, 0.0, 0.1) == pytest.approx(-0.1)


# -- bounded running -------------------------------------------------------------------------------

REWARDS_MODULE = textwrap.dedent(
    """
    import os
    import time

    def exact(reply, answer):
        print("a user function that prints must not break the worker")
        return reply.strip() == answer

    def graded(reply, answer):
        return {"correct": 0.5, "format": 0}

    def raises(reply, answer):
        raise ValueError("bad checker")

    def hangs(reply, answer):
        if reply == "hang":
            while True:
                pass
        return 1.0

    def exits(reply, answer):
        os._exit(3)

    def bad_type(reply, answer):
        return "yes"
    """
)


@pytest.fixture
def user_rewards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / "my_rewards.py").write_text(REWARDS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_user_functions_run_bounded_and_failures_score_zero(user_rewards: str) -> None:
    runner = RewardRunner(f"{user_rewards}:exact")
    try:
        checks = runner.check([("5", "5"), ("6", "5")])
        assert [c.correct for c in checks] == [1.0, 0.0] and runner.errors == 0
    finally:
        runner.close()
    graded = RewardRunner(f"{user_rewards}:graded")
    assert (graded.check([("x", "y")])[0].correct, graded.check([("x", "y")])[0].format) == (0.5, 0.0)
    graded.close()
    for name, message in (("raises", "ValueError: bad checker"), ("bad_type", "must be a finite number")):
        runner = RewardRunner(f"{user_rewards}:{name}")
        (check,) = runner.check([("5", "5")])
        assert check.correct == 0.0 and message in (check.error or "") and runner.errors == 1
        runner.close()
    runner = RewardRunner(f"{user_rewards}:exits")
    (check,) = runner.check([("5", "5")])
    assert check.correct == 0.0 and "exited" in (check.error or "")
    runner.close()


def test_a_hanging_check_is_killed_and_the_next_one_runs(user_rewards: str) -> None:
    runner = RewardRunner(f"{user_rewards}:hangs", timeout=1.0)
    try:
        started = time.perf_counter()
        hung, after = runner.check([("hang", "1"), ("fine", "1")])
        assert time.perf_counter() - started < 60
        assert hung.correct == 0.0 and "timed out after 1s" in (hung.error or "")
        assert after.correct == 1.0 and after.error is None  # a fresh worker took over
        assert (runner.timeouts, runner.errors) == (1, 1)
    finally:
        runner.close()


def test_reward_specs_are_checked_at_launch(user_rewards: str) -> None:
    assert validate_reward("math_verify") == "math_verify"
    assert validate_reward(f"{user_rewards}:exact") == f"{user_rewards}:exact"
    with pytest.raises(RewardSpecError, match="cannot import module 'no_such_module'"):
        validate_reward("no_such_module:fn")
    with pytest.raises(RewardSpecError, match="has no attribute 'missing'"):
        validate_reward(f"{user_rewards}:missing")
    with pytest.raises(RewardSpecError, match="use one of integer, boxed, math_verify or module:function"):
        validate_reward("exactish")
    with pytest.raises(ValidationError, match="cannot import module"):
        RLConfig(reward="no_such_module:fn")


# -- advantages and group fractions ----------------------------------------------------------------


def test_advantages_are_relative_to_the_group() -> None:
    rewards = [1.0, 0.0, 0.0, -0.1]
    mean = sum(rewards) / 4
    assert group_advantages(rewards, "none") == pytest.approx([r - mean for r in rewards])
    std = statistics.stdev(rewards)  # Bessel-corrected, as torch.std in TRL
    assert group_advantages(rewards, "group") == pytest.approx([(r - mean) / (std + 1e-4) for r in rewards])
    assert group_advantages([0.9, 0.9], "group") == [0.0, 0.0]
    assert by_group_fractions([[1, 0], [1, 1], [0, 0], [-0.1, -0.1]]) == {
        "by_group/frac_mixed": 0.25,
        "by_group/frac_all_good": 0.25,
        "by_group/frac_all_bad": 0.5,
    }


# -- settings --------------------------------------------------------------------------------------


def test_bad_settings_fail_naming_the_flag() -> None:
    with pytest.raises(ValidationError, match="a group of 1 has no signal: use --group-size 2"):
        RLConfig(group_size=1, advantage_norm="group")
    with pytest.raises(ValidationError, match="apply to ppo and cispo, not importance_sampling"):
        RLConfig(clip_high_threshold=1.2)
    with pytest.raises(ValidationError, match="above clip_high_threshold"):
        RLConfig(loss="ppo", clip_low_threshold=1.5, clip_high_threshold=1.2)
    with pytest.raises(ValidationError, match="no held-out NLL"):
        RLConfig(gate_max_nll_increase=0.1)
    with pytest.raises(ValidationError, match="unknown metric"):
        RLConfig(gate_metric="exact_match")
    ppo = RLConfig(loss="ppo", clip_low_threshold=0.7)
    assert ppo.loss_fn_config() == {"clip_low_threshold": 0.7}


# -- problems --------------------------------------------------------------------------------------


def _load(tmp_path: Path, rows: list[dict[str, object]], reward: str = "integer", **prompt: object):
    import json

    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings: dict[str, object] = {"fewshot": False, "format_instruction": False, "system_prompt": None}
    settings.update(prompt)
    fmt = problem_format(ProblemPrompt(reward, **settings))  # type: ignore[arg-type]
    return load_dataset_source(str(path), test_size=0.25, row_format=fmt)


def test_gsm8k_rows_keep_the_final_answer_and_skip_unusable_ones(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [
        {"question": f"Q{i}: how many?", "answer": f"Work {i}.\n#### {i},000"} for i in range(1, 9)
    ]
    rows += [
        {"question": "no final number", "answer": "It is unclear.\n#### many"},
        {"question": "empty", "answer": "#### "},
        {"question": None, "answer": "#### 3"},
    ]
    loaded = _load(tmp_path, rows)
    assert loaded.schema_found == "question/answer"
    kept = sorted(int(r["answer"]) for split in loaded.dataset.values() for r in split)
    assert kept == [i * 1000 for i in range(1, 9)]
    assert loaded.skipped_rows == {"answer_not_an_integer": 1, "empty_answer": 1, "missing_field": 1}
    row = loaded.dataset["train"][0]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]  # prompt, then the reference
    assert row["messages"][-1]["content"].startswith("Work ")


def test_other_schemas_and_the_prompt_settings(tmp_path: Path) -> None:
    solution = [{"problem": f"P{i}", "solution": rf"so \boxed{{\frac{{{i}}}{{2}}}}"} for i in range(1, 5)] + [
        {"problem": "none", "solution": "no box here"}
    ]
    loaded = _load(tmp_path, solution, reward="boxed", fewshot=True, format_instruction=True)
    assert loaded.schema_found == "problem/solution" and loaded.skipped_rows == {"no_boxed_answer": 1}
    messages = loaded.dataset["train"][0]["messages"]
    assert messages[0]["content"].startswith("How many r's are in strawberry?")  # the cookbook's example
    assert messages[2]["content"].endswith(r" Write your answer in \boxed{} format.")
    assert loaded.dataset["train"][0]["answer"].startswith(r"\frac{")

    plain = [{"prompt": f"Say {i}", "answer": i} for i in range(4)]
    loaded = _load(tmp_path, plain, fewshot=True, system_prompt="Reply with only the number.")
    assert loaded.schema_found == "prompt/answer"
    messages = loaded.dataset["train"][0]["messages"]
    assert [m["content"] for m in messages[:3]] == ["Reply with only the number.", "What is 4 + 5?", "9"]


def test_no_answer_column_is_one_clear_error(tmp_path: Path) -> None:
    accepted = r"No recognised row schema.*accepted schemas: messages \(messages\); question/answer"
    with pytest.raises(SchemaError, match=accepted):
        _load(tmp_path, [{"question": "what?", "response": "x"}] * 4)
    with pytest.raises(SchemaError, match=r"all 4 skipped \(answer_not_an_integer: 4\)"):
        _load(tmp_path, [{"question": "what?", "answer": "a fish"}] * 4)


def test_math_verify_skips_answers_it_cannot_parse(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer": f"#### {i}/2"} for i in range(1, 5)]
    rows += [{"question": "odd", "answer": "#### ???"}]
    path = tmp_path / "p.jsonl"
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = RewardRunner("math_verify")
    try:
        fmt = problem_format(
            ProblemPrompt("math_verify", fewshot=False, format_instruction=False, system_prompt=None), runner
        )
        loaded = load_dataset_source(str(path), test_size=0.25, row_format=fmt)
    finally:
        runner.close()
    assert loaded.skipped_rows == {"answer_unparseable": 1}


def test_the_addition_environments_are_the_cookbooks() -> None:
    first = builtin_dataset("kitchen/addition", seed=0, train_size=300)
    assert (
        builtin_dataset("addition", seed=0, train_size=300)["train"]["messages"] == first["train"]["messages"]
    )
    assert len(first["test"]) == 200
    for name, high in (("kitchen/addition", 100), ("kitchen/addition-10", 10)):
        data = builtin_dataset(name, seed=0, train_size=300)
        seen = {split: {r["messages"][0]["content"] for r in data[split]} for split in ("train", "test")}
        assert not seen["train"] & seen["test"]  # held out
        assert len(seen["test"]) == len(data["test"])  # distinct
        for split in ("train", "test"):
            for row in data[split]:
                question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
                x, y = (int(v) for v in question.removeprefix("What is ").removesuffix("?").split(" + "))
                assert 0 <= x <= high and 0 <= y <= high and answer == row["answer"] == str(x + y)
    other = builtin_dataset("kitchen/addition", seed=1, train_size=300)
    assert other["train"]["messages"] != first["train"]["messages"]
