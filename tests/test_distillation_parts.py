"""Distillation's pieces on their own: prompt rows, per-token advantages, the tokenizer check, and one
on-policy step checked against the two models' logprobs computed directly with transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kitchen.data.schemas import RowSkipped
from kitchen.manifests import BaseModelManifest, DatasetManifest
from kitchen.models.tiny import build_tiny_model
from kitchen.registry.names import derive_model_name
from kitchen.training.plan import Policy
from kitchen.workflows.config import DEFAULT_DATASET
from kitchen.workflows.distillation import DEFAULT_TEACHER, DEFAULT_TEACHER_NAME, OnPolicyDistillationPlan
from kitchen.workflows.distillation.plan import DistillBatch, reverse_kl_advantages
from kitchen.workflows.distillation.prompts import (
    PROMPTS,
    detect_prompt_schema,
    normalize_prompt_row,
    render_prompt,
)
from kitchen.workflows.distillation.teacher import tokenizer_differences
from resources.local_engine import LocalServiceClient

USER = {"role": "user", "content": "What is 2 + 2?"}


def test_the_default_teacher_is_what_make_run_registers() -> None:
    """``make run`` = ``kitchen run supervised`` with defaults: the packaged SmolLM2 on kitchen/arithmetic."""
    base = BaseModelManifest(
        name="SmolLM2-135M-Instruct",
        source="packaged-gguf",
        backend_model="x",
        tokenizer_path="x",
        content_hash="h",
    )
    data = DatasetManifest(
        name=DEFAULT_DATASET,
        source="builtin",
        path="x",
        content_hash="h",
        schema_found="messages",
        train_rows=1,
        test_rows=1,
    )
    assert derive_model_name("supervised", base, data) == DEFAULT_TEACHER_NAME
    assert f"models:/{DEFAULT_TEACHER_NAME}@champion" == DEFAULT_TEACHER


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "What is 2 + 2?"}, ([USER], None, None)),
        ({"prompt": "What is 2 + 2?", "answer": 4}, ([USER], "4", None)),
        ({"prompt": "What is 2 + 2?", "completion": "4"}, ([USER], None, "4")),
        ({"question": "What is 2 + 2?", "answer": "so #### 4"}, ([USER], "4", "so #### 4")),
        ({"question": "What is 2 + 2?"}, ([USER], None, None)),
        ({"instruction": "What is 2 + 2?"}, ([USER], None, None)),
        ({"input": "What is 2 + 2?", "output": "4"}, ([USER], None, "4")),
        ({"messages": [USER]}, ([USER], None, None)),
        (
            {"messages": [{"role": "system", "content": "Be brief."}, USER]},
            ([{"role": "system", "content": "Be brief."}, USER], None, None),
        ),
        ({"messages": [USER, {"role": "assistant", "content": "4"}]}, ([USER], None, "4")),
        (
            {
                "messages": [
                    USER,
                    {"role": "assistant", "content": "4"},
                    {"role": "user", "content": "And 3 + 3?"},
                ]
            },
            (
                [USER, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"}],
                None,
                None,
            ),
        ),
        ({"conversations": [{"from": "human", "value": "What is 2 + 2?"}]}, ([USER], None, None)),
    ],
)
def test_any_schema_becomes_a_prompt_and_a_reply_is_set_aside(
    row: dict[str, object], expected: tuple[list[dict[str, str]], str | None, str | None]
) -> None:
    schema = detect_prompt_schema(row)
    messages, answer, reply = expected
    assert normalize_prompt_row(row, schema) == {"messages": messages, "answer": answer, "reply": reply}


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (
            {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
            "no_user_turn",
        ),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "no_user_turn"),
        ({"messages": [{"role": "user", "content": "  "}]}, "empty_content"),
        ({"prompt": None}, "missing_field"),
        ({"messages": [USER, USER]}, "bad_role_order"),
    ],
)
def test_rows_without_a_usable_prompt_are_skipped_by_reason(row: dict[str, object], reason: str) -> None:
    with pytest.raises(RowSkipped) as skipped:
        normalize_prompt_row(row, detect_prompt_schema(row))
    assert skipped.value.reason == reason


def test_prompt_format_counts_skips() -> None:
    rows = [{"messages": [USER]}, {"messages": [{"role": "assistant", "content": "a"}]}]
    result = PROMPTS.normalize(rows, "messages")
    assert len(result.rows) == 1 and dict(result.skipped) == {"no_user_turn": 1}


def test_advantages_are_the_negative_reverse_kl_optionally_discounted() -> None:
    student, teacher = [-1.0, -0.5, -2.0], [-1.5, -0.5, -0.25]
    assert reverse_kl_advantages(student, teacher, kl_coef=1.0) == [-0.5, 0.0, 1.75]
    assert reverse_kl_advantages(student, teacher, kl_coef=2.0) == [-1.0, 0.0, 3.5]
    # a_t + 0.5 a_{t+1} + 0.25 a_{t+2}, written out
    assert reverse_kl_advantages(student, teacher, kl_coef=1.0, discount=0.5) == pytest.approx(
        [-0.5 + 0.5 * 0.0 + 0.25 * 1.75, 0.0 + 0.5 * 1.75, 1.75]
    )
    with pytest.raises(ValueError, match="2 student logprobs for 3"):
        reverse_kl_advantages([0.0, 0.0], teacher, kl_coef=1.0)


def test_tokenizer_differences_name_what_differs(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    student = AutoTokenizer.from_pretrained(tiny_model_dir)
    same = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "same", seed=5))
    assert tokenizer_differences(student, same, [[USER]]) == []
    templated = AutoTokenizer.from_pretrained(tiny_model_dir)
    templated.chat_template = student.chat_template.replace("<|im_start|>assistant", "<|im_start|>bot")
    differences = tokenizer_differences(student, templated, [[USER]])
    assert differences[0] == "chat template" and "rendered prompt tokens" in differences[1]
    other = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "other", vocab_size=300))
    assert tokenizer_differences(student, other)[0] == "vocabulary (400 vs 300 token ids)"


def _direct_logprobs(model_dir: Path, tokens: list[int], start: int) -> list[float]:
    """log p(tokens[i] | tokens[:i]) for i >= start, from a plain transformers forward pass."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]])).logits[0].log_softmax(-1)
    return [float(logits[i - 1, tokens[i]]) for i in range(start, len(tokens))]


