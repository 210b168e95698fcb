"""Kitchen's lm-eval tasks and the quality gate: task planning and names, metric wiring checked against
hand-computed numbers, the report's numbers against direct client calls on the tiny model, and a model
trained with learning rate 0 failing the gate."""

from __future__ import annotations

import json
import math
import re
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from tinker import types

from kitchen.contract import SamplingClient
from kitchen.data import builtin_dataset, datum_from_tokens, prompt_and_answer, render_weighted_tokens
from kitchen.eval import harness
from kitchen.eval.gate import GateSettings, gate_verdict
from kitchen.eval.heldout import GenerationExample, generate, normalize_answer, token_prf
from kitchen.eval.lm import KitchenLM


def arithmetic_rows(n: int) -> list[dict[str, Any]]:
    return list(builtin_dataset("kitchen/arithmetic", train_size=1, test_size=n)["test"])


def evaluate(client: SamplingClient, tmp_path: Path, rows: list[dict[str, Any]]) -> harness.ModelResults:
    plan = harness.plan_evaluation("kitchen/arithmetic")
    lm = KitchenLM(client, max_length=256, skip_greedy_for=[harness.NLL_TASK])
    files = harness.write_task_data(plan, rows, lm, tmp_path / "data", limit=len(rows))
    return harness.evaluate_model(
        lm, plan, files, limit=len(rows), max_gen_tokens=8, cache_dir=tmp_path / "cache"
    )


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from resources.local_engine import LocalServiceClient

    return LocalServiceClient(root=tmp_path_factory.mktemp("engine"))


# -- planning and task names -----------------------------------------------------------------------


def test_a_builtin_dataset_is_scored_by_its_own_task() -> None:
    plan = harness.plan_evaluation("kitchen/arithmetic")
    assert plan.generation_task == "kitchen_arithmetic"
    assert plan.kitchen_sources == {"kitchen_heldout_nll": "heldout", "kitchen_arithmetic": "heldout"}
    other = harness.plan_evaluation(None, ["kitchen_arithmetic"])
    assert other.generation_task == "kitchen_heldout"
    assert other.kitchen_sources["kitchen_arithmetic"] == "kitchen/arithmetic"
    assert other.lm_eval_tasks == ()


def test_unknown_task_names_fail_with_the_closest_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    catalogue = SimpleNamespace(all_tasks=["gsm8k", "gsm8k_cot", "hellaswag", "kitchen_arithmetic"])
    monkeypatch.setattr(harness, "task_manager", lambda with_catalogue: catalogue)
    assert harness.plan_evaluation(None, ["gsm8k", " hellaswag", "gsm8k"]).lm_eval_tasks == (
        "gsm8k",
        "hellaswag",
    )
    with pytest.raises(harness.EvalTaskError, match=r"'gsm8kk' \(closest matches: gsm8k, gsm8k_cot\)"):
        harness.plan_evaluation(None, ["gsm8kk"])
    from pydantic import ValidationError

    from kitchen.workflows.supervised import SupervisedConfig as SupervisedRunConfig

    with pytest.raises(ValidationError, match=r"hellaswg.*closest matches: hellaswag"):
        SupervisedRunConfig(eval_tasks="kitchen_arithmetic,hellaswg")
    assert SupervisedRunConfig(eval_tasks="gsm8k, kitchen_arithmetic").eval_tasks == [
        "gsm8k",
        "kitchen_arithmetic",
    ]


def test_a_task_whose_data_cannot_be_reached_fails_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lm_eval.tasks import TaskManager

    (tmp_path / "remote.yaml").write_text(
        "task: kitchen_test_remote\ndataset_path: kitchen-tests/no-such-dataset\n"
        "output_type: generate_until\n"
        "test_split: test\ndoc_to_text: q\ndoc_to_target: a\nmetric_list:\n  - metric: exact_match\n"
    )
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    monkeypatch.setattr(harness, "task_manager", lambda with_catalogue: manager)
    with pytest.raises(harness.EvalTaskError, match="'kitchen_test_remote': its data could not be reached"):
        harness.check_task_data(["kitchen_test_remote"])


