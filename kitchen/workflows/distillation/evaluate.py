"""Distillation's evaluation: three columns on held-out prompts, the student before and after training and
the teacher (the report's reference column).

- The held-out rows are the test split's prompts answered by the teacher greedily. Each model is then
  scored by the supervised report's lm-eval tasks on those rows: NLL per token of the *teacher's reply*
  (how well the student imitates it), and greedy exact match and token P/R/F1 against the row's own
  answer when the source has one (``kitchen/arithmetic``: the true sum), else against the teacher's reply.
- ``teacher_kl``: the mean per-token reverse KL to the teacher, ``log p_student - log q_teacher`` over
  completions the student samples (temperature 1, one per prompt, seeded) and the teacher scores, as in
  training. 0 for the teacher by definition; not computed when teacher and student tokenize differently
  (off-policy across tokenizers), since the two then assign probabilities to different token sequences.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tinker import types

from kitchen.contract import SamplingClient
from kitchen.data import load_saved_dataset
from kitchen.eval.compare import context_window, score_models
from kitchen.eval.harness import check_task_data, kitchen_task_config, plan_evaluation
from kitchen.eval.report import metric_order
from kitchen.manifests import TeacherManifest
from kitchen.training.rollouts import sample_groups
from kitchen.workflows.context import EvalContext, Evaluation, starting_sampling_client
from kitchen.workflows.distillation.plan import teacher_completion_logprobs
from kitchen.workflows.distillation.prompts import render_prompt

KL_METRIC = "teacher_kl"
KL_SEED = 0


def teacher_replies(
    teacher: SamplingClient,
    prompts: Sequence[Mapping[str, Any]],
    *,
    max_tokens: int,
    until: Sequence[str] = (),
) -> list[str]:
    """The teacher's greedy reply to each prompt row (its own chat template), as text: up to its end of
    turn, or cut at the first of ``until`` (the generation task's stop strings, as lm-eval cuts)."""
    tokenizer = teacher.get_tokenizer()
    params = types.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, stop=list(until) if until else None, seed=0
    )
    futures = [
        teacher.sample(types.ModelInput.from_ints(render_prompt(row["messages"], tokenizer)), 1, params)
        for row in prompts
    ]
    replies = []
    for future in futures:
        text = tokenizer.decode(future.result().sequences[0].tokens, skip_special_tokens=True)
        for stop in until:
            text = text.split(stop, 1)[0]
        replies.append(text.strip())
    return replies


def generation_stops(task: str) -> list[str]:
    """The stop strings of one of Kitchen's generation tasks (``kitchen_arithmetic``: a newline)."""
    config = kitchen_task_config(task, Path("unused.jsonl"), cache_dir=Path("unused"), max_gen_tokens=1)
    return [str(s) for s in config.get("generation_kwargs", {}).get("until", [])]


def heldout_rows(prompts: Sequence[Mapping[str, Any]], replies: Sequence[str]) -> list[dict[str, Any]]:
    """Chat rows the supervised tasks score: the prompt, the teacher's reply as the assistant turn, and the
    row's own answer as the reference when it has one (else the teacher's reply)."""
    return [
        {
            "messages": [*row["messages"], {"role": "assistant", "content": reply}],
            "answer": row.get("answer") or reply,
        }
        for row, reply in zip(prompts, replies, strict=True)
    ]


def reverse_kl_to_teacher(
    student: SamplingClient,
    teacher: SamplingClient,
    prompts: Sequence[Mapping[str, Any]],
    *,
    max_tokens: int,
    seed: int = KL_SEED,
) -> float:
    """Mean ``log p - log q`` per sampled token over one student completion per prompt (temperature 1)."""
    tokenizer = student.get_tokenizer()
    tokens = [render_prompt(row["messages"], tokenizer) for row in prompts]
    params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0)
    groups = sample_groups(student, tokens, group_size=1, params=params, seed=seed, step=0)
    rollouts = [r for group in groups for r in group if r.tokens]
    if not rollouts:
        return float("nan")
    scored = teacher_completion_logprobs(teacher, rollouts)
    diffs = np.fromiter(
        (s - t for r, q in zip(rollouts, scored, strict=True) for s, t in zip(r.logprobs, q, strict=True)),
        dtype=np.float64,
    )
    return float(diffs.mean())


