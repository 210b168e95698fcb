"""Sensors: retrain when a watched dataset source changes; record why a Kitchen run failed.

Both are configured from the environment of the code location (``dagster dev``, the daemon), so a
deployment changes them without code. The retraining sensor:

- ``KITCHEN_RETRAIN_SOURCES``: comma-separated dataset names to watch (built-in, local path, Hub id);
  default: the ``dataset`` of the run config below, else the built-in ``kitchen/arithmetic``, which
  never changes.
- ``KITCHEN_RETRAIN_RUN_CONFIG``: a JSON or YAML file with the flat run config of retraining runs
  (what ``supervised_job`` and ``kitchen run`` take); default: the job's defaults.
- ``KITCHEN_RETRAIN_SENSOR``: ``running`` or ``stopped`` when first loaded; default ``stopped``, because
  each run it requests trains a model. The UI's toggle overrides it.
- ``KITCHEN_RETRAIN_INTERVAL``: seconds between ticks, default 300.
- ``KITCHEN_RETRAIN_HUB_TIMEOUT``: seconds one Hub revision call may take, default 5.

The failure sensor (``KITCHEN_FAILURE_SENSOR``, default ``running``; ``KITCHEN_FAILURE_WEBHOOK_URL``,
default none) only writes tags, a log line and an optional webhook POST, so it starts running.
"""

import json
import os
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import yaml
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition
from dagster._utils.error import SerializableErrorInfo
from pydantic import ValidationError

from kitchen.data.revision import SourceRevision, SourceUnavailable, source_revision
from kitchen.secrets import redact_text, redact_webhook
from kitchen.workflows import Workflow

#: Run tags the sensors write (the UI's run list filters on them).
TRIGGER_TAG = "kitchen/trigger"
DATASET_TAG = "kitchen/dataset"
REVISION_TAG = "kitchen/dataset_revision"
FAILED_ASSETS_TAG = "kitchen/failed_assets"
FAILURE_TAG = "kitchen/failure"
FAILURE_WEBHOOK_TAG = "kitchen/failure_webhook"
_TAG_VALUE_CHARS = 500


def env_status(variable: str, default: dg.DefaultSensorStatus) -> dg.DefaultSensorStatus:
    """``running``/``stopped`` from ``variable``; anything else is a configuration error, not a default."""
    value = os.environ.get(variable, "").strip().lower()
    if not value:
        return default
    statuses = {"running": dg.DefaultSensorStatus.RUNNING, "stopped": dg.DefaultSensorStatus.STOPPED}
    if value not in statuses:
        raise ValueError(f"{variable}={value!r}: expected 'running' or 'stopped'")
    return statuses[value]


def env_run_config(variable: str) -> tuple[str, dict[str, Any]]:
    """The YAML file ``variable`` names and the run config in it (``""`` and empty when unset): what a
    sensor launches. The path is returned for the caller's message when validation fails later."""
    config_file = os.environ.get(variable, "").strip()
    if not config_file:
        return "", {}
    loaded = yaml.safe_load(Path(config_file).read_text())
    if not isinstance(loaded, dict):
        raise ValueError(f"{variable}={config_file}: expected a mapping of run config")
    return config_file, loaded


def env_number(variable: str, default: float) -> float:
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{variable}={raw!r}: expected a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{variable}={raw!r}: must be positive")
    return value


# -- retraining on dataset change -----------------------------------------------------------------


def retrain_variable(workflow: Workflow, setting: str) -> str:
    """The environment variable of a retraining setting: ``KITCHEN_<WORKFLOW>_RETRAIN_<SETTING>``; for
    ``supervised`` the unprefixed ``KITCHEN_RETRAIN_<SETTING>`` is honoured too (it came first)."""
    prefixed = f"KITCHEN_{workflow.name.upper()}_RETRAIN_{setting}"
    legacy = f"KITCHEN_RETRAIN_{setting}"
    if workflow.name == "supervised" and prefixed not in os.environ and legacy in os.environ:
        return legacy
    return prefixed


