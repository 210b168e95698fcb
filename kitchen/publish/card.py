"""The exported model's ``README.md``: the Hub's YAML metadata, how to load it, evaluation, training
hyperparameters, the gate's verdict and the lineage, all read from the registry version's tags.

Nothing that names this machine goes in: local paths (a base model directory, a dataset file, the
checkpoints, a SQLite store) are reduced to their last part, so a card never points at a directory that
exists only where the model was trained.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any
from urllib.parse import urlsplit

from kitchen.publish.base import HubBase, RecordedBase
from kitchen.registry.store import VersionView, is_remote

_NOT_METRICS = frozenset({"primary_metric", "examples"})
_LOCAL_DATASET_SOURCES = frozenset({"local-dir", "jsonl", "data-files"})


@dataclass(frozen=True)
class CardInputs:
    view: VersionView
    recorded: RecordedBase
    hub: HubBase | None
    merged: bool
    load_id: str  # what from_pretrained is given in the card's snippet: the Hub repo or the folder
    files: Sequence[tuple[str, int, str]]  # (relative path, bytes, sha256) of every other exported file
    tracking_uri: str


def portable(value: Any) -> Any:
    """``value`` with local paths (``/abs/dir``, ``~/x``, ``file:///x``, ``C:\\x``) reduced to their last
    part, recursively through lists and dicts."""
    if isinstance(value, Mapping):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [portable(v) for v in value]
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("file://"):
        text = urlsplit(text).path
    elif not (text.startswith(("/", "~", "\\")) or (len(text) > 2 and text[1] == ":" and text[2] in "\\/")):
        return value
    return PurePath(text.rstrip("/\\")).name or "(local path)"


def trained_metrics(tags: Mapping[str, str]) -> dict[str, tuple[float | None, float]]:
    """metric -> (base, trained), from ``kitchen.eval.*`` tags."""
    found: dict[str, tuple[float | None, float]] = {}
    for key, raw in sorted(tags.items()):
        if not key.startswith("kitchen.eval.") or key.startswith("kitchen.eval.base."):
            continue
        name = key.removeprefix("kitchen.eval.")
        if name in _NOT_METRICS:
            continue
        try:
            value = float(raw)
        except ValueError:
            continue
        base_raw = tags.get(f"kitchen.eval.base.{name}")
        found[name] = (float(base_raw) if base_raw is not None else None, value)
    return found


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "nan" if math.isnan(value) else f"{value:.4f}"


def _json_tag(tags: Mapping[str, str], key: str) -> dict[str, Any]:
    try:
        loaded = json.loads(tags.get(key) or "{}")
    except json.JSONDecodeError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def dataset_display(tags: Mapping[str, str]) -> str:
    name = tags.get("kitchen.dataset", "unknown")
    return PurePath(name).name if tags.get("kitchen.dataset.source") in _LOCAL_DATASET_SOURCES else name


def card_metadata(inputs: CardInputs) -> dict[str, Any]:
    """The YAML block: ``base_model`` (+ relation), ``datasets``, ``library_name``, ``tags``,
    ``model-index`` with the trained model's held-out metrics."""
    from huggingface_hub import EvalResult, ModelCardData

    tags = inputs.view.tags
    dataset = dataset_display(tags)
    revision = tags.get("kitchen.dataset.revision")
    results = []
    for name, (_, value) in trained_metrics(tags).items():
        if math.isnan(value):
            continue
        task, _, metric = name.rpartition("/")
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=task or dataset,
                dataset_name=task or f"{dataset} (held-out split)",
                dataset_split=None if task else "test",
                dataset_revision=None if task else revision,
                metric_type=metric,
                metric_value=value,
                metric_name=f"{metric} ({tags.get('kitchen.eval.examples', '?')} examples)",
            )
        )
    workflow = tags.get("kitchen.workflow", "kitchen")
    extra: dict[str, Any] = {}
    if inputs.hub is not None:
        extra["base_model_relation"] = "finetune" if inputs.merged else "adapter"
    data = ModelCardData(
        base_model=inputs.hub.card_base_model if inputs.hub is not None else None,
        datasets=[tags["kitchen.dataset"]] if tags.get("kitchen.dataset.source") == "hub" else None,
        library_name="transformers" if inputs.merged else "peft",
        pipeline_tag="text-generation",
        tags=["kitchen", workflow, "lora", *(["merged"] if inputs.merged else [])],
        model_name=inputs.load_id.rsplit("/", 1)[-1],
        eval_results=results or None,
        **extra,
    )
    metadata: dict[str, Any] = data.to_dict()
    return metadata


