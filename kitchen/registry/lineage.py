"""What a registered version records about where it came from: upstream manifests, config, code, run.

The same tags go on the model version (the registry's view) and on the MLflow run (the experiment's
view), so either one answers "which base, data, datums, checkpoints, config and code made this?".
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

from kitchen.hashing import ADAPTER_FILES, hash_file, hash_json
from kitchen.manifests import (
    BaseModelManifest,
    CheckpointsManifest,
    DatasetManifest,
    EvalManifest,
    Manifest,
    WeightsManifest,
)

# MLflow caps run tag values at 8000 characters (model version tags at 100000).
RUN_TAG_LIMIT = 8000


@dataclass(frozen=True)
class TrainedModel:
    """Every upstream manifest of a registration, as the assets produced them."""

    workflow: str
    base_model: BaseModelManifest
    dataset: DatasetManifest
    checkpoints: CheckpointsManifest
    weights: WeightsManifest
    eval_report: EvalManifest
    inputs: Mapping[str, Manifest] = field(default_factory=dict)
    """The workflow's own upstream assets by kind (SFT's datums, DPO's reference logprobs, ...)."""
    lower_is_better: bool = False  # direction of eval_report.primary_metric

    @property
    def primary_value(self) -> float | None:
        return self.eval_report.trained.get(self.eval_report.primary_metric)

    @property
    def tokenizer_hash(self) -> str | None:
        """The tokenizer the training data was rendered with, when an input records one."""
        for manifest in self.inputs.values():
            value = getattr(manifest, "tokenizer_hash", None)
            if isinstance(value, str):
                return value
        return None

    def data_settings(self) -> dict[str, object]:
        """How the training data was rendered (max length, which tokens train), when an input says."""
        settings: dict[str, object] = {}
        for manifest in self.inputs.values():
            for name in ("max_length", "train_on"):
                value = getattr(manifest, name, None)
                if value is not None:
                    settings.setdefault(name, value)
        return settings


@dataclass(frozen=True)
class Provenance:
    """The Dagster side: which run registers, which runs produced the inputs, and the run's config."""

    dagster_run_id: str
    dagster_run_url: str | None = None
    upstream: Mapping[str, str] = field(default_factory=dict)  # asset key -> Dagster run id that made it
    config: Mapping[str, object] = field(default_factory=dict)


def adapter_dir(weights: WeightsManifest) -> Path | None:
    """The local adapter directory of ``file://`` weights; None for weights that live on Tinker."""
    parts = urlsplit(weights.sampler_path)
    if parts.scheme != "file":
        return None
    return Path(url2pathname(parts.path))


def weights_hash(model: TrainedModel) -> str:
    """The identity of the trained weights: adapter file contents (or the Tinker path) on this base.

    Re-registering the same weights finds the version tagged with this hash instead of adding one.
    """
    directory = adapter_dir(model.weights)
    base = model.base_model.content_hash
    if directory is None:
        return hash_json({"base": base, "sampler_path": model.weights.sampler_path})
    missing = [name for name in ADAPTER_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"trained weights {model.weights.sampler_path} lack {', '.join(missing)}")
    return hash_json({"base": base, "adapter": {name: hash_file(directory / name) for name in ADAPTER_FILES}})


_QUIET: dict[str, Any] = {"capture_output": True, "text": True, "timeout": 10, "check": True}


