"""The first two assets of every workflow: the base model and the dataset, keyed ``<workflow>/<kind>``."""

from __future__ import annotations

from typing import Any

import dagster as dg

from kitchen.data import save_dataset
from kitchen.data.decontaminate import decontaminate
from kitchen.manifests import BaseModelManifest, DatasetManifest
from kitchen.registry.starting import is_registered_ref, resolve_registered_base
from kitchen.workflows import Workflow
from kitchen_assets.factory import workflow_asset
from kitchen_assets.metadata import markdown_table
from resources.embeddings import EmbeddingsResource
from resources.mlflow_registry import MlflowRegistry
from resources.training import TrainingBackend
from resources.vector_store import VectorStoreResource


def load_tokenizer(base_model: BaseModelManifest) -> Any:
    """The tokenizer that renders datums and decodes samples for ``base_model``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model.tokenizer_path)


def resolve_model(name: str, training: TrainingBackend, registry: MlflowRegistry) -> BaseModelManifest:
    """A model name as the training backend trains on it; ``models:/NAME@alias`` starts from that version."""
    if is_registered_ref(name):
        return resolve_registered_base(
            registry.registry(),
            name,
            resolve_base=training.resolve_base_model,
            starting_state=training.starting_state,
        )
    return training.resolve_base_model(name)


def model_metadata(config_model: str, manifest: BaseModelManifest) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "model": config_model,
        "source": manifest.source,
        "backend_model": manifest.backend_model,
        "content_hash": manifest.content_hash,
        "revision": manifest.revision or "",
        "parameters": manifest.num_parameters or 0,
        "architecture": manifest.architecture or "",
        "path": dg.MetadataValue.path(manifest.path) if manifest.path else "",
    }
    if manifest.registered_version:
        metadata["registered_version"] = manifest.registered_version
        metadata["starts_from"] = manifest.init_state or ""
    return metadata


def base_model_asset(workflow: Workflow) -> dg.AssetsDefinition:
    @workflow_asset(
        workflow,
        "base_model",
        kinds={"huggingface"},
        description="The model training starts from, resolved to what the training backend loads "
        "(content-hashed); a registered model (models:/NAME@champion) brings its adapter.",
    )
    def base_model(
        context: dg.AssetExecutionContext, config: Any, training: TrainingBackend, registry: MlflowRegistry
    ) -> BaseModelManifest:
        training.preflight()
        registry.preflight()  # the registration at the end of the graph must not find the store gone
        manifest = resolve_model(config.model, training, registry)
        context.add_output_metadata(model_metadata(config.model, manifest))
        return manifest

    return base_model


def dataset_asset(workflow: Workflow) -> dg.AssetsDefinition:
    @workflow_asset(
        workflow,
        "dataset",
        kinds={"huggingface"},
        description="The dataset normalised to this workflow's rows, with train and test splits "
        "(save_to_disk); malformed rows are skipped and counted by reason, exact duplicates removed and "
        "counted, and (--decontaminate) held-out near duplicates of training prompts dropped.",
    )
    def dataset(
        context: dg.AssetExecutionContext,
        config: Any,
        embeddings: EmbeddingsResource,
        vector_store: VectorStoreResource,
    ) -> DatasetManifest:
        loaded = workflow.load_dataset(config)
        near: dict[str, Any] = {}
        if config.decontaminate:
            loaded, report = decontaminate(
                loaded,
                embeddings,
                vector_store,
                threshold=config.decontaminate_threshold,
                drop=not config.decontaminate_keep,
                progress=context.log.info,
            )
            near = report.as_dict()
            context.log.info(
                f"decontamination: {report.flagged} of {report.test_rows} held-out rows at cosine >= "
                f"{report.threshold} ({report.dropped} dropped) in {report.seconds:.1f} s"
            )
        manifest = loaded.manifest(save_dataset(loaded)).model_copy(update={"decontamination": near})
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
                "dedup": dg.MetadataValue.json(manifest.dedup),
                **({"decontamination": dg.MetadataValue.json(near)} if near else {}),
                "preview": dg.MetadataValue.md(markdown_table(loaded.preview_rows())),
                "path": dg.MetadataValue.path(manifest.path),
            }
        )
        return manifest

    return dataset