def _load_snippet(inputs: CardInputs, prompt: str) -> str:
    kwargs = ""
    if inputs.merged:
        head = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{inputs.load_id}")'
        )
    else:
        if inputs.hub is not None and inputs.hub.gguf_file:
            kwargs = f', gguf_file="{inputs.hub.gguf_file}"'
        head = (
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            "# the base model named in adapter_config.json is fetched from the Hub\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{inputs.load_id}"{kwargs})'
        )
    return (
        f"```python\n{head}\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{inputs.load_id}")\n'
        f'messages = [{{"role": "user", "content": {json.dumps(prompt)}}}]\n'
        "text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)\n"
        'inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")\n'
        "output = model.generate(**inputs, max_new_tokens=32, do_sample=False)\n"
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n'
        "```"
    )


def _base_paragraph(inputs: CardInputs) -> str:
    recorded, hub = inputs.recorded, inputs.hub
    where = f"content hash `{recorded.content_hash[:16]}`"
    if hub is None:
        return (
            f"The base model was the local directory `{recorded.display_name}` ({where}); it has no Hub id, "
            "so this merged export carries the full weights."
        )
    pinned = f"`{hub.repo_id}`" + (f" at revision `{hub.revision}`" if hub.revision else "")
    if hub.gguf_file:
        gguf_sha = str(recorded.revision).removeprefix("gguf:")
        text = (
            f"The base model is {pinned}, file `{hub.gguf_file}` (a Q4_1 quantization of `{hub.origin}`, "
            f"bundled by Kitchen's packaged model, sha256 starting `{gguf_sha}`)"
            f", dequantized to float32 by `transformers` ({where}): the adapter was trained on exactly those "
            "weights, so load the base from that file (`gguf_file=`), not from the original model."
        )
    elif hub.asserted:
        text = (
            f"The base model is {pinned}, as named by whoever exported this model; Kitchen trained on a "
            f"local copy ({where}) and did not check the Hub copy against it."
        )
    else:
        text = f"The base model is {pinned} ({where})."
    if inputs.merged:
        text += " The adapter is merged into it here: the weights below are the full model, in float32."
    return text


