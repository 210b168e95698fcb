"""Retraining on served feedback: ``feedback_job`` and ``<workflow>_feedback_sensor``.

They exist when the ``feedback/training_data`` asset does (``KITCHEN_FEEDBACK=on``). The sensor retrains
``dpo`` on the batch's preference pairs when a ``dpo`` workflow is registered, else ``supervised`` on its
corrected replies (``KITCHEN_FEEDBACK_WORKFLOW`` picks another). Its settings follow the retraining
sensor's naming, ``KITCHEN_<WORKFLOW>_FEEDBACK_<SETTING>``:

- ``THRESHOLD``: new pairs (DPO) or corrected replies (SFT) that start a run; default 16.
- ``MODEL``: where training starts; default ``models:/NAME@champion`` of the registered model the batch's
  feedback rates (what ``kitchen serve`` served, from the completions' versions).
- ``RUN_CONFIG``: a JSON or YAML file with the flat run config of the retraining runs (steps, gate, ...);
  ``dataset`` and ``model`` are set per batch, and ``registered_model_name`` defaults to the served NAME,
  so the usual gate and champion rule decide whether the new version replaces the served one (which a
  ``kitchen serve`` of ``NAME@champion`` then picks up).
- ``SENSOR``: ``running`` or ``stopped`` when first loaded; default ``stopped`` (each run trains a model).
- ``INTERVAL``: seconds between ticks, default 300.

One batch goes through two ticks. First, when enough new feedback has arrived since the last batch that
trained, a ``feedback_job`` run materialises exactly that batch (run key ``feedback-<batch>``). Then, once
that batch is the asset's latest materialisation, a ``<workflow>_job`` run trains on its file (run key
``<workflow>-feedback-<batch>``, tags ``kitchen/feedback_batch`` and ``kitchen/feedback_last_seq``).
Where the last trained batch ended is the cursor, or the newest such run's tag when that is later, so a
reset cursor trains no feedback twice. A failed retraining run is not retried with new feedback; re-execute
it from the UI.
"""

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import yaml
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition
from pydantic import ValidationError

from jobs.sensors import DATASET_TAG, TRIGGER_TAG, env_number, env_status
from jobs.workflow_jobs import job_name
from kitchen.feedback import build_training_data
from kitchen.manifests import FeedbackDataManifest, read_manifest_file
from kitchen.registry.names import parse_model_ref
from kitchen.serve.feedback import FeedbackStore
from kitchen.workflows import Workflow, get_workflow
from kitchen_assets.feedback import FEEDBACK_KEY, FeedbackSettings
from kitchen_assets.io import recorded_manifest_path

FEEDBACK_JOB = "feedback_job"
BATCH_TAG = "kitchen/feedback_batch"
LAST_SEQ_TAG = "kitchen/feedback_last_seq"
MODEL_TAG = "kitchen/feedback_model"
TRIGGER = "feedback"
WORKFLOW_ENV = "KITCHEN_FEEDBACK_WORKFLOW"
#: What each workflow trains on from a batch, in the order the default target is looked for.
TRAINS_ON = {"dpo": "pairs", "supervised": "sft"}
_NOUNS = {"pairs": "preference pairs", "sft": "corrected replies"}


def feedback_target() -> Workflow:
    """``KITCHEN_FEEDBACK_WORKFLOW``, else ``dpo`` when registered (it trains on pairs), else SFT."""
    chosen = os.environ.get(WORKFLOW_ENV, "").strip()
    for name in [chosen] if chosen else list(TRAINS_ON):
        try:
            workflow = get_workflow(name)
        except KeyError:
            if chosen:
                raise ValueError(f"{WORKFLOW_ENV}={chosen!r}: no such workflow") from None
            continue
        if workflow.name not in TRAINS_ON:
            raise ValueError(f"{WORKFLOW_ENV}={chosen!r}: feedback trains {' or '.join(TRAINS_ON)} only")
        return workflow
    raise ValueError(f"feedback retraining needs a registered {' or '.join(TRAINS_ON)} workflow")