# -- metric wiring against hand-computed numbers ---------------------------------------------------


class ScriptedClient:
    """Replies to each arithmetic question from a script; every scored token has log-probability -0.5."""

    def __init__(self, tokenizer: Any, replies: dict[str, str]) -> None:
        self.tokenizer, self.replies = tokenizer, replies

    def sample(
        self, prompt: types.ModelInput, num_samples: int, sampling_params: types.SamplingParams, **_: Any
    ) -> Future[types.SampleResponse]:
        text = self.tokenizer.decode(prompt.to_ints(), skip_special_tokens=False)
        (question,) = re.findall(r"What is [^?]+\?", text)[-1:]
        tokens = [*self.tokenizer(self.replies[question], add_special_tokens=False)["input_ids"]]
        sequence = types.SampledSequence(
            stop_reason="stop", sequence_id="s", _tokens_list=[*tokens, self.tokenizer.eos_token_id]
        )
        future: Future[types.SampleResponse] = Future()
        future.set_result(types.SampleResponse(sequences=[sequence]))
        return future

    def compute_logprobs(self, prompt: types.ModelInput) -> Future[list[float | None]]:
        future: Future[list[float | None]] = Future()
        future.set_result([None] + [-0.5] * (len(prompt.to_ints()) - 1))
        return future

    def get_tokenizer(self) -> Any:
        return self.tokenizer


