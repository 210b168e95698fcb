"""What DPO's own assets return: where the paired datums and the reference log-probabilities live."""

from __future__ import annotations

from pydantic import Field

from kitchen.manifests import Manifest


class ComparisonsManifest(Manifest):
    """Preference pairs rendered into datums, chosen then rejected, one Parquet file per split."""

    train_path: str = Field(description="Datums of the training pairs: chosen, rejected, chosen, ...")
    test_path: str
    pairs_path: str = Field(description="JSON: the dataset row each kept pair came from, per split.")
    content_hash: str
    tokenizer_hash: str
    num_pairs: int
    num_test_pairs: int
    num_tokens: int
    trained_tokens: int = Field(description="Reply tokens of the training pairs (those with weight 1).")
    max_length: int
    train_on: str = "last_assistant"
    truncated_pairs: int
    dropped_pairs: dict[str, int] = Field(default_factory=dict)


class ReferenceLogprobsManifest(Manifest):
    """The frozen reference model's per-token log-probabilities of every comparison datum's targets."""

    train_path: str
    test_path: str
    content_hash: str
    comparisons_hash: str = Field(description="The comparisons these were computed on.")
    reference_model: str = Field(
        description="The reference: the starting model (its registered version when it is one)."
    )
    reference_base_hash: str = Field(description="Content hash of the reference's base weights.")
    reference_sampler_path: str | None = Field(
        default=None, description="The adapter the reference carries (a registered starting model)."
    )
    backend: str
    num_sequences: int
    seconds: float
