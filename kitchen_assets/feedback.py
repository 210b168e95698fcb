"""The optional ``feedback/training_data`` asset: feedback on served replies as DPO pairs and SFT rows.

Off by default, like ``deployment``: ``KITCHEN_FEEDBACK=on`` in the code location's environment adds it,
with ``feedback_job`` and the retraining sensor (``jobs.feedback``). It reads the store ``kitchen serve``
writes: ``KITCHEN_FEEDBACK_DB``, default ``$KITCHEN_HOME/feedback.db`` (serve's ``--feedback-db`` default).

One asset in its own ``feedback`` group rather than one per workflow: the store is one per home and holds
feedback on whatever version was served, whichever workflow trained it, and one batch feeds DPO (its
pairs) or SFT (its corrections); so each batch is read once, written once and counted once, and the
retraining sensor picks the workflow.

Each materialisation is one batch: the feedback after where the last batch ended (or the ``after_seq`` /
``last_seq`` the sensor asks for), written by ``kitchen.feedback`` as content-named JSONL under
``$KITCHEN_HOME/feedback/batches/<batch>/``; the metadata counts pairs, rows and skips, per served version.
"""

# No ``from __future__ import annotations``: Dagster reads the config type from the signature.
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import dagster as dg
from pydantic import Field

from kitchen import telemetry
from kitchen.feedback import build_training_data, write_training_data
from kitchen.manifests import FeedbackDataManifest
from kitchen.serve.feedback import FeedbackStore, default_feedback_path
from kitchen.telemetry.events import FEEDBACK_BATCH
from kitchen.workflows import Workflow
from kitchen_assets.telemetry import instrumented

GROUP = "feedback"
FEEDBACK_KEY = dg.AssetKey([GROUP, "training_data"])
ENABLE_ENV = "KITCHEN_FEEDBACK"
DB_ENV = "KITCHEN_FEEDBACK_DB"


@dataclass(frozen=True)
class FeedbackSettings:
    db: Path | None = None
    """The feedback store; None: ``$KITCHEN_HOME/feedback.db``, resolved when read (the home may differ)."""

    @property
    def path(self) -> Path:
        return self.db if self.db is not None else default_feedback_path()


def feedback_settings() -> FeedbackSettings | None:
    """``KITCHEN_FEEDBACK=on`` (and ``KITCHEN_FEEDBACK_DB``) from the environment; None (the default): off."""
    value = os.environ.get(ENABLE_ENV, "").strip().lower()
    if value in ("", "off", "0", "false", "no"):
        return None
    if value not in ("on", "1", "true", "yes"):
        raise ValueError(f"{ENABLE_ENV}={value!r}: expected 'on' or 'off'")
    db = os.environ.get(DB_ENV, "").strip()
    return FeedbackSettings(Path(db).expanduser().resolve() if db else None)


class FeedbackBatchConfig(dg.Config):
    after_seq: int | None = Field(
        default=None, ge=0, description="Start after this feedback seq; default: where the last batch ended."
    )
    last_seq: int | None = Field(
        default=None, ge=0, description="End at this feedback seq (included); default: the newest feedback."
    )


def feedback_assets(
    settings: FeedbackSettings | None, workflows: list[Workflow]
) -> list[dg.AssetsDefinition]:
    if settings is None:
        return []
    if any(w.name == GROUP for w in workflows):
        raise ValueError(
            f"{ENABLE_ENV}=on: a workflow named {GROUP!r} already owns the {GROUP!r} asset group"
        )
    return [feedback_asset(settings)]


def last_batch_end(instance: dg.DagsterInstance) -> int:
    """The ``last_seq`` of the latest materialised batch; 0 when none was."""
    event = instance.get_latest_materialization_event(FEEDBACK_KEY)
    materialization = event.asset_materialization if event is not None else None
    if materialization is None or "last_seq" not in materialization.metadata:
        return 0
    return int(materialization.metadata["last_seq"].value)  # type: ignore[arg-type]