def test_report_metrics_match_hand_computed_values(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    rows = arithmetic_rows(6)
    questions = [row["messages"][1]["content"] for row in rows]
    answers = [row["answer"] for row in rows]
    replies = [answers[0], answers[1] + ".", f"The answer is {answers[2]}", "12 and 13", answers[4], "no"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    client = ScriptedClient(tokenizer, dict(zip(questions, replies, strict=True)))

    result = evaluate(client, tmp_path, rows)

    scores = [token_prf(reply, answer) for reply, answer in zip(replies, answers, strict=True)]
    expected = {
        "nll": 0.5,  # every scored token had log-probability -0.5
        "perplexity": math.exp(0.5),
        "exact_match": sum(
            normalize_answer(r) == normalize_answer(a) for r, a in zip(replies, answers, strict=True)
        )
        / 6,
        "precision": sum(p for p, _, _ in scores) / 6,
        "recall": sum(r for _, r, _ in scores) / 6,
        "f1": sum(f for _, _, f in scores) / 6,
    }
    assert expected["exact_match"] == pytest.approx(3 / 6)  # exact, trailing "." and case-folded ones
    assert result.metrics == pytest.approx(expected)
    assert result.higher_is_better == {
        "nll": False,
        "perplexity": False,
        "exact_match": True,
        "precision": True,
        "recall": True,
        "f1": True,
    }
    assert [g["output"] for g in result.generations] == replies
    assert [g["reference"] for g in result.generations] == answers


@pytest.mark.parametrize(
    ("output", "reference", "same"),
    [
        ("-25", "25", False),
        ("2.5", "25", False),
        ("2 5", "25", False),
        ("25.0", "25", False),
        ("\u221225", "-25", True),  # a typographic minus is a minus
        ("The answer is 25.", "answer is 25", True),
        ("25.", "25", True),
        ("+25", "25", True),
        ("1,000", "1000", True),
        ("x-25", "x 25", True),  # a hyphen inside a word is not a sign
        ("A Cat!", "cat", True),
    ],
)
def test_exact_match_keeps_numbers_whole(output: str, reference: str, same: bool) -> None:
    from kitchen.eval.metrics import exact_match

    assert exact_match([reference], [output]) == float(same)


def test_token_f1_keeps_the_sign() -> None:
    from kitchen.eval.metrics import token_f1, token_precision

    assert token_f1(["25"], ["-25"]) == 0.0
    # "-3 and 4" vs "3 and 4": "and" and "4" are shared, "-3" is not: P = R = 2/3.
    assert token_precision(["3 and 4"], ["-3 and 4"]) == pytest.approx(2 / 3)
    assert token_f1(["3 and 4"], ["-3 and 4"]) == pytest.approx(2 / 3)
    assert token_f1(["2.5"], ["2 5"]) == 0.0


def test_lm_eval_exact_match_does_not_equate_sign_decimal_or_spacing(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    rows = [r for r in arithmetic_rows(40) if len(r["answer"].lstrip("-")) >= 2][:5]
    answers = [row["answer"] for row in rows]
    replies = [
        answers[0],  # right
        f"-{answers[1]}" if not answers[1].startswith("-") else answers[1][1:],  # wrong sign
        f"{answers[2][0]}.{answers[2][1:]}",  # a decimal point inside
        f"{answers[3][0]} {answers[3][1:]}",  # a space inside
        f"{answers[4]}.",  # right, with a full stop
    ]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    questions = [row["messages"][1]["content"] for row in rows]
    result = evaluate(ScriptedClient(tokenizer, dict(zip(questions, replies, strict=True))), tmp_path, rows)
    assert result.metrics["exact_match"] == pytest.approx(2 / 5)
    assert result.higher_is_better["exact_match"] is True


# -- the report against direct client calls on the tiny model --------------------------------------


def test_report_numbers_match_direct_recomputation(
    service: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    client = service.create_sampling_client(base_model=str(tiny_model_dir)).result()
    rows = arithmetic_rows(6)
    result = evaluate(client, tmp_path, rows)
    tokenizer = client.get_tokenizer()

    # NLL: the scored tokens are the trained tokens of the assistant turn plus the header's newline.
    total = count = 0.0
    for row in rows:
        tokens, mask = render_weighted_tokens(row["messages"], tokenizer, "last_assistant")
        first, last = mask.index(1.0), len(mask) - 1 - mask[::-1].index(1.0)
        scored = tokens[: last + 1]
        logprobs = client.compute_logprobs(types.ModelInput.from_ints(scored)).result()
        total -= math.fsum(logprobs[first - 1 :])  # from the newline token through the end of turn
        count += len(scored) - (first - 1)
    assert result.metrics["nll"] == pytest.approx(total / count, rel=1e-5)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)

    # Generations: the same greedy outputs as sampling each training-rendered prompt directly.
    examples = [
        GenerationExample(
            prompt_tokens=(p := prompt_and_answer(row, tokenizer)).prompt_tokens, reference=p.answer
        )
        for row in rows
    ]
    direct = generate(client, examples, max_tokens=8, stop=["\n", tokenizer.eos_token])
    assert [g["output"].strip() for g in result.generations] == direct
    matches = [
        normalize_answer(d) == normalize_answer(e.reference) for d, e in zip(direct, examples, strict=True)
    ]
    assert result.metrics["exact_match"] == pytest.approx(sum(matches) / len(rows))


def test_a_model_trained_with_learning_rate_0_fails_the_gate(
    service: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    rows = arithmetic_rows(4)
    trainer = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=0).result()
    tokenizer = trainer.get_tokenizer()
    datums = [
        datum_from_tokens(*render_weighted_tokens(r["messages"], tokenizer, "all_assistant")) for r in rows
    ]
    trainer.forward_backward(datums, "cross_entropy").result()
    trainer.optim_step(types.AdamParams(learning_rate=0.0)).result()
    sampler = trainer.save_weights_for_sampler("lr0").result().path

    base = evaluate(
        service.create_sampling_client(base_model=str(tiny_model_dir)).result(), tmp_path / "base", rows
    )
    trained = evaluate(
        service.create_sampling_client(model_path=sampler).result(), tmp_path / "trained", rows
    )

    assert trained.metrics == base.metrics
    for metric in ("nll", "exact_match"):
        verdict = gate_verdict(
            base.metrics, trained.metrics, base.higher_is_better, GateSettings(metric, 0.0)
        )
        assert not verdict.passed and verdict.improvement == 0.0
        assert "needed at least 0 and more than 0" in verdict.reason


# -- the gate rule -----------------------------------------------------------------------------------

DIRECTIONS = {"exact_match": True, "nll": False, "f1": True}


@pytest.mark.parametrize(
    ("base", "trained", "settings", "passed", "why"),
    [
        (
            {"exact_match": 0.30, "nll": 1.0},
            {"exact_match": 0.50, "nll": 0.8},
            GateSettings("exact_match", 0.1),
            True,
            ">= margin",
        ),
        (
            {"exact_match": 0.28, "nll": 1.0},
            {"exact_match": 0.30, "nll": 0.9},
            GateSettings("exact_match", 0.02),
            True,
            ">= margin",
        ),  # 0.30 - 0.28 rounds below 0.02; the boundary still passes
        (
            {"exact_match": 0.30, "nll": 1.0},
            {"exact_match": 0.35, "nll": 0.8},
            GateSettings("exact_match", 0.1),
            False,
            "needed at least 0.1",
        ),
        (
            {"exact_match": 0.30, "nll": 1.0},
            {"exact_match": 0.50, "nll": 1.2},
            GateSettings("exact_match", 0.1),
            False,
            "held-out NLL regressed",
        ),
        (
            {"exact_match": 0.30, "nll": 1.0},
            {"exact_match": 0.50, "nll": 1.2},
            GateSettings("exact_match", 0.1, max_nll_increase=0.25),
            True,
            ">= margin",
        ),
        (
            {"exact_match": 0.3, "nll": 1.0},
            {"exact_match": 0.3, "nll": 0.5},
            GateSettings("nll", 0.4),
            True,
            "lower is better",
        ),
        (
            {"exact_match": 0.3, "nll": 1.0},
            {"exact_match": 0.3, "nll": 1.1},
            GateSettings("nll", 0.0),
            False,
            "improvement -0.1",
        ),
        (
            {"exact_match": 0.3, "nll": 1.0},
            {"exact_match": 0.9, "nll": 0.5},
            GateSettings("gsm8k/exact_match", 0),
            False,
            "not in the report",
        ),
        # A base NLL that is not finite: the NLL rule gives a stated verdict, never a vacuous comparison.
        (
            {"exact_match": 0.3, "nll": math.inf},
            {"exact_match": 0.5, "nll": 1.0},
            GateSettings("exact_match", 0.1),
            True,
            "vs base inf (the base gives a reference token zero probability",
        ),
        (
            {"exact_match": 0.3, "nll": math.nan},
            {"exact_match": 0.5, "nll": 1.0},
            GateSettings("exact_match", 0.1),
            False,
            "base model's held-out NLL is nan, so whether NLL regressed cannot be judged",
        ),
        (
            {"exact_match": 0.3, "nll": -math.inf},
            {"exact_match": 0.5, "nll": 1.0},
            GateSettings("exact_match", 0.1),
            False,
            "base model's held-out NLL is -inf",
        ),
        (
            {"exact_match": 0.3, "nll": math.inf},
            {"exact_match": 0.5, "nll": math.inf},
            GateSettings("exact_match", 0.1),
            False,
            "held-out NLL is missing or not finite",
        ),
    ],
)
def test_gate_rule(
    base: dict[str, float], trained: dict[str, float], settings: GateSettings, passed: bool, why: str
) -> None:
    verdict = gate_verdict(base, trained, DIRECTIONS, settings)
    assert verdict.passed is passed
    assert why in verdict.reason


def test_saved_report_gate_round_trips(tmp_path: Path) -> None:
    from kitchen.eval.report import gate_summary

    verdict = gate_verdict(
        {"f1": 0.1, "nll": 2.0}, {"f1": 0.4, "nll": 1.0}, DIRECTIONS, GateSettings("f1", 0.2)
    )
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"gate": verdict.as_dict()}))
    assert gate_summary(path).startswith("quality gate: passed - trained f1 0.4 vs base 0.1")