def render_card(inputs: CardInputs) -> str:
    """The whole ``README.md``."""
    import yaml

    view, tags = inputs.view, inputs.view.tags
    name, number = view.version.name, view.number
    workflow = tags.get("kitchen.workflow", "kitchen")
    dataset = dataset_display(tags)
    kind = "merged model (base + LoRA adapter, full weights)" if inputs.merged else "LoRA adapter (PEFT)"
    aliases = f" ({', '.join(view.aliases)})" if view.aliases else ""
    prompt = "What is 17 + 25?" if dataset == "kitchen/arithmetic" else "Hello! Who are you?"
    lines = [
        "---",
        yaml.safe_dump(card_metadata(inputs), sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {inputs.load_id.rsplit('/', 1)[-1]}",
        "",
        f"A {kind} trained by Kitchen with its `{workflow}` workflow on `{dataset}`, "
        f"exported from the MLflow registered model `{name}` version {number}{aliases}.",
        "",
        _base_paragraph(inputs),
        "",
        "## Use",
        "",
        _load_snippet(inputs, prompt),
        "",
        "The prompt is rendered with the tokenizer's chat template exactly as in training.",
        "",
    ]
    metrics = trained_metrics(tags)
    if metrics:
        primary = tags.get("kitchen.eval.primary_metric", "")
        lines += [
            "## Evaluation",
            "",
            f"Held-out split of `{dataset}`, {tags.get('kitchen.eval.examples', '?')} examples per model, "
            f"scored by lm-eval through Kitchen; the base column is the model training started from. "
            f"Primary metric: `{primary}`.",
            "",
            "| metric | base | trained |",
            "|---|---:|---:|",
            *(f"| {m} | {_fmt(b)} | {_fmt(t)} |" for m, (b, t) in metrics.items()),
            "",
        ]
    if "kitchen.promotion.gate_passed" in tags:
        verdict = "passed" if tags["kitchen.promotion.gate_passed"] == "true" else "failed"
        lines += [
            f"**Quality gate: {verdict}** ({tags.get('kitchen.promotion.gate_source', '')})."
            f" Registry decision: `{tags.get('kitchen.promotion.alias', '?')}`, "
            f"{tags.get('kitchen.promotion.reason', '')}.",
            "",
        ]
    hyper = _json_tag(tags, "kitchen.hyperparameters")
    config = portable(_json_tag(tags, "kitchen.config"))
    lines += ["## Training", ""]
    lines += [
        f"{tags.get('kitchen.training.steps', '?')} optimizer steps on the "
        f"`{tags.get('kitchen.backend', '?')}` backend, final training loss "
        f"{tags.get('kitchen.training.final_loss', '?')}.",
        "",
    ]
    if hyper:
        lines += [
            "| hyperparameter | value |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in sorted(hyper.items())),
        ]
        lines.append("")
    if config:
        lines += [
            "<details><summary>Run config</summary>",
            "",
            "```json",
            json.dumps(config, indent=2, sort_keys=True),
            "```",
            "",
            "</details>",
            "",
        ]
    lines += ["## Lineage", "", "| | |", "|---|---|", *_lineage_rows(inputs), ""]
    if inputs.files:
        lines += [
            "## Files",
            "",
            "| file | bytes | sha256 |",
            "|---|---:|---|",
            *(f"| `{path}` | {size} | `{digest}` |" for path, size, digest in inputs.files),
            "",
        ]
    return "\n".join(lines)


def _lineage_rows(inputs: CardInputs) -> list[str]:
    tags, recorded = inputs.view.tags, inputs.recorded
    base = f"`{recorded.display_name}` ({recorded.source}"
    base += f", revision `{recorded.revision}`" if recorded.revision else ""
    base += f", content hash `{recorded.content_hash[:16]}`)"
    if recorded.chain:
        base += "; training continued from " + ", ".join(f"`{ref}`" for ref in recorded.chain)
    data_id = tags.get("kitchen.dataset.revision") or tags.get("kitchen.dataset.content_hash", "")[:16]
    registry = f"`{inputs.view.version.name}` version {inputs.view.number}"
    if is_remote(inputs.tracking_uri):
        registry += f" at {inputs.tracking_uri}"
    rows = [
        (
            "registered model",
            registry + (f", MLflow run `{inputs.view.version.run_id}`" if inputs.view.version.run_id else ""),
        ),
        ("base model", base),
        ("dataset", f"`{dataset_display(tags)}` ({tags.get('kitchen.dataset.source', '?')}, `{data_id}`)"),
        (
            "training data",
            ", ".join(
                f"{k.removeprefix('kitchen.').replace('.', ' ')} `{v[:16]}`"
                for k, v in sorted(tags.items())
                if k.startswith("kitchen.")
                and k.endswith(("content_hash", "tokenizer_hash"))
                and not k.startswith(("kitchen.base_model", "kitchen.dataset"))
            )
            or "n/a",
        ),
        ("weights hash", f"`{tags.get('kitchen.weights.hash', '?')}`"),
        ("Dagster run", f"`{tags.get('dagster.run_id', '?')}`"),
        (
            "code",
            " ".join(
                f"`{tags[k]}`" for k in ("kitchen.code.version", "kitchen.code.git_commit") if tags.get(k)
            )
            or "unknown",
        ),
    ]
    return [f"| {label} | {value} |" for label, value in rows]