@dataclass(frozen=True)
class RetrainSettings:
    """What a retraining sensor watches and the run it requests (``dataset`` is set per source)."""

    sources: tuple[str, ...]
    run_config: Mapping[str, Any] = field(default_factory=dict)
    interval_seconds: int = 300
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.STOPPED
    hub_timeout: float = 5.0
    schema: type[Any] | None = None
    """The workflow's flat config class: the run config is checked against it when the code loads."""

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("a retraining sensor needs at least one dataset source to watch")
        # The job validates again at launch; failing here shows a bad file when the code location loads.
        if self.schema is not None:
            self.schema(**self.run_config)

    @classmethod
    def from_env(cls, workflow: Workflow) -> "RetrainSettings":
        def var(setting: str) -> str:
            return retrain_variable(workflow, setting)

        config_file, run_config = env_run_config(var("RUN_CONFIG"))
        listed = os.environ.get(var("SOURCES"), "")
        default_dataset = workflow.config.model_fields["dataset"].default
        sources = tuple(s.strip() for s in listed.split(",") if s.strip()) or (
            str(run_config.get("dataset", default_dataset)),
        )
        try:
            return cls(
                sources=sources,
                run_config=run_config,
                interval_seconds=int(env_number(var("INTERVAL"), 300)),
                default_status=env_status(var("SENSOR"), dg.DefaultSensorStatus.STOPPED),
                hub_timeout=env_number(var("HUB_TIMEOUT"), 5.0),
                schema=workflow.config,
            )
        except ValidationError as error:
            raise ValueError(f"{var('RUN_CONFIG')}={config_file}: not a valid run config: {error}") from error


def _short(revision: str) -> str:
    return revision[:12]


def retraining_sensor(
    job: dg.JobDefinition | UnresolvedAssetJobDefinition,
    settings: RetrainSettings,
    *,
    name: str | None = None,
) -> dg.SensorDefinition:
    """A sensor requesting one run of ``job`` per new revision of each watched source.

    The cursor maps each source to the last revision seen; the first tick only records it (turning the
    sensor on does not retrain on data already trained on). The run key is ``<source>@<revision>``, so
    a revision never starts a second run, even after a cursor reset or a revert to earlier content.
    A Hub source's run pins ``dataset_revision`` to the sha that triggered it.
    """

    @dg.sensor(
        name=name or f"{job.name.removesuffix('_job')}_retraining_sensor",
        job=job,
        minimum_interval_seconds=settings.interval_seconds,
        default_status=settings.default_status,
        description=f"Retrains when a watched dataset changes: {', '.join(settings.sources)} "
        f"(every {settings.interval_seconds}s; KITCHEN_<WORKFLOW>_RETRAIN_* environment variables).",
    )
    def _sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        seen: dict[str, dict[str, Any]] = json.loads(context.cursor) if context.cursor else {}
        requests: list[dg.RunRequest] = []
        notes: list[str] = []
        for source in settings.sources:
            previous = SourceRevision(**seen[source]) if source in seen else None
            try:
                current = source_revision(
                    source,
                    hub_revision=settings.run_config.get("dataset_revision"),
                    hub_timeout=settings.hub_timeout,
                    previous=previous,
                )
            except SourceUnavailable as error:
                context.log.warning(f"{source}: skipped this tick: {error}")
                notes.append(f"{source}: unavailable ({error})")
                continue
            seen[source] = asdict(current)
            if previous is None:
                notes.append(f"{source}: first seen at {_short(current.revision)}; recorded, no run")
            elif previous.revision == current.revision:
                notes.append(f"{source}: unchanged at {_short(current.revision)}")
            else:
                context.log.info(
                    f"{source}: {_short(previous.revision)} -> {_short(current.revision)}: retraining"
                )
                requests.append(_run_request(settings, current))
        cursor = json.dumps(seen, sort_keys=True)
        if requests:
            return dg.SensorResult(run_requests=requests, cursor=cursor)
        return dg.SensorResult(skip_reason="; ".join(notes), cursor=cursor)

    return _sensor


def _run_request(settings: RetrainSettings, current: SourceRevision) -> dg.RunRequest:
    run_config = {**settings.run_config, "dataset": current.name}
    if current.kind == "hub":
        run_config["dataset_revision"] = current.revision
    return dg.RunRequest(
        run_key=f"{current.name}@{current.revision}",
        run_config=run_config,
        tags={TRIGGER_TAG: "dataset-changed", DATASET_TAG: current.name, REVISION_TAG: current.revision},
    )