def evaluate_distillation(ctx: EvalContext) -> Evaluation:
    config, dataset = ctx.config, ctx.dataset
    teacher = ctx.inputs["teacher_model"]
    assert isinstance(teacher, TeacherManifest)
    plan = plan_evaluation(dataset.name if dataset.source == "builtin" else None, config.eval_tasks)
    if plan.lm_eval_tasks:
        check_task_data(plan.lm_eval_tasks)
    test = load_saved_dataset(dataset.path)["test"]
    n = min(config.eval_examples, len(test))
    if n == 0:
        raise ValueError(f"dataset {dataset.name!r} has an empty test split; nothing to evaluate on")
    prompts = [dict(row) for row in test.select(range(n))]

    teacher_client = starting_sampling_client(ctx.service, teacher.model)
    replies = teacher_replies(
        teacher_client,
        prompts,
        max_tokens=config.eval_max_tokens,
        until=generation_stops(plan.generation_task),
    )
    ctx.log(f"teacher {teacher.name}: greedy replies to {n} held-out prompts")
    models: dict[str, Callable[[], SamplingClient]] = {
        "base": ctx.base_client,
        "trained": ctx.trained_client,
        "teacher": lambda: teacher_client,
    }
    student_window = context_window(ctx.base_model)
    results = score_models(
        models,
        heldout_rows(prompts, replies),
        plan,
        limit=config.eval_examples,
        max_gen_tokens=config.eval_max_tokens,
        out_dir=ctx.out_dir,
        windows={"base": student_window, "trained": student_window, "teacher": context_window(teacher.model)},
        log=ctx.log,
    )
    metrics = {label: dict(result.metrics) for label, result in results.items()}
    higher = {k: v for result in results.values() for k, v in result.higher_is_better.items()}
    kl_note = "mean log p_student - log q_teacher per token of student samples (temperature 1, seeded)"
    if teacher.same_tokenizer:
        for label, make_client in (("base", ctx.base_client), ("trained", ctx.trained_client)):
            metrics[label][KL_METRIC] = reverse_kl_to_teacher(
                make_client(), teacher_client, prompts, max_tokens=config.eval_max_tokens
            )
            ctx.log(f"{label}: {KL_METRIC} {metrics[label][KL_METRIC]:.4f}")
        metrics["teacher"][KL_METRIC] = 0.0
        higher[KL_METRIC] = False
    else:
        kl_note = "not computed: teacher and student tokenize differently"

    files = {}
    for label, result in results.items():
        path = ctx.out_dir / f"lm_eval_{label}.json"
        path.write_text(json.dumps(result.lm_eval, indent=1))
        files[f"lm_eval_{label}"] = str(path)
    generations = zip(
        results["base"].generations,
        results["trained"].generations,
        results["teacher"].generations,
        strict=True,
    )
    return Evaluation(
        base={m: metrics["base"][m] for m in metric_order(metrics["base"])},
        trained={m: metrics["trained"][m] for m in metric_order(metrics["trained"])},
        higher_is_better=higher,
        num_examples=n,
        tasks=plan.tasks,
        samples=[
            {
                "question": b["question"],
                "reference": b["reference"],
                "base": b["output"],
                "trained": t["output"],
                "teacher": q["output"],
            }
            for b, t, q in generations
        ],
        seconds={label: result.seconds for label, result in results.items()},
        reference={m: metrics["teacher"][m] for m in metric_order(metrics["teacher"])},
        reference_label="teacher",
        files=files,
        details={
            "generation_task": plan.generation_task,
            "teacher": teacher.name,
            "teacher_version": teacher.registered_version,
            "teacher_hash": teacher.content_hash,
            "mode": teacher.mode,
            "heldout_reference": "the row's answer when the source has one, else the teacher's greedy reply",
            "nll_of": "the teacher's greedy replies to the held-out prompts",
            KL_METRIC: kl_note,
        },
    )
