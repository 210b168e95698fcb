"""The distillation workflow's own assets: ``teacher_model``, ``teacher_samples`` and ``datums`` (the shared
chat-datums factory over the teacher's samples). Its standard assets come from the factory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
from datasets import Dataset, DatasetDict

from kitchen.atomic import atomic_directory
from kitchen.contract import BackendUnavailableError
from kitchen.data import NORMALIZED_FEATURES, load_saved_dataset, tokenizer_fingerprint
from kitchen.data.sources import content_hash
from kitchen.hashing import hash_json
from kitchen.home import home_dir
from kitchen.manifests import (
    BaseModelManifest,
    DatasetManifest,
    Manifest,
    NotUsedManifest,
    TeacherManifest,
    TeacherSamplesManifest,
)
from kitchen.registry.store import RegistryError
from kitchen.workflows import Workflow
from kitchen.workflows.context import starting_sampling_client
from kitchen.workflows.distillation.config import DEFAULT_TEACHER, MISSING_TEACHER_HINT
from kitchen.workflows.distillation.prompts import count_replies
from kitchen.workflows.distillation.teacher import mismatch_message, sample_teacher, tokenizer_differences
from kitchen_assets.common import load_tokenizer, model_metadata, resolve_model
from kitchen_assets.datums import chat_datums_asset
from kitchen_assets.factory import workflow_asset
from kitchen_assets.metadata import markdown_table
from resources.mlflow_registry import MlflowRegistry
from resources.training import TrainingBackend

#: Dataset prompts rendered by both tokenizers in the compatibility check (besides a fixed probe).
PROMPTS_CHECKED = 8
MANIFEST_FILE = "manifest.json"
ON_POLICY_REASON = (
    "not used in on_policy mode: the student samples its own completions during training and the teacher "
    "scores them there"
)


def teacher_resolution_error(name: str, err: Exception) -> str:
    """One line: the teacher could not be resolved, and for the default, the command that makes it."""
    message = f"teacher {name!r} could not be resolved: {err}"
    if name.strip() == DEFAULT_TEACHER:
        message += f". {MISSING_TEACHER_HINT}"
    return message


def assets(workflow: Workflow) -> list[dg.AssetsDefinition]:
    return [
        teacher_model_asset(workflow),
        teacher_samples_asset(workflow),
        chat_datums_asset(workflow, source="teacher_samples"),
    ]


def teacher_model_asset(workflow: Workflow) -> dg.AssetsDefinition:
    @workflow_asset(
        workflow,
        "teacher_model",
        ins=("base_model", "dataset"),
        kinds={"huggingface"},
        description="The teacher, resolved like the base model (hash, revision, registered version), and the "
        "run's mode; on-policy mode refuses a teacher that tokenizes prompts differently from the student.",
    )
    def teacher_model(
        context: dg.AssetExecutionContext,
        config: Any,
        training: TrainingBackend,
        registry: MlflowRegistry,
        base_model: BaseModelManifest,
        dataset: DatasetManifest,
    ) -> TeacherManifest:
        try:
            model = resolve_model(config.teacher, training, registry)
        except (RegistryError, ValueError, OSError, BackendUnavailableError) as err:
            raise dg.Failure(
                description=teacher_resolution_error(config.teacher, err), allow_retries=False
            ) from err
        student_tokenizer, teacher_tokenizer = load_tokenizer(base_model), load_tokenizer(model)
        train = load_saved_dataset(dataset.path)["train"]
        prompts = [row["messages"] for row in train.select(range(min(PROMPTS_CHECKED, len(train))))]
        differences = tokenizer_differences(student_tokenizer, teacher_tokenizer, prompts)
        if differences and config.mode == "on_policy":
            raise dg.Failure(
                description=mismatch_message(config.teacher, base_model.name, differences),
                allow_retries=False,
            )
        if differences:
            context.log.warning(
                f"teacher and student tokenize differently ({'; '.join(differences)}): off-policy "
                "distillation goes through the teacher's text; held-out teacher_kl is not computed"
            )
        manifest = TeacherManifest(
            name=config.teacher,
            model=model,
            content_hash=model.content_hash,
            registered_version=model.registered_version,
            mode=config.mode,
            same_tokenizer=not differences,
            tokenizer_differences=differences,
            teacher_tokenizer_hash=tokenizer_fingerprint(teacher_tokenizer),
            student_tokenizer_hash=tokenizer_fingerprint(student_tokenizer),
        )
        context.add_output_metadata(
            {
                **model_metadata(config.teacher, model),
                "mode": config.mode,
                "student": base_model.name,
                "same_tokenizer": manifest.same_tokenizer,
                "tokenizer_differences": dg.MetadataValue.json(differences),
            }
        )
        return manifest

    return teacher_model


def samples_key(
    teacher: TeacherManifest, dataset: DatasetManifest, config: Any, backend: str, prompts: int
) -> str:
    """Everything the samples depend on: a student rerun with the same ones reuses them, not resamples."""
    return hash_json(
        {
            "prompts_sampled": prompts,
            "teacher": teacher.content_hash,
            "teacher_model": teacher.model.backend_model,
            "teacher_adapter": teacher.model.sampler_path,
            "prompts": dataset.content_hash,
            "backend": backend,
            "sampling": sampling_settings(config),
        }
    )


def sampling_settings(config: Any) -> dict[str, float | int | str]:
    return {
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
        "samples_per_prompt": config.samples_per_prompt,
        "seed": config.sample_seed,
    }


def _save(
    rows: list[dict[str, Any]], target: Path, manifest: TeacherSamplesManifest
) -> TeacherSamplesManifest:
    """Write the samples (a train/test ``DatasetDict``, test empty) and their manifest into ``target``
    atomically: a directory that exists is complete."""
    data = DatasetDict(
        {
            "train": Dataset.from_list(rows, features=NORMALIZED_FEATURES),
            "test": Dataset.from_dict(
                {name: [] for name in NORMALIZED_FEATURES}, features=NORMALIZED_FEATURES
            ),
        }
    )
    manifest = manifest.model_copy(update={"path": str(target / "data"), "content_hash": content_hash(data)})
    # A concurrent run's identical samples may win the rename: fine.
    with atomic_directory(target, already_done=lambda t: (t / MANIFEST_FILE).is_file()) as staging:
        data.save_to_disk(str(staging / "data"), num_shards={"train": 1, "test": 1})  # an empty test
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest.model_dump(mode="json"), indent=1))
    return manifest


def teacher_samples_asset(workflow: Workflow) -> dg.AssetsDefinition:
    @workflow_asset(
        workflow,
        "teacher_samples",
        ins=("teacher_model", "dataset"),
        kinds={"huggingface"},
        description="Off-policy: the teacher's completions for the training prompts the run trains on "
        "(sampling settings recorded; reused by a rerun with the same teacher, prompts and settings). "
        "On-policy: not used.",
    )
    def teacher_samples(
        context: dg.AssetExecutionContext,
        config: Any,
        training: TrainingBackend,
        teacher_model: TeacherManifest,
        dataset: DatasetManifest,
    ) -> Manifest:
        splits = load_saved_dataset(dataset.path)
        replies = count_replies(splits["train"]) + count_replies(splits["test"])
        if teacher_model.mode == "on_policy":
            context.add_output_metadata({"not_used": ON_POLICY_REASON, "replies_ignored": replies})
            return NotUsedManifest(reason=ON_POLICY_REASON)
        available = len(splits["train"])
        wanted = config.prompts_to_sample(available)
        key = samples_key(teacher_model, dataset, config, training.backend_name, wanted)
        target = home_dir("teacher_samples") / key[:16]
        record = target / MANIFEST_FILE
        if record.is_file():
            manifest = TeacherSamplesManifest.model_validate_json(record.read_text()).model_copy(
                update={"reused": True}
            )
            context.log.info(
                f"reusing the teacher's samples in {target} (same teacher, prompts and settings)"
            )
        else:
            prompts = [dict(row) for row in splits["train"].select(range(wanted))]
            context.log.info(
                f"sampling the teacher on {wanted} of {available} training prompts (what "
                f"--max-steps {config.max_steps} x --batch-size {config.batch_size} trains on)"
                if wanted < available
                else f"sampling the teacher on all {available} training prompts"
            )
            service = training.service_client()
            try:
                client = starting_sampling_client(service, teacher_model.model)
                samples = sample_teacher(
                    client,
                    prompts,
                    samples_per_prompt=config.samples_per_prompt,
                    max_tokens=config.max_tokens,
                    temperature=config.temperature,
                    seed=config.sample_seed,
                )
            finally:
                service.close()
            if not samples.rows:
                raise dg.Failure(
                    description=f"the teacher's replies were all empty ({dict(samples.dropped)}); raise "
                    "--max-tokens or check the teacher",
                    allow_retries=False,
                )
            context.log.info(f"sampled {len(samples.rows)} teacher replies in {samples.seconds:.1f}s")
            manifest = TeacherSamplesManifest(
                path="",
                content_hash="",
                teacher=teacher_model.registered_version or teacher_model.name,
                teacher_hash=teacher_model.content_hash,
                prompts_hash=dataset.content_hash,
                sampling=sampling_settings(config),
                train_rows=len(samples.rows),
                prompts=len(prompts),
                dropped=dict(samples.dropped),
                truncated=samples.truncated,
                replies_ignored=replies,
            )
            manifest = _save(samples.rows, target, manifest)
        preview = load_saved_dataset(manifest.path)["train"].select(range(min(3, manifest.train_rows)))
        context.add_output_metadata(
            {
                "teacher": manifest.teacher,
                "sampling": dg.MetadataValue.json(manifest.sampling),
                "samples": manifest.train_rows,
                "prompts": manifest.prompts,
                "prompts_available": available,
                "dropped": dg.MetadataValue.json(manifest.dropped),
                "truncated": manifest.truncated,
                "replies_ignored": replies,
                "reused": manifest.reused,
                "content_hash": manifest.content_hash,
                "preview": dg.MetadataValue.md(
                    markdown_table(
                        [
                            {
                                "prompt": row["messages"][-2]["content"],
                                "teacher": row["messages"][-1]["content"],
                            }
                            for row in preview
                        ]
                    )
                ),
                "path": dg.MetadataValue.path(manifest.path),
            }
        )
        return manifest

    return teacher_samples
