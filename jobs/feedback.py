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
- ``MAX_ATTEMPTS``: runs a batch gets when its retraining run fails, the first included; default 3.

One batch goes through two ticks. First, when enough new feedback has arrived since the last batch that
trained, a ``feedback_job`` run materialises exactly that batch (run key ``feedback-<batch>``). Then, once
that batch is the asset's latest materialisation, a ``<workflow>_job`` run trains on its file (run key
``<workflow>-feedback-<batch>``, tags ``kitchen/feedback_batch`` and ``kitchen/feedback_last_seq``).
Where the last trained batch ended is the cursor, or the newest such run's tag when that is later, so a
reset cursor trains no feedback twice.

A retraining run that fails is requested again on the next tick, with the failed run's config and tags
(run key ``<workflow>-feedback-<batch>-attempt-<n>``, tag ``kitchen/feedback_attempt``), up to
``MAX_ATTEMPTS`` runs for the batch, before any newer feedback is batched, so batches still train in
order. Not requested again: a run the eval gate rejected (a failed asset check: that is the verdict on
these weights, and retraining the same batch would only try its luck), a canceled run (someone stopped
it), one Dagster's own run retries will re-execute (``dagster/will_retry``), and a batch whose attempts
are spent; newer feedback then makes the next batch.
"""

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition
from pydantic import ValidationError

from jobs.sensors import DATASET_TAG, TRIGGER_TAG, env_number, env_run_config, env_status
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
ATTEMPT_TAG = "kitchen/feedback_attempt"
#: Dagster's tag on a failed run its run-retry daemon will re-execute.
WILL_RETRY_TAG = "dagster/will_retry"
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
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if self.workflow.name not in TRAINS_ON:
            raise ValueError(f"feedback retrains {' or '.join(TRAINS_ON)}, not {self.workflow.name!r}")
        if self.threshold < 1:
            raise ValueError(f"{feedback_variable(self.workflow, 'THRESHOLD')}: must be at least 1")
        if self.max_attempts < 1:
            raise ValueError(f"{feedback_variable(self.workflow, 'MAX_ATTEMPTS')}: must be at least 1")
        self.workflow.config(**self.run_config)  # a bad file fails when the code location loads

    @property
    def trains_on(self) -> str:
        return TRAINS_ON[self.workflow.name]

    @classmethod
    def from_env(cls, workflow: Workflow) -> "FeedbackRetrainSettings":
        def var(setting: str) -> str:
            return feedback_variable(workflow, setting)

        config_file, run_config = env_run_config(var("RUN_CONFIG"))
        raw = os.environ.get(var("THRESHOLD"), "").strip() or "16"
        if not raw.isdigit():
            raise ValueError(f"{var('THRESHOLD')}={raw!r}: expected a whole number of pairs or replies")
        threshold = int(raw)
        attempts = os.environ.get(var("MAX_ATTEMPTS"), "").strip() or "3"
        if not attempts.isdigit():
            raise ValueError(f"{var('MAX_ATTEMPTS')}={attempts!r}: expected a whole number of runs")
        try:
            return cls(
                workflow=workflow,
                threshold=threshold,
                model=os.environ.get(var("MODEL"), "").strip() or None,
                run_config=run_config,
                interval_seconds=int(env_number(var("INTERVAL"), 300)),
                default_status=env_status(var("SENSOR"), dg.DefaultSensorStatus.STOPPED),
                max_attempts=int(attempts),
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


@dataclass(frozen=True)
class _NewestBatch:
    """The newest batch a retraining run was launched for, from the runs' tags."""

    last_seq: int = 0
    """Where it ends (0: no run yet)."""
    runs: tuple[dg.DagsterRun, ...] = ()
    """Its runs, newest first."""

    def retry(self, instance: dg.DagsterInstance, max_attempts: int) -> tuple[dg.DagsterRun | None, str]:
        """The failed run to request again, or None and why not."""
        if not self.runs:
            return None, "no run"
        latest = self.runs[0]
        batch = latest.tags.get(BATCH_TAG, "?")
        if any(r.status == dg.DagsterRunStatus.SUCCESS for r in self.runs):
            return None, f"batch {batch} trained"
        if latest.status != dg.DagsterRunStatus.FAILURE:
            return None, f"batch {batch}'s run {latest.run_id} is {latest.status.value.lower()}"
        if latest.tags.get(WILL_RETRY_TAG) == "true":
            return None, f"Dagster will re-execute batch {batch}'s failed run {latest.run_id}"
        if _gate_rejected(instance, latest):
            return None, f"the eval gate rejected batch {batch}'s run {latest.run_id}"
        if len(self.runs) >= max_attempts:
            return None, f"batch {batch} failed {len(self.runs)} of {max_attempts} attempts"
        return latest, f"batch {batch}'s run {latest.run_id} failed"


def _newest_batch(instance: dg.DagsterInstance, retrain_job: str) -> _NewestBatch:
    runs = instance.get_runs(
        filters=dg.RunsFilter(job_name=retrain_job, tags={TRIGGER_TAG: TRIGGER}), limit=50
    )
    tagged = [r for r in runs if LAST_SEQ_TAG in r.tags]
    if not tagged:
        return _NewestBatch()
    last = max(int(r.tags[LAST_SEQ_TAG]) for r in tagged)
    return _NewestBatch(last, tuple(r for r in tagged if int(r.tags[LAST_SEQ_TAG]) == last))


def _gate_rejected(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """Whether an asset check (the blocking eval gate) failed in ``run``."""
    records = instance.get_records_for_run(
        run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION, limit=100
    ).records
    return any(
        r.event_log_entry.dagster_event is not None
        and not r.event_log_entry.dagster_event.asset_check_evaluation_data.passed
        for r in records
    )


def _again(run: dg.DagsterRun, attempt: int, workflow: Workflow) -> dg.RunRequest:
    """``run`` requested again as it was launched: its config and its feedback tags."""
    kept = (TRIGGER_TAG, BATCH_TAG, LAST_SEQ_TAG, DATASET_TAG, MODEL_TAG)
    return dg.RunRequest(
        run_key=f"{workflow.name}-feedback-{run.tags[BATCH_TAG]}-attempt-{attempt}",
        job_name=run.job_name,
        run_config=dict(run.run_config),
        tags={**{k: run.tags[k] for k in kept if k in run.tags}, ATTEMPT_TAG: str(attempt)},
    )


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
        newest = _newest_batch(context.instance, retrain_job)
        trained = max(int(state.get("trained_through", 0)), newest.last_seq)
        failed, why = newest.retry(context.instance, settings.max_attempts)
        if failed is not None:
            attempt = len(newest.runs) + 1
            context.log.info(f"{why}; requesting attempt {attempt} of {settings.max_attempts}")
            return dg.SensorResult(
                run_requests=[_again(failed, attempt, workflow)],
                cursor=json.dumps({**state, "trained_through": trained}),
            )
        if newest.runs and newest.runs[0].status == dg.DagsterRunStatus.FAILURE:
            context.log.warning(f"{why}: not requested again")
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
