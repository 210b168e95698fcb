"""The small typed records that assets return: where things are and what they hash to, never weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BaseModelManifest(Manifest):
    """A resolved base model: what the backend is asked for and where its tokenizer lives."""

    name: str = Field(description="The name the user gave (a Hub id, a path, or the packaged default).")
    source: Literal["packaged-gguf", "hub", "local", "tinker", "registry"]
    backend_model: str = Field(description="What the training backend's create_lora_training_client takes.")
    path: str | None = Field(default=None, description="Local directory with config, weights, tokenizer.")
    tokenizer_path: str = Field(description="Directory (or Hub id) AutoTokenizer loads the tokenizer from.")
    content_hash: str
    revision: str | None = None
    num_parameters: int | None = None
    architecture: str | None = None
    registered_version: str | None = Field(
        default=None, description="models:/NAME/VERSION when the model is a registered (trained) version."
    )
    init_state: str | None = Field(
        default=None,
        description="Training state the adapter starts from (a registered model); None: a new adapter.",
    )
    sampler_path: str | None = Field(
        default=None, description="Weights to sample the starting model from, when it carries an adapter."
    )
    lora_rank: int | None = Field(default=None, description="The starting adapter's rank, if it has one.")


class DatasetManifest(Manifest):
    """A dataset normalised to chat ``messages`` with train and test splits, saved with ``save_to_disk``."""

    name: str
    source: Literal["builtin", "hub", "local-dir", "jsonl", "data-files"]
    path: str
    revision: str | None = Field(default=None, description="Hub revision sha, or None for local sources.")
    content_hash: str
    schema_found: str
    train_rows: int
    test_rows: int
    skipped_rows: dict[str, int] = Field(default_factory=dict)
    skipped_examples: list[str] = Field(
        default_factory=list,
        description="Where the first skipped rows are and why (file, line, reason); skipped_rows counts all.",
    )
    test_split_source: Literal["source", "seeded-split"] = "source"
    dedup: dict[str, Any] = Field(
        default_factory=dict,
        description="Exact duplicates removed (kitchen.data.dedup): mode and counts by reason.",
    )
    decontamination: dict[str, Any] = Field(
        default_factory=dict,
        description="Near-duplicate held-out rows (kitchen.data.decontaminate): threshold, model, counts.",
    )


class DatumsManifest(Manifest):
    """Tokenised ``tinker.types.Datum`` rows stored as Parquet, one file per split."""

    train_path: str
    test_path: str
    content_hash: str
    tokenizer_hash: str
    num_datums: int
    num_test_datums: int
    num_tokens: int
    trained_tokens: int
    max_length: int
    train_on: str
    truncated_rows: int
    dropped_rows: dict[str, int] = Field(default_factory=dict)


class CheckpointRef(Manifest):
    step: int
    path: str
    kind: Literal["state", "sampler"]


class CheckpointsManifest(Manifest):
    """Training-state checkpoints (weights and optimizer state) written during one training run."""

    checkpoints: list[CheckpointRef]
    steps: int
    epochs: int
    final_loss: float
    metrics_path: str
    backend: str
    run_name: str


class WeightsManifest(Manifest):
    """Final LoRA weights, saved for sampling: what evaluation and registration consume."""

    sampler_path: str
    state_path: str
    base_model: str
    backend: str
    lora_rank: int
    steps: int
    final_loss: float
    content_hash: str
    hyperparameters: dict[str, float | int | str] = Field(default_factory=dict)


class RolloutsManifest(Manifest):
    """What a policy sampled during training, one Parquet file per step (``kitchen.training.rollouts``'
    ``RolloutLog``): prompts, completions, their scores and the sampler's logprobs."""

    path: str = Field(description="Directory of step-NNNNNN.parquet files.")
    steps: int
    rows: int
    columns: list[str]
    content_hash: str


class EvalManifest(Manifest):
    """Base vs trained metrics on the held-out split."""

    report_path: str
    primary_metric: str
    base: dict[str, float]
    trained: dict[str, float]
    num_examples: int
    seconds: float
    gate_passed: bool | None = Field(
        default=None,
        description="The eval gate's verdict when the report records one (registration reads it).",
    )
    judge_model: str | None = Field(default=None, description="The LLM judge's model, when a judge ran.")


class RegisteredModelManifest(Manifest):
    """Trained weights registered as a version of an MLflow registered model, and the alias it got."""

    name: str
    version: str
    model_uri: str = Field(description="models:/NAME/VERSION")
    source: str = Field(
        description="Where the version's files live: the run's model/ artifacts, or tinker://."
    )
    run_id: str | None
    experiment_id: str | None
    tracking_uri: str = Field(description="The tracking server or store, credentials removed.")
    weights_hash: str
    created: bool = Field(description="False when these weights were already registered (no new version).")
    alias: Literal["champion", "challenger"]
    promotion_reason: str
    primary_metric: str
    value: float | None
    previous_champion: str | None
    previous_champion_value: float | None
    gate_passed: bool


class NotUsedManifest(Manifest):
    """An asset this run's configuration does not need (distillation's teacher samples in on-policy mode).

    The asset graph is static, so the asset still materialises, at no cost, and says why it holds nothing.
    """

    reason: str


