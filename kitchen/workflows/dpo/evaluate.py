"""DPO evaluation: held-out pairs scored by the starting model (which is the reference) and the trained one.

Preference metrics, from the same sequence log-probabilities the loss uses (``compute_logprobs`` of the
trained weights on the held-out pairs' datums; the reference's are stored):

- ``preference_accuracy``: share of pairs whose implicit reward ``β (π - ref)`` ranks chosen above
  rejected, a tie counting one half. The starting model *is* the reference, so its rewards are all 0 and
  it scores 0.5, chance: the gate asks the trained model to beat that by ``gate_margin``.
- ``logprob_accuracy``: share of pairs where the model's own log-probability ranks chosen above rejected
  (no reference: how each model ranks the pair by itself).
- ``margin`` (mean ``β d``), ``chosen_logratio`` and ``rejected_logratio`` (mean ``π - ref`` of each
  reply, in nats; 0 for the starting model), ``nll`` (per-token NLL of the chosen replies).

Where the held-out rows carry a checkable answer (the built-in arithmetic pairs), both models also get the
supervised report's generative metrics (greedy exact match, token precision/recall/F1 through lm-eval, on
the chosen conversation's prompt), plus any ``--eval-tasks``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tinker import types

from kitchen.data import load_saved_dataset
from kitchen.eval.harness import (
    HELDOUT_TASK,
    NLL_TASK,
    EvalPlan,
    ModelResults,
    check_task_data,
    evaluate_model,
    plan_evaluation,
    write_task_data,
)
from kitchen.eval.lm import KitchenLM
from kitchen.workflows.context import EvalContext, Evaluation
from kitchen.workflows.dpo.builtin import NAME as BUILTIN_DATASET
from kitchen.workflows.dpo.builtin import TERSE_NAME
from kitchen.workflows.dpo.comparisons import read_pair_datums, read_pair_rows, sides
from kitchen.workflows.dpo.loss import TIE_TOLERANCE, normalizes_length, sequence_logprob
from kitchen.workflows.dpo.manifests import ComparisonsManifest, ReferenceLogprobsManifest
from kitchen.workflows.dpo.reference import read_reference_logprobs, target_logprobs
from kitchen.workflows.supervised.evaluate import context_window

#: Built-in preference dataset -> the Kitchen generation task that scores its answers.
GENERATION_TASKS = {BUILTIN_DATASET: "kitchen_arithmetic", TERSE_NAME: "kitchen_arithmetic"}
GENERATIVE_METRICS = ("exact_match", "f1", "precision", "recall")
DIRECTIONS = {
    "preference_accuracy": True,
    "logprob_accuracy": True,
    "margin": True,
    "chosen_logratio": True,
    "rejected_logratio": False,
    "nll": False,
}


def sequence_values(
    datums: Sequence[types.Datum], logprobs: Sequence[np.ndarray], *, normalize: bool
) -> np.ndarray:
    return np.array(
        [
            float(
                sequence_logprob(
                    torch.from_numpy(lp), d.loss_fn_inputs["weights"].to_torch(), normalize=normalize
                )
            )
            for d, lp in zip(datums, logprobs, strict=True)
        ]
    )


def _ranked(first: np.ndarray, second: np.ndarray, tolerance: np.ndarray) -> float:
    """Share of pairs with ``first > second``, a tie (a difference within float32 rounding of the
    log-probabilities involved, ``tolerance``) counting one half."""
    difference = first - second
    return float(np.mean((difference > tolerance) + 0.5 * (np.abs(difference) <= tolerance)))


def preference_metrics(
    policy: np.ndarray, reference: np.ndarray, *, beta: float, nll: float
) -> dict[str, float]:
    """``policy`` and ``reference``: per-datum sequence log-probabilities, interleaved chosen/rejected."""
    chosen, rejected = policy[0::2] - reference[0::2], policy[1::2] - reference[1::2]
    own = TIE_TOLERANCE * (np.abs(policy[0::2]) + np.abs(policy[1::2]))
    tolerance = own + TIE_TOLERANCE * (np.abs(reference[0::2]) + np.abs(reference[1::2]))
    return {
        "preference_accuracy": _ranked(chosen, rejected, tolerance),
        "logprob_accuracy": _ranked(policy[0::2], policy[1::2], own),
        "margin": float(np.mean(beta * (chosen - rejected))),
        "chosen_logratio": float(np.mean(chosen)),
        "rejected_logratio": float(np.mean(rejected)),
        "nll": nll,
    }


def chosen_nll(datums: Sequence[types.Datum], logprobs: Sequence[np.ndarray]) -> float:
    """Per-token NLL of the chosen replies (weighted tokens of the even datums)."""
    total = weight = 0.0
    for datum, lp in zip(datums[0::2], logprobs[0::2], strict=True):
        w = datum.loss_fn_inputs["weights"].to_numpy()
        total -= float(np.dot(w, lp))
        weight += float(w.sum())
    return total / weight if weight else float("nan")


def _hyperparameter(ctx: EvalContext, name: str) -> Any:
    value = ctx.weights.hyperparameters.get(name)
    if value is None:
        raise ValueError(f"the trained weights record no {name!r}; were they trained by the dpo workflow?")
    return value


def evaluate_dpo(ctx: EvalContext) -> Evaluation:
    comparisons, reference = ctx.inputs["comparisons"], ctx.inputs["reference_logprobs"]
    assert isinstance(comparisons, ComparisonsManifest) and isinstance(reference, ReferenceLogprobsManifest)
    if reference.comparisons_hash != comparisons.content_hash:
        raise ValueError(
            "reference_logprobs were computed on other comparisons; materialise dpo/reference_logprobs again"
        )
    config = ctx.config
    plan = generation_plan(ctx)
    if plan.lm_eval_tasks:
        check_task_data(plan.lm_eval_tasks)  # fail naming the task before any model is scored
    beta, loss_type = float(_hyperparameter(ctx, "dpo_beta")), str(_hyperparameter(ctx, "dpo_loss"))
    normalize = normalizes_length(loss_type)
    datums = read_pair_datums(comparisons.test_path)
    n = min(config.eval_examples, len(datums) // 2)
    if n == 0:
        raise ValueError(f"dataset {ctx.dataset.name!r} has no held-out pairs; nothing to evaluate on")
    datums = datums[: 2 * n]
    ref_logprobs = read_reference_logprobs(reference.test_path)[: 2 * n]
    ref = sequence_values(datums, ref_logprobs, normalize=normalize)
    trained_logprobs = target_logprobs(ctx.trained_client(), datums)
    policy = sequence_values(datums, trained_logprobs, normalize=normalize)
    # The starting model is the reference, whose log-probabilities are the stored ones.
    base = preference_metrics(ref, ref, beta=beta, nll=chosen_nll(datums, ref_logprobs))
    trained = preference_metrics(policy, ref, beta=beta, nll=chosen_nll(datums, trained_logprobs))
    ctx.log(f"preference metrics on {n} held-out pairs: base {base}, trained {trained}")

    rows = load_saved_dataset(ctx.dataset.path)["test"]
    pair_rows = [rows[i] for i in read_pair_rows(comparisons, "test")[:n]]
    has_answers = all(r.get("answer") for r in pair_rows)
    higher = dict(DIRECTIONS)
    seconds: dict[str, float] = {}
    generations: dict[str, list[str]] = {}
    generation_task = None
    files: dict[str, str] = {}
    if has_answers or config.eval_tasks:
        results, files = _generative(ctx, plan, pair_rows, n)
        generation_task = plan.generation_task
        for label, metrics in (("base", base), ("trained", trained)):
            result = results[label]
            keep = {k: v for k, v in result.metrics.items() if has_answers or k not in GENERATIVE_METRICS}
            metrics.update(keep)
            higher.update({k: v for k, v in result.higher_is_better.items() if k in keep})
            seconds[label] = result.seconds
            generations[label] = [g["output"] for g in result.generations]

    margins = beta * ((policy[0::2] - ref[0::2]) - (policy[1::2] - ref[1::2]))
    samples = []
    for i, row in enumerate(pair_rows):
        question = next((m["content"] for m in reversed(row["prompt"]) if m["role"] == "user"), "")
        sample = {
            "question": question,
            "chosen": row["chosen"],
            "rejected": row["rejected"],
            "trained_margin": f"{margins[i]:.3f}",
        }
        if has_answers and generations:
            sample |= {"reference": str(row["answer"]), **{k: v[i] for k, v in generations.items()}}
        samples.append(sample)
    order = [*DIRECTIONS, *(m for m in base if m not in DIRECTIONS)]
    return Evaluation(
        base={m: base[m] for m in order if m in base},
        trained={m: trained[m] for m in order if m in trained},
        higher_is_better=higher,
        num_examples=n,
        tasks=["heldout_pairs", *([generation_task] if generation_task else [])],
        samples=samples,
        seconds=seconds,
        files=files,
        details={
            "generation_task": generation_task,
            "dpo_beta": beta,
            "dpo_loss": loss_type,
            "reference_model": reference.reference_model,
        },
    )


def generation_plan(ctx: EvalContext) -> EvalPlan:
    """The held-out generation task (the built-in's own, else ``kitchen_heldout``) and ``--eval-tasks``."""
    dataset = ctx.dataset
    requested = plan_evaluation(None, ctx.config.eval_tasks)
    generation = (
        GENERATION_TASKS.get(dataset.name, HELDOUT_TASK) if dataset.source == "builtin" else HELDOUT_TASK
    )
    sources = {generation: "heldout"}
    sources |= {
        task: source
        for task, source in requested.kitchen_sources.items()
        if task not in (NLL_TASK, HELDOUT_TASK, generation)
    }
    return EvalPlan(
        generation_task=generation, kitchen_sources=sources, lm_eval_tasks=requested.lm_eval_tasks
    )


def _generative(
    ctx: EvalContext, plan: EvalPlan, pair_rows: list[dict[str, Any]], n: int
) -> tuple[dict[str, ModelResults], dict[str, str]]:
    """Greedy generations on the held-out prompts (and any extra tasks) for both models, via lm-eval."""
    config = ctx.config
    chat_rows = [{"messages": sides(row)[0], "answer": row.get("answer")} for row in pair_rows]
    window = context_window(ctx.base_model)
    files: dict[str, Path] = {}
    outputs: dict[str, str] = {}
    results: dict[str, ModelResults] = {}
    for label, make_client in (("base", ctx.base_client), ("trained", ctx.trained_client)):
        lm = KitchenLM(make_client(), max_length=window, label=label)
        if not files:
            files = write_task_data(plan, chat_rows, lm, ctx.out_dir / "data", limit=n)
        results[label] = evaluate_model(
            lm,
            plan,
            files,
            limit=config.eval_examples,
            max_gen_tokens=config.eval_max_tokens,
            cache_dir=ctx.out_dir / "hf-datasets",
        )
        path = ctx.out_dir / f"lm_eval_{label}.json"
        path.write_text(json.dumps(results[label].lm_eval, indent=1))
        outputs[f"lm_eval_{label}"] = str(path)
        ctx.log(f"{label}: {results[label].metrics} ({results[label].seconds:.1f}s)")
    return results, outputs
