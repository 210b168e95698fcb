"""Supervised evaluation: lm-eval on the held-out split (NLL, greedy exact match and token P/R/F1) and any
extra lm-eval tasks, for the starting model and the trained one, through the same sampling-client code."""

from __future__ import annotations

import json

from kitchen.data import load_saved_dataset
from kitchen.eval.compare import context_window, score_models
from kitchen.eval.harness import check_task_data, plan_evaluation
from kitchen.eval.report import metric_order
from kitchen.workflows.context import EvalContext, Evaluation

__all__ = ["context_window", "evaluate_supervised"]


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
    results = score_models(
        {"base": ctx.base_client, "trained": ctx.trained_client},
        list(heldout),
        plan,
        limit=config.eval_examples,
        max_gen_tokens=config.eval_max_tokens,
        out_dir=ctx.out_dir,
        windows=dict.fromkeys(("base", "trained"), context_window(ctx.base_model)),
        log=ctx.log,
    )
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
