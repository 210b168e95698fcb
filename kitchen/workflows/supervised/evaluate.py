"""Supervised evaluation: lm-eval on the held-out split (NLL, greedy exact match and token P/R/F1) and any
extra lm-eval tasks, for the starting model and the trained one, through the same sampling-client code;
with ``judge``, a pairwise LLM judge on the same generations (``kitchen.eval.judge``)."""

from __future__ import annotations

import json
import time
from typing import Any

from kitchen.data import load_saved_dataset
from kitchen.eval.compare import context_window, score_models
from kitchen.eval.harness import check_task_data, plan_evaluation
from kitchen.eval.judge import judge_pairs, judge_summary
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
    samples = [
        {"question": b["question"], "reference": b["reference"], "base": b["output"], "trained": t["output"]}
        for b, t in zip(base.generations, trained.generations, strict=True)
    ]
    base_metrics = {m: base.metrics[m] for m in metric_order(base.metrics)}
    trained_metrics = {m: trained.metrics[m] for m in metric_order(trained.metrics)}
    directions = {**base.higher_is_better, **trained.higher_is_better}
    details: dict[str, Any] = {"generation_task": plan.generation_task}
    files: dict[str, str] = {}
    for label, result in results.items():
        path = ctx.out_dir / f"lm_eval_{label}.json"
        path.write_text(json.dumps(result.lm_eval, indent=1))
        files[f"lm_eval_{label}"] = str(path)
    seconds = {"base": base.seconds, "trained": trained.seconds}
    if getattr(config, "judge", False):  # a workflow reusing this evaluation may have no judge settings
        if ctx.judge is None:
            raise ValueError("the judge was asked for (--judge) but no llm resource was given")
        started = time.perf_counter()
        judged = judge_pairs(
            ctx.judge(),
            samples[: config.judge_examples],
            max_tokens=config.judge_max_tokens,
            log=ctx.log,
        )
        seconds["judge"] = time.perf_counter() - started
        record = judged.as_dict()
        path = ctx.out_dir / "judge.json"
        path.write_text(json.dumps(record, indent=1))
        files["judge"] = str(path)
        metrics = record["metrics"]
        details["judge"] = {"model": judged.model, "rubric": record["rubric"], "metrics": metrics}
        ctx.log(judge_summary(judged.model, metrics))
        if "judge_win_rate" in metrics:
            # The base against itself is parity by definition: the gate asks for a win rate above it.
            base_metrics["judge_win_rate"] = 0.5
            trained_metrics["judge_win_rate"] = metrics["judge_win_rate"]
            directions["judge_win_rate"] = True
    return Evaluation(
        base=base_metrics,
        trained=trained_metrics,
        higher_is_better=directions,
        num_examples=n,
        tasks=plan.tasks,
        samples=samples,
        seconds=seconds,
        files=files,
        details=details,
    )
