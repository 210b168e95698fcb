"""Several models scored on the same held-out rows by the same lm-eval tasks: the columns of an eval report.

Supervised evaluation scores two models (the starting one and the trained one); distillation adds the
teacher as a third. Each model's prompts are written once per tokenizer (its own chat template), so a
teacher that tokenizes differently is still prompted the way it was trained.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kitchen.contract import SamplingClient
from kitchen.data import tokenizer_fingerprint
from kitchen.eval.harness import NLL_TASK, EvalPlan, ModelResults, evaluate_model, write_task_data
from kitchen.eval.lm import KitchenLM
from kitchen.manifests import BaseModelManifest


def context_window(base_model: BaseModelManifest) -> int | None:
    """The base model's position limit when its config is local; None lets KitchenLM use the tokenizer's."""
    if not base_model.path:
        return None
    from transformers import AutoConfig

    value = getattr(AutoConfig.from_pretrained(base_model.path), "max_position_embeddings", None)
    return int(value) if value else None


def score_models(
    models: Mapping[str, Callable[[], SamplingClient]],
    heldout: Sequence[Mapping[str, Any]],
    plan: EvalPlan,
    *,
    limit: int,
    max_gen_tokens: int,
    out_dir: Path,
    windows: Mapping[str, int | None] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, ModelResults]:
    """``plan``'s tasks on ``heldout`` (chat rows) for each labelled model, in order.

    ``models`` maps a label (``base``, ``trained``, ``teacher``) to a factory for its sampling client;
    ``windows`` its context length (None: the tokenizer's). Task data is written under ``out_dir/data``
    for the first tokenizer seen and ``out_dir/data-<label>`` for any other.
    """
    files_by_tokenizer: dict[str, dict[str, Path]] = {}
    results: dict[str, ModelResults] = {}
    for label, make_client in models.items():
        window = (windows or {}).get(label)
        lm = KitchenLM(make_client(), max_length=window, skip_greedy_for=[NLL_TASK], label=label)
        key = tokenizer_fingerprint(lm.tokenizer)
        files = files_by_tokenizer.get(key)
        if files is None:
            data_dir = out_dir / ("data" if not files_by_tokenizer else f"data-{label}")
            files = write_task_data(plan, list(heldout), lm, data_dir, limit=limit)
            files_by_tokenizer[key] = files
        results[label] = evaluate_model(
            lm,
            plan,
            files,
            limit=limit,
            max_gen_tokens=max_gen_tokens,
            cache_dir=out_dir / "hf-datasets",
        )
        log(f"{label}: {results[label].metrics} ({results[label].seconds:.1f}s)")
    return results