# -- failed runs ----------------------------------------------------------------------------------


def _root_message(error: SerializableErrorInfo | None) -> str:
    """The user's exception, not Dagster's wrapper ("Error occurred while executing op ...")."""
    if error is None:
        return "unknown error"
    while error.cause is not None and error.cls_name is not None and error.cls_name.startswith("Dagster"):
        error = error.cause
    name, message = error.cls_name or "Error", error.message.strip()
    qualified, sep, rest = message.partition(": ")  # the message repeats the module-qualified class name
    if sep and qualified.rsplit(".", 1)[-1] == name:
        message = rest
    return " ".join(f"{name}: {message}".split())


def failed_assets(context: dg.RunFailureSensorContext) -> dict[str, str]:
    """Each asset (or asset check) of a failed step -> that step's error; ``{"(run)": message}`` when
    no step failed (the run itself died)."""
    planned = context.instance.get_records_for_run(
        context.dagster_run.run_id,
        of_type={
            dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED,
            dg.DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED,
        },
        limit=1000,
    ).records
    targets_by_step: dict[str, list[str]] = {}
    for record in planned:
        event = record.event_log_entry.dagster_event
        if event is None or not event.step_key:
            continue
        if event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED:
            target = event.asset_check_planned_data.asset_check_key.to_user_string()
        elif event.asset_key is not None:
            target = event.asset_key.to_user_string()
        else:
            continue
        targets_by_step.setdefault(event.step_key, []).append(target)
    failures: dict[str, str] = {}
    for event in context.get_step_failure_events():
        error = event.step_failure_data.error if event.step_failure_data else None
        for asset in targets_by_step.get(event.step_key or "", [f"step {event.step_key}"]):
            failures[asset] = _root_message(error)
    if not failures:
        failures["(run)"] = " ".join((context.failure_event.message or "run failed").split())
    return failures


def _clip(text: str) -> str:
    return text if len(text) <= _TAG_VALUE_CHARS else text[: _TAG_VALUE_CHARS - 1] + "…"


def post_webhook(url: str, payload: Mapping[str, Any], timeout: float = 5.0) -> None:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()


def run_failure_recorder(
    *,
    webhook_url: str | None = None,
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.RUNNING,
    name: str = "kitchen_run_failure_sensor",
) -> dg.SensorDefinition:
    """A run-failure sensor for every job in this code location: tags the failed run with the failed
    assets and the error, logs one line, and POSTs the same as JSON to ``webhook_url`` when given."""

    @dg.run_failure_sensor(
        name=name,
        default_status=default_status,
        description="Tags failed Kitchen runs with the failed assets and error "
        "(kitchen/failed_assets, kitchen/failure); optional webhook.",
    )
    def _sensor(context: dg.RunFailureSensorContext) -> None:
        run = context.dagster_run
        failures = failed_assets(context)
        first_error = next(iter(failures.values()))
        tags = {FAILED_ASSETS_TAG: _clip(", ".join(failures)), FAILURE_TAG: _clip(first_error)}
        summary = f"Kitchen run {run.run_id} ({run.job_name}) failed: " + "; ".join(
            f"{asset}: {error}" for asset, error in failures.items()
        )
        context.log.error(summary)
        if webhook_url:
            payload = {
                "run_id": run.run_id,
                "job": run.job_name,
                "failures": failures,
                "tags": dict(run.tags),
            }
            try:
                post_webhook(webhook_url, payload)
                tags[FAILURE_WEBHOOK_TAG] = "sent"
            except (OSError, ValueError) as error:  # URLError/HTTPError are OSErrors; a bad URL is ValueError
                reason = redact_text(str(error), [webhook_url])  # the URL is a bearer secret
                context.log.error(f"failure webhook {redact_webhook(webhook_url)} not reached: {reason}")
                tags[FAILURE_WEBHOOK_TAG] = _clip(f"failed: {reason}")
        context.instance.add_run_tags(run.run_id, tags)

    return _sensor


def failure_settings_from_env() -> dict[str, Any]:
    return {
        "webhook_url": os.environ.get("KITCHEN_FAILURE_WEBHOOK_URL", "").strip() or None,
        "default_status": env_status("KITCHEN_FAILURE_SENSOR", dg.DefaultSensorStatus.RUNNING),
    }
