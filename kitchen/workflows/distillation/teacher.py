"""The teacher: does it render prompts as the student does, and its sampled replies (off-policy's data).

On-policy distillation scores the student's own tokens with the teacher (``compute_logprobs`` on the same
token ids), so both must render a prompt to the same tokens and read every token id the same way. A chat
template that differs by one special token biases every teacher logprob: tinker-cookbook's DeepMath
reproduction failed on exactly this (about +0.29 nats/token). ``tokenizer_differences`` names what
differs; the run refuses on-policy distillation across tokenizers before any sampling. Off-policy
distillation goes through text (the teacher's replies are decoded, then rendered with the student's
template), so it works across tokenizers.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tinker import types

from kitchen.contract import SamplingClient
from kitchen.data import tokenizer_fingerprint
from kitchen.training.rollouts import sample_groups
from kitchen.workflows.distillation.prompts import render_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: Rendered with both tokenizers besides the dataset's own prompts: a system turn and a user turn.
PROBE_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 12 + 30?"},
]


def tokenizer_differences(
    student: PreTrainedTokenizerBase,
    teacher: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[Mapping[str, str]]] = (),
) -> list[str]:
    """What makes the teacher tokenize prompts differently from the student (empty: nothing)."""
    differences = []
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    if student_vocab != teacher_vocab:
        differences.append(f"vocabulary ({len(student_vocab)} vs {len(teacher_vocab)} token ids)")
    if sorted(student.all_special_tokens) != sorted(teacher.all_special_tokens):
        differences.append(
            f"special tokens ({sorted(student.all_special_tokens)} vs {sorted(teacher.all_special_tokens)})"
        )
    if student.chat_template != teacher.chat_template:
        differences.append("chat template")
    for messages in [PROBE_CONVERSATION, *prompts]:
        try:
            same = render_prompt(messages, student) == render_prompt(messages, teacher)
        except Exception as err:  # a template that rejects the conversation also differs
            same, messages = False, [{"role": "error", "content": f"{type(err).__name__}: {err}"}]
        if not same:
            shown = " / ".join(f"{m['role']}: {m['content']}" for m in messages)[:120]
            differences.append(f"rendered prompt tokens (first differing prompt: {shown!r})")
            break
    if not differences and tokenizer_fingerprint(student) != tokenizer_fingerprint(teacher):
        differences.append("tokenization rules (normaliser, pre-tokenizer or added tokens)")
    return differences


def mismatch_message(teacher: str, student: str, differences: Sequence[str]) -> str:
    """One line: why on-policy distillation refuses this pair, and what to do instead."""
    return (
        f"teacher {teacher!r} and student {student!r} tokenize prompts differently "
        f"({'; '.join(differences)}). On-policy distillation scores the student's token ids with the "
        "teacher, so a different template or vocabulary biases every teacher logprob (tinker-cookbook's "
        "DeepMath reproduction: +0.29 nats/token). "
        "Use a teacher with the student's tokenizer and chat template, or distil through text with "
        "--mode off_policy."
    )


@dataclass
class TeacherSamples:
    """The teacher's replies as chat rows, and what happened on the way."""

    rows: list[dict[str, Any]]
    dropped: Counter[str] = field(default_factory=Counter)
    truncated: int = 0
    seconds: float = 0.0


def sample_teacher(
    teacher: SamplingClient,
    prompts: Sequence[Mapping[str, Any]],
    *,
    samples_per_prompt: int,
    max_tokens: int,
    temperature: float,
    seed: int,
    chunk: int = 256,
) -> TeacherSamples:
    """``samples_per_prompt`` replies of the teacher to each prompt row, rendered with the teacher's own chat
    template and decoded to text: rows ``{"messages": prompt + [assistant reply], "answer"}``.

    Seeded per prompt (``kitchen.training.rollouts.sampling_seed``), so the same inputs give the same
    samples. Empty replies are dropped and counted; replies cut at ``max_tokens`` are kept and counted."""
    started = time.perf_counter()
    tokenizer = teacher.get_tokenizer()
    params = types.SamplingParams(max_tokens=max_tokens, temperature=temperature)
    out = TeacherSamples(rows=[])
    for start in range(0, len(prompts), chunk):
        batch = prompts[start : start + chunk]
        tokens = [render_prompt(row["messages"], tokenizer) for row in batch]
        groups = sample_groups(
            teacher, tokens, group_size=samples_per_prompt, params=params, seed=seed, step=start
        )
        for row, group in zip(batch, groups, strict=True):
            for rollout in group:
                reply = tokenizer.decode(rollout.tokens, skip_special_tokens=True).strip()
                if not reply:
                    out.dropped["empty_reply"] += 1
                    continue
                out.truncated += rollout.stop_reason == "length"
                out.rows.append(
                    {
                        "messages": [*row["messages"], {"role": "assistant", "content": reply}],
                        "answer": row.get("answer"),
                    }
                )
    out.seconds = time.perf_counter() - started
    return out
