"""Asset factories shared by every workflow: base model, dataset and datums, keyed ``<workflow>/<name>``.

Each workflow (supervised, dpo, rl, distillation) calls these with its own name, so the same kinds of
asset exist once per workflow group with their own lineage and config.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from kitchen.data import (
    build_datums,
    load_dataset_source,
    load_saved_dataset,
    save_dataset,
    save_datums,
    tokenizer_fingerprint,
)
from kitchen.manifests import BaseModelManifest, DatasetManifest, DatumsManifest
from kitchen_assets.config import DatasetConfig, DatumsConfig, ModelConfig
from kitchen_assets.metadata import histogram_markdown, markdown_table
from kitchen_assets.telemetry import instrumented
from resources.mlflow_registry import MlflowRegistry
from resources.training import TrainingBackend


def load_tokenizer(base_model: BaseModelManifest):
    """The tokenizer that renders datums and decodes samples for ``base_model``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model.tokenizer_path)


def _preview_row(row: Mapping[str, Any]) -> dict[str, str]:
    """One table row per conversation: its turns, role-tagged."""
    turns = " / ".join(f"{m['role']}: {m['content']}" for m in row["messages"])
    return {"conversation": turns, "answer": str(row.get("answer") or "")}


def base_model_asset(workflow: str) -> dg.AssetsDefinition:
    @dg.asset(
        name="base_model",
        key_prefix=[workflow],
        group_name=workflow,
        kinds={"huggingface"},
        description="The base model resolved to what the training backend loads (content-hashed).",
    )
    @instrumented
    def base_model(
        context: dg.AssetExecutionContext,
        config: ModelConfig,
        training: TrainingBackend,
        registry: MlflowRegistry,
    ) -> BaseModelManifest:
        training.preflight()
        registry.preflight()  # the registration at the end of the graph must not find the store gone
        manifest = training.resolve_base_model(config.model)
        context.add_output_metadata(
            {
                "model": config.model,
                "source": manifest.source,
                "backend_model": manifest.backend_model,
                "content_hash": manifest.content_hash,
                "revision": manifest.revision or "",
                "parameters": manifest.num_parameters or 0,
                "architecture": manifest.architecture or "",
                "path": dg.MetadataValue.path(manifest.path) if manifest.path else "",
            }
        )
        return manifest

    return base_model


def dataset_asset(workflow: str) -> dg.AssetsDefinition:
    @dg.asset(
        name="dataset",
        key_prefix=[workflow],
        group_name=workflow,
        kinds={"huggingface"},
        description="The dataset normalised to chat messages, with train and test splits (save_to_disk).",
    )
    @instrumented
    def dataset(context: dg.AssetExecutionContext, config: DatasetConfig) -> DatasetManifest:
        loaded = load_dataset_source(
            config.dataset,
            test_size=config.test_size,
            seed=config.data_seed,
            max_rows=config.max_rows,
            revision=config.dataset_revision,
        )
        manifest = loaded.manifest(save_dataset(loaded))
        context.add_output_metadata(
            {
                "dataset": config.dataset,
                "source": manifest.source,
                "schema": manifest.schema_found,
                "revision_or_hash": manifest.revision or manifest.content_hash,
                "train_rows": manifest.train_rows,
                "test_rows": manifest.test_rows,
                "test_split": manifest.test_split_source,
                "skipped_rows": dg.MetadataValue.json(manifest.skipped_rows),
                "skipped_examples": dg.MetadataValue.json(manifest.skipped_examples),
                "preview": dg.MetadataValue.md(markdown_table([_preview_row(r) for r in loaded.preview])),
                "path": dg.MetadataValue.path(manifest.path),
            }
        )
        return manifest

    return dataset


def datums_asset(workflow: str) -> dg.AssetsDefinition:
    @dg.asset(
        name="datums",
        key_prefix=[workflow],
        group_name=workflow,
        kinds={"parquet"},
        ins={
            "base_model": dg.AssetIn(key=[workflow, "base_model"]),
            "dataset": dg.AssetIn(key=[workflow, "dataset"]),
        },
        description="Rows rendered through the chat template into tinker Datums (Parquet, one file a split).",
    )
    @instrumented
    def datums(
        context: dg.AssetExecutionContext,
        config: DatumsConfig,
        base_model: BaseModelManifest,
        dataset: DatasetManifest,
    ) -> DatumsManifest:
        tokenizer = load_tokenizer(base_model)
        built = build_datums(
            load_saved_dataset(dataset.path),
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