def feedback_variable(workflow: Workflow, setting: str) -> str:
    return f"KITCHEN_{workflow.name.upper()}_FEEDBACK_{setting}"


@dataclass(frozen=True)
class FeedbackRetrainSettings:
    workflow: Workflow
    threshold: int = 16
    model: str | None = None
    run_config: Mapping[str, Any] = field(default_factory=dict)
    interval_seconds: int = 300
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.STOPPED

    def __post_init__(self) -> None:
        if self.workflow.name not in TRAINS_ON:
            raise ValueError(f"feedback retrains {' or '.join(TRAINS_ON)}, not {self.workflow.name!r}")
        if self.threshold < 1:
            raise ValueError(f"{feedback_variable(self.workflow, 'THRESHOLD')}: must be at least 1")
        self.workflow.config(**self.run_config)  # a bad file fails when the code location loads

    @property
    def trains_on(self) -> str:
        return TRAINS_ON[self.workflow.name]

    @classmethod
    def from_env(cls, workflow: Workflow) -> "FeedbackRetrainSettings":
        def var(setting: str) -> str:
            return feedback_variable(workflow, setting)

        run_config: dict[str, Any] = {}
        config_file = os.environ.get(var("RUN_CONFIG"), "").strip()
        if config_file:
            loaded = yaml.safe_load(Path(config_file).read_text())
            if not isinstance(loaded, dict):
                raise ValueError(f"{var('RUN_CONFIG')}={config_file}: expected a mapping of run config")
            run_config = loaded
        raw = os.environ.get(var("THRESHOLD"), "").strip() or "16"
        if not raw.isdigit():
            raise ValueError(f"{var('THRESHOLD')}={raw!r}: expected a whole number of pairs or replies")
        threshold = int(raw)
        try:
            return cls(
                workflow=workflow,
                threshold=threshold,
                model=os.environ.get(var("MODEL"), "").strip() or None,
                run_config=run_config,
                interval_seconds=int(env_number(var("INTERVAL"), 300)),
                default_status=env_status(var("SENSOR"), dg.DefaultSensorStatus.STOPPED),
            )
        except ValidationError as error:
            raise ValueError(f"{var('RUN_CONFIG')}={config_file}: not a valid run config: {error}") from error


def feedback_job() -> UnresolvedAssetJobDefinition:
    return dg.define_asset_job(
        name=FEEDBACK_JOB,
        selection=dg.AssetSelection.assets(FEEDBACK_KEY),
        description="Turn a batch of served feedback into training data (pairs and corrected replies).",
    )


def _latest_batch(instance: dg.DagsterInstance) -> FeedbackDataManifest | None:
    path = recorded_manifest_path(instance.get_latest_materialization_event(FEEDBACK_KEY))
    if path is None or not Path(path).is_file():
        return None
    manifest = read_manifest_file(path)
    return manifest if isinstance(manifest, FeedbackDataManifest) else None


def _trained_through(instance: dg.DagsterInstance, retrain_job: str) -> int:
    """Where the newest batch a retraining run was launched for ends, from the runs' tags."""
    runs = instance.get_runs(
        filters=dg.RunsFilter(job_name=retrain_job, tags={TRIGGER_TAG: TRIGGER}), limit=20
    )
    return max((int(r.tags[LAST_SEQ_TAG]) for r in runs if LAST_SEQ_TAG in r.tags), default=0)


