"""Supervised evaluation: lm-eval on the held-out split (NLL, greedy exact match and token P/R/F1) and any
extra lm-eval tasks, for the starting model and the trained one, through the same sampling-client code."""

from __future__ import annotations

import json
from pathlib import Path

from kitchen.data import load_saved_dataset
from kitchen.eval.harness import (
    NLL_TASK,
    ModelResults,
    check_task_data,
    evaluate_model,
    plan_evaluation,
    write_task_data,
)
from kitchen.eval.lm import KitchenLM
from kitchen.eval.report import metric_order
from kitchen.manifests import BaseModelManifest
from kitchen.workflows.context import EvalContext, Evaluation


def context_window(base_model: BaseModelManifest) -> int | None:
    """The base model's position limit when its config is local; None lets KitchenLM use the tokenizer's."""
    if not base_model.path:
        return None
    from transformers import AutoConfig

    value = getattr(AutoConfig.from_pretrained(base_model.path), "max_position_embeddings", None)
    return int(value) if value else None


def evaluate_supervised(ctx: EvalContext) -> Evaluation:
    config, dataset = ctx.config, ctx.dataset
    plan = plan_evaluation(dataset.name if dataset.source == "builtin" else None, config.eval_tasks)
    if plan.lm_eval_tasks:
        check_task_data(plan.lm_eval_tasks)  # fail naming the task before any model is scored
    test_rows = load_saved_dataset(dataset.path)["test"]
    n = min(config.eval_examples, len(test_rows))
    if n == 0:
        raise ValueError(f"dataset {dataset.name!r} has an empty test split; nothing to evaluate on")
    heldout = test_rows.select(range(n))
    window = context_window(ctx.base_model)
    files: dict[str, Path] = {}
    results: dict[str, ModelResults] = {}
    for label, make_client in (("base", ctx.base_client), ("trained", ctx.trained_client)):
        lm = KitchenLM(make_client(), max_length=window, skip_greedy_for=[NLL_TASK], label=label)
        if not files:
            files = write_task_data(plan, list(heldout), lm, ctx.out_dir / "data", limit=n)
        results[label] = evaluate_model(
            lm,
            plan,
            files,
            limit=config.eval_examples,
            max_gen_tokens=config.eval_max_tokens,
            cache_dir=ctx.out_dir / "hf-datasets",
        )
        ctx.log(f"{label}: {results[label].metrics} ({results[label].seconds:.1f}s)")
    base, trained = results["base"], results["trained"]
    lm_eval_files = {}
    for label, result in results.items():
        path = ctx.out_dir / f"lm_eval_{label}.json"
        path.write_text(json.dumps(result.lm_eval, indent=1))
        lm_eval_files[f"lm_eval_{label}"] = str(path)
    return Evaluation(
        base={m: base.metrics[m] for m in metric_order(base.metrics)},
        trained={m: trained.metrics[m] for m in metric_order(trained.metrics)},
        higher_is_better={**base.higher_is_better, **trained.higher_is_better},
        num_examples=n,
        tasks=plan.tasks,
        samples=[
            {
                "question": b["question"],
                "reference": b["reference"],
                "base": b["output"],
                "trained": t["output"],
            }
            for b, t in zip(base.generations, trained.generations, strict=True)
        ],
        seconds={"base": base.seconds, "trained": trained.seconds},
        files=lm_eval_files,
        details={"generation_task": plan.generation_task},
    )