@cache
def code_version() -> dict[str, str]:
    """Kitchen's package version and, in a git checkout, the commit (``+dirty`` with local changes)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str] = {}
    with contextlib.suppress(PackageNotFoundError):  # running from a checkout that was never installed
        found["kitchen.code.version"] = version("kitchen")
    repo = Path(__file__).resolve().parents[2]
    git = ["git", "-C", str(repo)]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], **_QUIET).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], **_QUIET
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return found  # not a git checkout (an installed wheel): the package version stands alone
    found["kitchen.code.git_commit"] = commit + ("+dirty" if dirty else "")
    return found


def _flat(prefix: str, values: Mapping[str, float]) -> dict[str, str]:
    return {f"{prefix}.{name}": repr(float(value)) for name, value in sorted(values.items())}


def lineage_tags(model: TrainedModel, provenance: Provenance, *, weights_id: str) -> dict[str, str]:
    """Tags naming every upstream asset and what it hashed to, the config, the code and the run."""
    base, data, ckpts, weights, report = (
        model.base_model,
        model.dataset,
        model.checkpoints,
        model.weights,
        model.eval_report,
    )
    tags: dict[str, str] = {
        "kitchen.workflow": model.workflow,
        "kitchen.backend": weights.backend,
        "kitchen.base_model": base.name,
        "kitchen.base_model.backend_model": base.backend_model,
        "kitchen.base_model.source": base.source,
        "kitchen.base_model.content_hash": base.content_hash,
        "kitchen.dataset": data.name,
        "kitchen.dataset.source": data.source,
        "kitchen.dataset.content_hash": data.content_hash,
        "kitchen.checkpoints": "\n".join(f"{c.step}:{c.kind}:{c.path}" for c in ckpts.checkpoints),
        "kitchen.weights.sampler_path": weights.sampler_path,
        "kitchen.weights.state_path": weights.state_path,
        "kitchen.weights.hash": weights_id,
        "kitchen.training.steps": str(weights.steps),
        "kitchen.training.final_loss": repr(weights.final_loss),
        "kitchen.config": json.dumps(dict(provenance.config), sort_keys=True, default=str),
        "kitchen.hyperparameters": json.dumps(
            {**weights.hyperparameters, "lora_rank": weights.lora_rank, **model.data_settings()},
            sort_keys=True,
        ),
        "kitchen.eval.primary_metric": report.primary_metric,
        "kitchen.eval.examples": str(report.num_examples),
        **_flat("kitchen.eval", report.trained),
        **_flat("kitchen.eval.base", report.base),
        "dagster.run_id": provenance.dagster_run_id,
        **code_version(),
    }
    for kind, manifest in sorted(model.inputs.items()):
        # a workflow's own inputs: their identity, and for a model input (distillation's teacher) its name
        # and registered version
        for name in ("content_hash", "tokenizer_hash", "registered_version", "name"):
            value = getattr(manifest, name, None)
            if isinstance(value, str):
                tags[f"kitchen.{kind}.{name}"] = value
    if report.judge_model:
        tags["kitchen.eval.judge_model"] = report.judge_model
    if base.registered_version:
        tags["kitchen.base_model.registered_version"] = base.registered_version
    if base.revision:
        tags["kitchen.base_model.revision"] = base.revision
    if data.revision:
        tags["kitchen.dataset.revision"] = data.revision
    if provenance.dagster_run_url:
        tags["dagster.run_url"] = provenance.dagster_run_url
    for asset_key, run_id in sorted(provenance.upstream.items()):
        tags[f"kitchen.upstream.{asset_key}"] = run_id or "unknown"
    return tags


def run_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """``tags`` cut to MLflow's run-tag length (the version keeps them whole)."""
    marker = " …(truncated; full value on the model version)"
    cut = RUN_TAG_LIMIT - len(marker)
    return {k: v if len(v) <= RUN_TAG_LIMIT else v[:cut] + marker for k, v in tags.items()}


def run_params(model: TrainedModel, provenance: Provenance) -> dict[str, str]:
    """Run params: hyperparameters and the knobs that shaped the data (never URIs or credentials)."""
    params: dict[str, object] = {
        **model.weights.hyperparameters,
        "lora_rank": model.weights.lora_rank,
        "steps": model.weights.steps,
        "backend": model.weights.backend,
        "base_model": model.base_model.name,
        "dataset": model.dataset.name,
        "dataset_revision": model.dataset.revision or model.dataset.content_hash[:16],
        **model.data_settings(),
        "eval_examples": model.eval_report.num_examples,
        **provenance.config,
    }
    return {k: str(v)[:6000] for k, v in params.items() if v is not None}