def retraining_request(settings: FeedbackRetrainSettings, batch: FeedbackDataManifest) -> dg.RunRequest | str:
    """The ``<workflow>_job`` run for ``batch``, or why there can be none."""
    workflow = settings.workflow
    path = batch.pairs_path if settings.trains_on == "pairs" else batch.sft_path
    model = settings.model or (f"models:/{batch.model_names[-1]}@champion" if batch.model_names else None)
    if path is None:
        return f"feedback batch {batch.batch} has no {_NOUNS[settings.trains_on]}"
    if model is None:
        return (
            f"feedback batch {batch.batch} rates no registered version (a sampler path was served?): "
            f"set {feedback_variable(workflow, 'MODEL')}"
        )
    run_config: dict[str, Any] = {**settings.run_config, "dataset": path, "model": model}
    if "registered_model_name" not in run_config and model.startswith("models:/"):
        run_config["registered_model_name"] = parse_model_ref(model).name
    try:
        workflow.config(**run_config)
    except ValidationError as error:
        return f"the run config for feedback batch {batch.batch} is not valid: {error}"
    return dg.RunRequest(
        run_key=f"{workflow.name}-feedback-{batch.batch}",
        job_name=job_name(workflow),
        run_config=run_config,
        tags={
            TRIGGER_TAG: TRIGGER,
            BATCH_TAG: batch.batch,
            LAST_SEQ_TAG: str(batch.last_seq),
            DATASET_TAG: path,
            MODEL_TAG: model,
        },
    )


def feedback_sensor(
    settings: FeedbackRetrainSettings,
    store: FeedbackSettings,
    jobs: list[UnresolvedAssetJobDefinition],
) -> dg.SensorDefinition:
    """``<workflow>_feedback_sensor``: ``jobs`` are ``feedback_job`` and the workflow's job."""
    workflow, threshold = settings.workflow, settings.threshold
    noun = _NOUNS[settings.trains_on]
    retrain_job = job_name(workflow)

    @dg.sensor(
        name=f"{workflow.name}_feedback_sensor",
        jobs=jobs,
        minimum_interval_seconds=settings.interval_seconds,
        default_status=settings.default_status,
        description=f"Retrains {workflow.name} on served feedback once {threshold} new {noun} arrive, "
        f"from the served champion (every {settings.interval_seconds}s; "
        f"KITCHEN_{workflow.name.upper()}_FEEDBACK_* environment variables).",
    )
    def _sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        state: dict[str, Any] = json.loads(context.cursor) if context.cursor else {}
        trained = max(int(state.get("trained_through", 0)), _trained_through(context.instance, retrain_job))
        latest = _latest_batch(context.instance)
        if latest is not None and latest.after_seq == trained and latest.last_seq > trained:
            made = latest.pairs if settings.trains_on == "pairs" else latest.sft_rows
            if made >= threshold:
                request = retraining_request(settings, latest)
                if isinstance(request, str):
                    return dg.SensorResult(
                        skip_reason=request, cursor=json.dumps({"trained_through": trained})
                    )
                context.log.info(f"feedback batch {latest.batch}: {made} {noun}; retraining {workflow.name}")
                launched = {"trained_through": latest.last_seq, "batch": latest.batch}
                return dg.SensorResult(run_requests=[request], cursor=json.dumps(launched))
        cursor = json.dumps({**state, "trained_through": trained})
        if not store.path.is_file():
            return dg.SensorResult(skip_reason=f"no feedback store at {store.path} yet", cursor=cursor)
        data = build_training_data(FeedbackStore(store.path).feedback(), trained)
        made = len(data.pairs if settings.trains_on == "pairs" else data.sft_rows)
        if made < threshold:
            reason = f"{made} of {threshold} {noun} in {data.feedback} new feedback after seq {trained}"
            return dg.SensorResult(skip_reason=reason, cursor=cursor)
        op = "__".join(FEEDBACK_KEY.path)
        request = dg.RunRequest(
            run_key=f"feedback-{data.batch.id}",
            job_name=FEEDBACK_JOB,
            run_config={"ops": {op: {"config": {"after_seq": trained, "last_seq": data.batch.last_seq}}}},
            tags={TRIGGER_TAG: TRIGGER, BATCH_TAG: data.batch.id},
        )
        context.log.info(f"feedback batch {data.batch.id}: {made} {noun}; materialising it")
        return dg.SensorResult(run_requests=[request], cursor=cursor)

    return _sensor
