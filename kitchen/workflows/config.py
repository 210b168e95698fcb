"""Run configuration: one pydantic *section* per asset, and per workflow one flat config combining them.

The flat config is the single source of every setting's default, range and help text: ``kitchen run
<workflow>`` generates its flags from it, ``<workflow>_job`` validates a launch against it (so a bad value
fails before any asset does work), and each asset's Dagster config is its section (the UI's launcher
shows exactly the fields that asset reads). ``split_run_config`` and ``flatten_run_config`` are the one
place that converts between the flat form and Dagster's per-op form.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kitchen.models.base import DEFAULT_MODEL

if TYPE_CHECKING:
    from kitchen.data.formats import RowFormat
    from kitchen.data.sources import LoadedDataset

DEFAULT_DATASET = "kitchen/arithmetic"
#: A field's ``json_schema_extra`` key: what makes the registered model its default names, said by
#: ``kitchen run``'s preflight when that default does not exist yet (distillation's default teacher).
MISSING_DEFAULT_HINT = "missing_default_hint"
#: Sections of a Dagster run config that are not per-op config.
NOT_OP_CONFIG = frozenset({"ops", "resources", "loggers", "execution"})


class Section(BaseModel):
    """A group of settings one asset reads; unknown keys are an error, not ignored."""

    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    model: str = Field(
        default=DEFAULT_MODEL,
        description="Base model: the packaged SmolLM2-135M-Instruct, a local Hugging Face directory, a Hub "
        "id, a Tinker model name, or a registered model (models:/NAME@champion, models:/NAME/3).",
    )


class DatasetSection(Section):
    dataset: str = Field(
        default=DEFAULT_DATASET,
        description="A built-in dataset, a JSONL/CSV/Parquet file, a local dataset directory, or a Hub id.",
    )
    dataset_revision: str | None = Field(default=None, description="Hub revision (branch, tag or sha).")
    test_size: float = Field(default=0.1, gt=0.0, lt=1.0, description="Held-out fraction when no test split.")
    max_rows: int | None = Field(default=None, ge=1, description="Cap on training rows (after normalising).")
    data_seed: int = Field(default=0, ge=0, description="Seed for splitting and built-in generation.")
    dedup: Literal["all", "heldout", "off"] = Field(
        default="all",
        description="Exact duplicates (normalised text) to remove: 'all' (within train, within held-out, and "
        "held-out rows whose prompt is in train), 'heldout' (the held-out split only), 'off'.",
    )

    decontaminate: bool = Field(
        default=False,
        description="Drop held-out rows whose prompt is a near duplicate of a training prompt (sentence "
        "embeddings + the vector store; opt-in: about 30 s for kitchen/arithmetic on 2 CPU cores, cached "
        "after).",
    )
    # Measured by bench/decontamination.py on 24 hand-written chat requests with all-MiniLM-L6-v2:
    # paraphrases score 0.70-0.97 (median 0.88); a different request's nearest other request at most 0.78.
    # 0.85 flags no distinct request with a 0.07 margin and catches 15 of 24 paraphrases (0.80: 20 of 24,
    # a 0.02 margin). Templated prompts ("What is 68 + 81?") score above 0.8 whatever their numbers.
    decontaminate_threshold: float = Field(
        default=0.85,
        gt=0.0,
        le=1.0,
        description="Cosine similarity at or above which a held-out prompt counts as a near duplicate "
        "(0.85: measured for all-MiniLM-L6-v2, README).",
    )
    decontaminate_keep: bool = Field(
        default=False,
        description="Only flag near duplicates in the metadata; keep them in the held-out split.",
    )

    def load(self, row_format: RowFormat | None = None) -> LoadedDataset:
        """The source with these settings, normalised to ``row_format`` (chat when None), skips counted:
        every workflow's ``load_dataset`` is this with its own row format."""
        from kitchen.data.formats import CHAT
        from kitchen.data.sources import load_dataset_source

        return load_dataset_source(
            self.dataset,
            test_size=self.test_size,
            seed=self.data_seed,
            max_rows=self.max_rows,
            revision=self.dataset_revision,
            row_format=CHAT if row_format is None else row_format,
            dedup=self.dedup,
        )


class DatumsSection(Section):
    max_length: int = Field(
        default=256, ge=8, le=131072, description="Tokens per datum; longer rows are cut."
    )
    train_on: Literal["last_assistant", "all_assistant", "all"] = Field(
        default="all_assistant", description="Which tokens carry loss (tinker-cookbook's TrainOnWhat)."
    )


