"""What a workflow's hooks receive and return: plain library objects, no Dagster.

The Dagster layer builds these from an asset's config, resources and upstream manifests, calls the
workflow's hook, and turns what comes back into outputs and UI metadata.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kitchen.contract import SamplingClient, ServiceClient
from kitchen.manifests import (
    BaseModelManifest,
    CheckpointsManifest,
    DatasetManifest,
    Manifest,
    WeightsManifest,
)
from kitchen.ports.llm import LLMClient

Log = Callable[[str], None]


@dataclass(frozen=True)
class PlanContext:
    """Everything a workflow needs to build its training plan."""

    config: Any
    """The workflow's ``train`` section."""
    base_model: BaseModelManifest
    inputs: Mapping[str, Manifest]
    """The manifests of ``Workflow.train_inputs``, by kind."""
    service: ServiceClient
    log: Log


@dataclass(frozen=True)
class EvalContext:
    """Everything a workflow needs to evaluate trained weights against the model they started from."""

    config: Any
    """The workflow's ``eval_report`` section."""
    base_model: BaseModelManifest
    dataset: DatasetManifest
    checkpoints: CheckpointsManifest
    weights: WeightsManifest
    inputs: Mapping[str, Manifest]
    service: ServiceClient
    out_dir: Path
    log: Log
    judge: Callable[[], LLMClient] | None = None
    """Opens the ``llm`` resource's client, for evaluations that ask an LLM judge (opened only then)."""

    def base_client(self) -> SamplingClient:
        """The model training started from: the base, or the registered adapter it was given."""
        return starting_sampling_client(self.service, self.base_model)

    def trained_client(self) -> SamplingClient:
        return self.service.create_sampling_client(model_path=self.weights.sampler_path).result()


def starting_sampling_client(service: ServiceClient, base_model: BaseModelManifest) -> SamplingClient:
    """A sampling client on the weights training starts from (``base_model`` may be a registered model)."""
    if base_model.sampler_path:
        return service.create_sampling_client(model_path=base_model.sampler_path).result()
    return service.create_sampling_client(base_model=base_model.backend_model).result()


@dataclass
class Evaluation:
    """One evaluation of base (starting) and trained model on the same held-out data."""

    base: dict[str, float]
    trained: dict[str, float]
    higher_is_better: dict[str, bool]
    num_examples: int
    tasks: list[str] = field(default_factory=list)
    samples: list[dict[str, str]] = field(default_factory=list)
    """Example rows for the UI (question, reference, base, trained, ...)."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Per model scored (``base``, ``trained``, and any other)."""
    reference: dict[str, float] | None = None
    """A third column some workflows report (distillation: the teacher)."""
    reference_label: str = "reference"
    files: dict[str, str] = field(default_factory=dict)
    """Raw outputs worth keeping beside the report (lm-eval results), by name."""
    details: dict[str, Any] = field(default_factory=dict)
    """Workflow-specific facts for report.json (generation task, reward function, ...)."""
