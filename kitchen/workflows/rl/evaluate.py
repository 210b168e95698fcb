"""RL evaluation: held-out problems answered greedily by the starting and the trained model, each reply
checked by the same reward function training used.

Reported per model: ``accuracy`` (mean correct), ``format`` (replies that ended with the stop token and
have the checked form), ``reward`` (``correct + format_coef * (format - 1)``, the training reward) and
``completion_tokens`` (mean reply length). The gate reads ``accuracy`` by default; there is no held-out
NLL, so no NLL rule.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from tinker import types

from kitchen.contract import SamplingClient
from kitchen.data import load_saved_dataset, prompt_and_answer
from kitchen.workflows.context import EvalContext, Evaluation
from kitchen.workflows.rl.plan import total_reward
from kitchen.workflows.rl.problems import prompt_question
from kitchen.workflows.rl.rewards import Check, RewardRunner

#: ``completion_tokens`` is reported without a direction: shorter is not better in general.
HIGHER_IS_BETTER = {"accuracy": True, "format": True, "reward": True}


def stop_tokens(tokenizer: Any) -> list[int]:
    """The ids that end a reply: EOS and the chat template's end-of-turn token (``<|im_end|>``,
    ``<|eot_id|>``, ``<|end|>``) when the vocabulary has one; tinker-cookbook's renderers stop on the
    latter, and a reply that stops there is well-formed."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        if token in vocab and vocab[token] not in ids:
            ids.append(int(vocab[token]))
    if not ids:
        raise ValueError("the tokenizer names no EOS or end-of-turn token to stop replies on")
    return ids


def greedy_replies(
    client: SamplingClient, prompts: Sequence[Sequence[int]], *, max_tokens: int, stop: list[int]
) -> list[types.SampledSequence]:
    """One greedy reply per prompt; every request is submitted before any is awaited (batching)."""
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop)
    futures = [client.sample(types.ModelInput.from_ints(list(p)), 1, params) for p in prompts]
    return [f.result().sequences[0] for f in futures]


def score_replies(
    replies: Sequence[types.SampledSequence],
    answers: Sequence[str],
    tokenizer: Any,
    runner: RewardRunner,
    format_coef: float,
) -> tuple[dict[str, float], list[str], list[Check], list[float]]:
    texts = [tokenizer.decode(r.tokens, skip_special_tokens=True) for r in replies]
    checks = runner.check(list(zip(texts, answers, strict=True)))
    formats = [float(r.stop_reason == "stop") * c.format for r, c in zip(replies, checks, strict=True)]
    rewards = [total_reward(c.correct, f, format_coef) for c, f in zip(checks, formats, strict=True)]
    metrics = {
        "accuracy": float(np.mean([c.correct for c in checks])),
        "format": float(np.mean(formats)),
        "reward": float(np.mean(rewards)),
        "completion_tokens": float(np.mean([len(r.tokens) for r in replies])),
    }
    return metrics, texts, checks, rewards


def evaluate_rl(ctx: EvalContext) -> Evaluation:
    from transformers import AutoTokenizer

    config = ctx.config
    test_rows = load_saved_dataset(ctx.dataset.path)["test"]
    n = min(config.eval_examples, len(test_rows))
    if n == 0:
        raise ValueError(f"dataset {ctx.dataset.name!r} has an empty test split; nothing to evaluate on")
    rows = [test_rows[i] for i in range(n)]
    tokenizer = AutoTokenizer.from_pretrained(ctx.base_model.tokenizer_path)
    prompts = [prompt_and_answer(row, tokenizer) for row in rows]
    stop = stop_tokens(tokenizer)
    runner = RewardRunner(config.reward, timeout=config.reward_timeout)
    results: dict[str, dict[str, float]] = {}
    texts: dict[str, list[str]] = {}
    checks: dict[str, list[Check]] = {}
    seconds: dict[str, float] = {}
    try:
        for label, make_client in (("base", ctx.base_client), ("trained", ctx.trained_client)):
            started = time.perf_counter()
            replies = greedy_replies(
                make_client(),
                [p.prompt_tokens for p in prompts],
                max_tokens=config.eval_max_tokens,
                stop=stop,
            )
            metrics, texts[label], checks[label], _ = score_replies(
                replies, [p.answer for p in prompts], tokenizer, runner, config.format_coef
            )
            results[label] = metrics
            seconds[label] = time.perf_counter() - started
            ctx.log(f"{label}: {metrics} ({seconds[label]:.1f}s)")
    finally:
        runner.close()
    samples = [
        {
            "question": prompt_question(row),
            "reference": p.answer,
            "base": texts["base"][i],
            "base_correct": f"{checks['base'][i].correct:g}",
            "trained": texts["trained"][i],
            "trained_correct": f"{checks['trained'][i].correct:g}",
        }
        for i, (row, p) in enumerate(zip(rows, prompts, strict=True))
    ]
    errors = {label: sum(1 for c in cs if c.error) for label, cs in checks.items()}
    return Evaluation(
        base=results["base"],
        trained=results["trained"],
        higher_is_better=dict(HIGHER_IS_BETTER),
        num_examples=n,
        tasks=["heldout_problems"],
        samples=samples,
        seconds=seconds,
        details={
            "reward": config.reward,
            "format_coef": config.format_coef,
            "decoding": "greedy",
            "max_tokens": config.eval_max_tokens,
            "reward_errors": errors,
            "prompt_example": prompts[0].prompt_messages,
        },
    )