class LoopSection(Section):
    """What the one training loop and its optimizer take, whatever one step's batch is made of (a
    workflow whose batch is not ``batch_size`` examples, such as RL's groups, builds on this)."""

    epochs: int = Field(default=1, ge=1, le=1000, description="Passes over the training set.")
    learning_rate: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="Adam learning rate; default: the workflow's rule for the model (README).",
    )
    lr_schedule: Literal["linear", "cosine", "constant"] = Field(
        default="linear", description="Learning-rate schedule after warmup."
    )
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup steps.")
    lora_rank: int = Field(default=32, ge=1, le=1024, description="LoRA rank.")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps.")
    save_every: int = Field(default=20, ge=0, description="Checkpoint (with optimizer state) every N steps.")
    seed: int = Field(default=0, ge=0, description="Training seed (LoRA init, shuffling, sampling).")
    max_in_flight: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Steps submitted before the oldest is awaited (hides request latency; plans that sample "
        "from the policy cap it at their staleness + 1).",
    )
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay.")
    grad_clip_norm: float = Field(default=0.0, ge=0.0, description="Clip the gradient norm (0: off).")
    resume: bool = Field(default=True, description="Resume an interrupted run from its last checkpoint.")


class BatchSection(Section):
    batch_size: int = Field(default=16, ge=1, le=8192, description="Examples per optimizer step.")


class TrainingSection(LoopSection, BatchSection):
    pass


class EvalSection(Section):
    #: Metrics this workflow's evaluation reports, which the gate may use without a ``task/`` prefix.
    REPORTED_METRICS: ClassVar[tuple[str, ...]] = (
        "exact_match",
        "f1",
        "precision",
        "recall",
        "nll",
        "perplexity",
    )

    eval_examples: int = Field(
        default=100, ge=1, le=100000, description="Held-out examples scored per model (lm-eval's limit)."
    )
    eval_max_tokens: int = Field(default=16, ge=1, le=4096, description="Max new tokens per generation.")
    eval_tasks: list[str] = Field(
        default=[],
        description="Extra lm-eval tasks (gsm8k, hellaswag, ...) or Kitchen tasks (kitchen_arithmetic), "
        "scored for base and trained model; the held-out tasks always run. Unknown names fail at launch.",
    )
    gate_metric: str = Field(
        default="exact_match",
        description="The quality gate's primary metric: a held-out one (exact_match, f1, precision, recall, "
        "nll, perplexity) or '<task>/<metric>' from an eval task.",
    )
    gate_margin: float = Field(
        default=0.02, ge=0.0, le=1e6, description="How much the trained model must beat the base by."
    )
    gate_max_nll_increase: float | None = Field(
        default=0.0,
        ge=0.0,
        le=1e6,
        description="How much held-out NLL may rise before the gate fails (unset: no NLL rule).",
    )

    @field_validator("eval_tasks", mode="before")
    @classmethod
    def _split_task_list(cls, value: Any) -> Any:
        """``"gsm8k,hellaswag"`` (the CLI's form) becomes a list."""
        return [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else value

    @field_validator("eval_tasks")
    @classmethod
    def _known_tasks(cls, value: list[str]) -> list[str]:
        from kitchen.eval.harness import EvalTaskError, check_task_names

        try:
            return check_task_names(value)
        except EvalTaskError as err:
            raise ValueError(str(err)) from err

    @field_validator("gate_metric")
    @classmethod
    def _reported_or_qualified(cls, value: str) -> str:
        if "/" not in value and value not in cls.REPORTED_METRICS:
            known = ", ".join(cls.REPORTED_METRICS)
            raise ValueError(f"unknown metric {value!r}; use one of {known} or <task>/<metric>")
        return value


class RegistrySection(Section):
    registered_model_name: str | None = Field(
        default=None,
        description="MLflow registered model to add a version to; default <workflow>-<base model>-<dataset>.",
    )
    mlflow_run_name: str | None = Field(
        default=None, description="Name of the run's MLflow run (default <workflow>-<Dagster run id prefix>)."
    )

    @field_validator("registered_model_name")
    @classmethod
    def _mlflow_accepts_name(cls, value: str | None) -> str | None:
        """Checked at launch, so a name MLflow would refuse fails before training, naming the rule."""
        from kitchen.registry.names import validate_model_name

        return None if value is None else validate_model_name(value)


class RunConfig(Section):
    """The base of every workflow's flat config."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Level of the run's event log."
    )


def split_run_config(flat: BaseModel, sections: Mapping[str, type[BaseModel]]) -> dict[str, Any]:
    """Per-op config (``{op: {"config": {...}}}``) from a flat config: each op keeps its section's fields."""
    values = flat.model_dump()
    return {op: {"config": {name: values[name] for name in cls.model_fields}} for op, cls in sections.items()}


def section_of(config: BaseModel, section: type[BaseModel]) -> BaseModel:
    """The ``section`` of a flat configuration (what one asset of it reads)."""
    return section(**{name: getattr(config, name) for name in section.model_fields})


def flatten_run_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The flat settings of a stored run config, per-op (``ops:``) or already flat, in one dict."""
    ops = run_config.get("ops")
    if not isinstance(ops, Mapping):
        return {k: v for k, v in run_config.items() if k not in NOT_OP_CONFIG}
    values: dict[str, Any] = {}
    for section in ops.values():
        values.update(((section or {}).get("config") or {}) if isinstance(section, Mapping) else {})
    return values
