"""The DPO workflow's own assets: ``dpo/comparisons`` and ``dpo/reference_logprobs`` (its standard assets come
from the factory)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import dagster as dg

from kitchen.data import load_saved_dataset, tokenizer_fingerprint
from kitchen.manifests import BaseModelManifest, DatasetManifest
from kitchen.workflows import Workflow
from kitchen.workflows.context import starting_sampling_client
from kitchen.workflows.dpo import reference_name
from kitchen.workflows.dpo.comparisons import read_pair_datums, render_pairs, save_comparisons
from kitchen.workflows.dpo.manifests import ComparisonsManifest, ReferenceLogprobsManifest
from kitchen.workflows.dpo.reference import (
    load_stored_reference,
    reference_directory,
    save_reference_logprobs,
    target_logprobs,
)
from kitchen_assets.common import load_tokenizer
from kitchen_assets.factory import workflow_asset
from resources.training import TrainingBackend


def comparisons_asset(workflow: Workflow) -> dg.AssetsDefinition:
    @workflow_asset(
        workflow,
        "comparisons",
        ins=("base_model", "dataset"),
        kinds={"parquet"},
        description="Preference pairs rendered through the chat template into datums, chosen then rejected "
        "(Parquet, one file a split); weight 1 on each reply's tokens. A pair that cannot be rendered is "
        "dropped whole and counted.",
    )
    def comparisons(
        context: dg.AssetExecutionContext,
        config: Any,
        base_model: BaseModelManifest,
        dataset: DatasetManifest,
    ) -> ComparisonsManifest:
        tokenizer = load_tokenizer(base_model)
        splits = load_saved_dataset(dataset.path)
        train = render_pairs(splits["train"], tokenizer, config.max_length)
        if not train:
            raise ValueError(
                f"no training pairs remain after rendering (dropped: {dict(train.dropped)}); "
                f"raise --max-length (now {config.max_length}) or check the dataset"
            )
        test = render_pairs(splits["test"], tokenizer, config.max_length)
        manifest = save_comparisons(
            train, test, tokenizer_hash=tokenizer_fingerprint(tokenizer), max_length=config.max_length
        )
        context.add_output_metadata(
            {
                "pairs": manifest.num_pairs,
                "test_pairs": manifest.num_test_pairs,
                "tokens": manifest.num_tokens,
                "reply_tokens": manifest.trained_tokens,
                "truncated_pairs": manifest.truncated_pairs,
                "dropped_pairs": dg.MetadataValue.json(manifest.dropped_pairs),
                "content_hash": manifest.content_hash,
                "path": dg.MetadataValue.path(str(Path(manifest.train_path).parent)),
            }
        )
        return manifest

    return comparisons


def reference_logprobs_asset(workflow: Workflow) -> dg.AssetsDefinition:
    @workflow_asset(
        workflow,
        "reference_logprobs",
        ins=("base_model", "comparisons"),
        kinds={"parquet"},
        description="The frozen reference (the starting model) scored once on every comparison datum "
        "through its sampling client's compute_logprobs: a rerun with a new beta reuses them, and the "
        "lineage names the reference.",
    )
    def reference_logprobs(
        context: dg.AssetExecutionContext,
        config: Any,
        training: TrainingBackend,
        base_model: BaseModelManifest,
        comparisons: ComparisonsManifest,
    ) -> ReferenceLogprobsManifest:
        reference = reference_name(base_model)
        identity = {
            "comparisons": comparisons.content_hash,
            "reference": [base_model.content_hash, base_model.sampler_path],
            "backend": training.backend_name,
        }
        directory = reference_directory(identity)
        stored = load_stored_reference(directory)
        reused = stored is not None
        if stored is not None:
            context.log.info(f"reusing the reference log-probabilities of {reference} stored at {directory}")
        else:
            started = time.perf_counter()
            service = training.service_client()
            try:
                client = starting_sampling_client(service, base_model)
                splits = {}
                for split, path in (("train", comparisons.train_path), ("test", comparisons.test_path)):
                    datums = read_pair_datums(path)
                    splits[split] = target_logprobs(client, datums, log=context.log.info, label=f"{split}: ")
            finally:
                service.close()
            stored = save_reference_logprobs(splits, directory, seconds=time.perf_counter() - started)
        manifest = ReferenceLogprobsManifest(
            train_path=str(directory / "train.parquet"),
            test_path=str(directory / "test.parquet"),
            content_hash=stored.content_hash,
            comparisons_hash=comparisons.content_hash,
            reference_model=reference,
            reference_base_hash=base_model.content_hash,
            reference_sampler_path=base_model.sampler_path,
            backend=training.backend_name,
            num_sequences=stored.num_sequences,
            seconds=stored.seconds,
        )
        context.add_output_metadata(
            {
                "reference_model": reference,
                "sequences": manifest.num_sequences,
                "computed_in_seconds": stored.seconds,
                "reused": dg.MetadataValue.bool(reused),
                "content_hash": stored.content_hash,
                "path": dg.MetadataValue.path(str(directory)),
            }
        )
        return manifest

    return reference_logprobs


def assets(workflow: Workflow) -> list[dg.AssetsDefinition]:
    return [comparisons_asset(workflow), reference_logprobs_asset(workflow)]