def _version_table(manifest: FeedbackDataManifest) -> str:
    lines = ["| served version | feedback | pairs | SFT rows |", "|---|---:|---:|---:|"]
    for version, counts in sorted(manifest.by_version.items()):
        lines.append(f"| {version} | {counts['feedback']} | {counts['pairs']} | {counts['sft_rows']} |")
    return "\n".join(lines)


@cache
def feedback_asset(settings: FeedbackSettings) -> dg.AssetsDefinition:
    """Built once per settings: every ``Definitions`` (local or Tinker backend) shares it."""

    @dg.asset(
        key=FEEDBACK_KEY,
        group_name=GROUP,
        kinds={"sqlite"},
        description="Feedback on served replies since the last batch, as training data: prompt/chosen/"
        "rejected pairs (DPO) and corrected replies as chat messages (SFT), JSONL under "
        "$KITCHEN_HOME/feedback/batches/.",
    )
    @instrumented
    def training_data(context: dg.AssetExecutionContext, config: FeedbackBatchConfig) -> FeedbackDataManifest:
        path = settings.path
        if not path.is_file():
            raise dg.Failure(
                description=f"no feedback store at {path}: `kitchen serve` writes it when feedback is posted "
                f"(or set {DB_ENV} to its --feedback-db)",
                allow_retries=False,
            )
        after = config.after_seq if config.after_seq is not None else last_batch_end(context.instance)
        if config.last_seq is not None and config.last_seq < after:
            raise dg.Failure(description=f"last_seq {config.last_seq} is before after_seq {after}")
        data = build_training_data(FeedbackStore(path).feedback(), after, config.last_seq)
        written = write_training_data(data)
        manifest = FeedbackDataManifest(
            batch=data.batch.id,
            after_seq=data.batch.after_seq,
            last_seq=data.batch.last_seq,
            store=str(path),
            feedback=data.feedback,
            pairs=len(data.pairs),
            sft_rows=len(data.sft_rows),
            pairs_path=str(written.pairs_path) if written.pairs_path else None,
            pairs_hash=written.pairs_hash,
            sft_path=str(written.sft_path) if written.sft_path else None,
            sft_hash=written.sft_hash,
            skipped=dict(sorted(data.skipped.items())),
            by_version={
                v: {"feedback": c.feedback, "pairs": c.pairs, "sft_rows": c.sft_rows}
                for v, c in sorted(data.by_version.items())
            },
            model_names=data.model_names,
        )
        context.log.info(
            f"feedback batch {manifest.batch}: {manifest.feedback} pieces of feedback -> "
            f"{manifest.pairs} pairs, {manifest.sft_rows} SFT rows; skipped {manifest.skipped or 'none'}"
        )
        telemetry.emit(
            FEEDBACK_BATCH,
            {
                "feedback": manifest.feedback,
                "pairs": manifest.pairs,
                "sft_rows": manifest.sft_rows,
                "skipped": sum(manifest.skipped.values()),
            },
            {
                "batch": manifest.batch,
                "after_seq": manifest.after_seq,
                "last_seq": manifest.last_seq,
                "by_version": manifest.by_version,
                "skipped_by_reason": manifest.skipped,
            },
        )
        files = {
            name: dg.MetadataValue.path(value)
            for name, value in (("pairs_path", manifest.pairs_path), ("sft_path", manifest.sft_path))
            if value is not None
        }
        context.add_output_metadata(
            {
                "batch": manifest.batch,
                "after_seq": manifest.after_seq,
                "last_seq": manifest.last_seq,
                "feedback": manifest.feedback,
                "pairs": manifest.pairs,
                "sft_rows": manifest.sft_rows,
                "skipped": dg.MetadataValue.json(manifest.skipped),
                "by_version": dg.MetadataValue.md(_version_table(manifest)),
                **files,
                "pairs_hash": manifest.pairs_hash or "",
                "sft_hash": manifest.sft_hash or "",
            }
        )
        return manifest

    return training_data