class SweepReportManifest(Manifest):
    """A sweep's configurations compared (``kitchen.workflows.sweep``), and what was promoted."""

    workflow: str
    report_path: str = Field(description="sweep_report.json: every configuration's row, best first.")
    configurations: int
    completed: int = Field(description="Configurations whose evaluation was materialised.")
    best: str | None = Field(description="The best configuration that passed its gate (its partition key).")
    best_version: str | None = Field(default=None, description="models:/NAME/N of the best, if registered.")
    promoted: bool = Field(description="The best became champion.")
    decision: str = Field(description="Why the best was or was not promoted.")


class TeacherManifest(Manifest):
    """The teacher a distillation run learns from, and how the run distils (its mode)."""

    name: str = Field(description="The teacher as the user named it.")
    model: BaseModelManifest = Field(description="The teacher resolved like a base model.")
    content_hash: str = Field(description="The teacher's weights (a registered teacher: its adapter's hash).")
    registered_version: str | None = Field(default=None, description="models:/NAME/VERSION, if registered.")
    mode: Literal["on_policy", "off_policy"]
    same_tokenizer: bool = Field(description="Teacher and student render and tokenize prompts identically.")
    tokenizer_differences: list[str] = Field(default_factory=list)
    teacher_tokenizer_hash: str
    student_tokenizer_hash: str


class TeacherSamplesManifest(Manifest):
    """The teacher's completions for every training prompt, as chat rows (``save_to_disk``), and how they
    were sampled: the rows SFT renders into datums in off-policy distillation."""

    path: str
    content_hash: str
    teacher: str = Field(description="The teacher's name (a registered version when it has one).")
    teacher_hash: str
    prompts_hash: str = Field(description="Content hash of the prompts dataset the samples answer.")
    sampling: dict[str, float | int | str] = Field(description="max_tokens, temperature, seed, samples.")
    train_rows: int
    test_rows: int = 0
    prompts: int
    dropped: dict[str, int] = Field(default_factory=dict)
    truncated: int = Field(default=0, description="Samples cut at max_tokens (kept, counted).")
    replies_ignored: int = Field(default=0, description="Prompts that came with a reply (not used).")
    reused: bool = Field(default=False, description="Found from an earlier run with the same inputs.")


class HubReleaseManifest(Manifest):
    """A registered version published to the Hugging Face Hub (or why it was not)."""

    model_uri: str = Field(description="models:/NAME/VERSION that was (or would have been) published")
    published: bool = Field(description="False when skipped: not the champion, or already on the Hub.")
    reason: str
    repo_id: str
    url: str | None = None
    commit: str | None = None
    kind: Literal["adapter", "merged"] = "adapter"


class DeploymentManifest(Manifest):
    """Which version a running ``kitchen serve`` serves, as the server itself reports it."""

    url: str = Field(description="The server, credentials removed.")
    served_ref: str = Field(description="What the server follows (NAME@champion) or serves (NAME/3).")
    served_version: str = Field(description="NAME/VERSION the server answered with.")
    model_uri: str = Field(description="models:/NAME/VERSION of the served version.")
    registered_uri: str = Field(description="models:/NAME/VERSION the upstream registration produced.")
    current: bool = Field(description="Whether the served version is the one just registered.")
    reason: str


def manifest_payload(manifest: Manifest) -> dict[str, object]:
    """The JSON form a manifest is stored in: its type name and its fields."""
    return {"type": type(manifest).__name__, "data": manifest.model_dump(mode="json")}


def manifest_types() -> dict[str, type[Manifest]]:
    """Every ``Manifest`` subclass by class name: the ones here and those a workflow defines in its own
    folder (DPO's comparisons and reference logprobs), once its module is imported."""
    found: dict[str, type[Manifest]] = {}
    stack: list[type[Manifest]] = [Manifest]
    while stack:
        for sub in stack.pop().__subclasses__():
            found.setdefault(sub.__name__, sub)
            stack.append(sub)
    return found


def read_manifest_file(path: str | Path) -> Manifest:
    """A stored manifest, as the type it was written as."""
    import json

    payload = json.loads(Path(path).read_text())
    cls = manifest_types().get(payload.get("type", ""))
    if cls is None:
        raise ValueError(f"{path}: unknown manifest type {payload.get('type')!r}")
    return cls.model_validate(payload["data"])


class FeedbackDataManifest(Manifest):
    """One batch of stored feedback as training data files (``kitchen.feedback``)."""

    batch: str = Field(description="The batch's id: feedback with after_seq < seq <= last_seq.")
    after_seq: int
    last_seq: int
    store: str = Field(description="The feedback database read.")
    feedback: int = Field(description="Pieces of feedback in the batch.")
    pairs: int = Field(description="Preference pairs (prompt/chosen/rejected) the batch made.")
    sft_rows: int = Field(description="Corrected replies (chat messages) the batch made.")
    pairs_path: str | None = Field(default=None, description="prompt/chosen/rejected JSONL, for DPO.")
    pairs_hash: str | None = None
    sft_path: str | None = Field(default=None, description="messages JSONL, for supervised fine-tuning.")
    sft_hash: str | None = None
    skipped: dict[str, int] = Field(default_factory=dict, description="Unused feedback parts by reason.")
    by_version: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="Served version -> feedback, pairs and sft_rows from it."
    )
    model_names: list[str] = Field(
        default_factory=list, description="Registered models the feedback rates, most recent last."
    )