def test_an_on_policy_step_scores_the_students_tokens_with_the_teacher(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    teacher_dir = build_tiny_model(tmp_path / "teacher", seed=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [
        render_prompt([USER], tokenizer),
        render_prompt([{"role": "user", "content": "3 + 4?"}], tokenizer),
    ]
    service = LocalServiceClient(root=tmp_path / "engine")
    client = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=0).result()
    teacher = service.create_sampling_client(base_model=str(teacher_dir)).result()
    plan = OnPolicyDistillationPlan.build(
        prompts,
        teacher,
        batch_size=2,
        epochs=1,
        max_steps=None,
        group_size=2,
        max_tokens=5,
        temperature=1.0,
        kl_coef=1.0,
        kl_discount=0.0,
        seed=7,
        prompts_hash="p",
        teacher_hash="t",
    )
    assert plan.total_steps == 1 and plan.max_staleness == 0 and plan.headline == "teacher_kl"
    policy = Policy(client.save_weights_and_get_sampling_client().result(), version=0)
    batch = plan.prepare(0, policy)
    extra = batch.extra
    assert isinstance(extra, DistillBatch) and len(extra.rollouts) == 4 and batch.policy_version == 0
    kl_values = []
    for rollout, datum in zip(extra.rollouts, batch.datums, strict=True):
        tokens = rollout.prompt + rollout.tokens
        start = len(rollout.prompt)
        # the fresh LoRA adapter is zero: the student is the base model
        student = _direct_logprobs(tiny_model_dir, tokens, start)
        teacher_lp = _direct_logprobs(teacher_dir, tokens, start)
        assert rollout.logprobs == pytest.approx(student, abs=1e-4)
        advantages = datum.loss_fn_inputs["advantages"].tolist()
        assert advantages[: start - 1] == [0.0] * (start - 1)
        assert advantages[start - 1 :] == pytest.approx(
            [t - s for s, t in zip(student, teacher_lp, strict=True)], abs=1e-4
        )
        kl_values += [s - t for s, t in zip(student, teacher_lp, strict=True)]
    output = plan.submit(client, batch).result()
    metrics = plan.metrics(batch, output)
    assert metrics["teacher_kl"] == pytest.approx(sum(kl_values) / len(kl_values), abs=1e-4)
    assert metrics["loss"] == pytest.approx(metrics["teacher_kl"], abs=1e-4)
    assert metrics["env/all/total_ac_tokens"] == len(kl_values) == metrics["trained_tokens"]
    assert abs(metrics["optim/kl_sample_train_v1"]) < 1e-4
    # a resumed run samples the same step again: prepare is a pure function of (step, seed, policy)
    again = plan.prepare(0, policy).extra
    assert isinstance(again, DistillBatch)
    assert [r.tokens for r in again.rollouts] == [r.tokens for r in extra.rollouts]
