"""Chat rows rendered into tinker ``Datum``s (Parquet): SFT trains on them, and so does off-policy
distillation on a teacher's samples. One factory, the source kind a parameter.

A source that is not used in this run's mode (``NotUsedManifest``: the teacher samples of an on-policy
distillation) passes through: no datums, the reason recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg

from kitchen.data import build_datums, load_saved_dataset, save_datums, tokenizer_fingerprint
from kitchen.manifests import (
    BaseModelManifest,
    DatasetManifest,
    Manifest,
    NotUsedManifest,
    TeacherSamplesManifest,
)
from kitchen.workflows import Workflow
from kitchen_assets.common import load_tokenizer
from kitchen_assets.factory import workflow_asset
from kitchen_assets.metadata import histogram_markdown


def chat_datums_asset(
    workflow: Workflow, *, source: str = "dataset", kind: str = "datums"
) -> dg.AssetsDefinition:
    """``<workflow>/<kind>``: the ``source`` asset's chat rows through the base model's chat template."""

    @workflow_asset(
        workflow,
        kind,
        ins={"base_model": "base_model", "rows": source},
        kinds={"parquet"},
        description="Rows rendered through the chat template into tinker Datums (Parquet, one file a split).",
    )
    def datums(
        context: dg.AssetExecutionContext, config: Any, base_model: BaseModelManifest, rows: Manifest
    ) -> Manifest:
        if isinstance(rows, NotUsedManifest):
            context.add_output_metadata({"not_used": rows.reason})
            return rows
        if not isinstance(rows, DatasetManifest | TeacherSamplesManifest):
            raise TypeError(f"{source} holds {type(rows).__name__}, not chat rows")
        tokenizer = load_tokenizer(base_model)
        built = build_datums(
            load_saved_dataset(rows.path),
            tokenizer,
            train_on=config.train_on,
            max_length=config.max_length,
        )
        if not built.train:
            raise ValueError(
                f"no training datums remain after rendering (dropped: {built.train_stats.dropped}); "
                f"raise --max-length (now {config.max_length}) or check the dataset"
            )
        manifest = save_datums(built, tokenizer_fingerprint(tokenizer))
        stats = built.train_stats
        context.add_output_metadata(
            {
                "datums": manifest.num_datums,
                "test_datums": manifest.num_test_datums,
                "tokens": manifest.num_tokens,
                "trained_tokens": manifest.trained_tokens,
                "truncated_rows": manifest.truncated_rows,
                "dropped_rows": dg.MetadataValue.json(manifest.dropped_rows),
                "length_histogram": dg.MetadataValue.md(histogram_markdown(stats.length_histogram)),
                "mean_tokens": stats.mean_tokens,
                "max_tokens": stats.max_tokens,
                "content_hash": manifest.content_hash,
                "train_on": config.train_on,
                "path": dg.MetadataValue.path(str(Path(manifest.train_path).parent)),
            }
        )
        return manifest

    return datums
