"""The MLflow sink: training-step and evaluation metrics on one MLflow run per Dagster run.

The MLflow run is found by its ``dagster.run_id`` tag, so a registry asset in the same Dagster run calls
``mlflow_run_for_dagster_run`` and gets the run these metrics landed on. Everything goes through an
explicit ``MlflowClient`` (no ``mlflow.start_run`` global state), so the sink cannot collide with code
that manages its own active run.

Tracking: ``MLFLOW_TRACKING_URI`` when set, otherwise ``sqlite:///$KITCHEN_HOME/mlflow.db``; a new
experiment (``MLFLOW_EXPERIMENT_NAME``, default ``kitchen``) gets an absolute artifact location under
``$KITCHEN_HOME/mlruns``, because MLflow's default is relative to whatever directory the process ran in.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING

from kitchen.home import kitchen_home
from kitchen.telemetry.events import (
    EVAL_COMPLETE,
    TRAINING_STEP,
    WORKFLOW_START,
    WORKFLOW_STOP,
    TelemetryEvent,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

DAGSTER_RUN_TAG = "dagster.run_id"
WORKFLOW_TAG = "kitchen.workflow"
DEFAULT_EXPERIMENT = "kitchen"
# training.step measurement -> MLflow metric name.
STEP_METRICS = {
    "loss": "train/loss",
    "learning_rate": "train/learning_rate",
    "tokens": "train/tokens",
    "trained_tokens": "train/trained_tokens",
    "tokens_per_second": "train/tokens_per_second",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
}
# Other training.step measurements are the plan's own metrics, logged under their reference names
# (dpo_loss, env/reward/total, ...); these bookkeeping ones are not.
_NOT_LOGGED = frozenset({"step", "step_seconds", "elapsed_seconds", "eta_seconds"})
_STATUS = {"success": "FINISHED", "failure": "FAILED", "canceled": "KILLED"}

_lock = threading.RLock()
_runs: dict[tuple[str, str], str] = {}  # (tracking uri, dagster run id) -> MLflow run id
_clients: dict[str, MlflowClient] = {}


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, or the SQLite store in the Kitchen home."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{kitchen_home() / 'mlflow.db'}"


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def mlflow_client(uri: str | None = None) -> MlflowClient:
    """One client per tracking URI (creating the SQLite schema costs a second or two, and is done by
    one process at a time: ``kitchen.registry.store.open_client``)."""
    from kitchen.registry.store import open_client

    uri = uri or tracking_uri()
    with _lock:
        if uri not in _clients:
            _clients[uri] = open_client(uri)
        return _clients[uri]


def _experiment_id(client: MlflowClient) -> str:
    from mlflow.exceptions import MlflowException

    name = experiment_name()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    artifacts = (kitchen_home() / "mlruns").resolve()
    try:
        return str(client.create_experiment(name, artifact_location=artifacts.as_uri()))
    except MlflowException:
        found = client.get_experiment_by_name(name)  # another process created it first
        if found is None:
            raise
        return str(found.experiment_id)


def find_mlflow_run(dagster_run_id: str) -> str | None:
    """The MLflow run tagged with ``dagster_run_id``, or None."""
    if "'" in dagster_run_id or "`" in dagster_run_id:
        raise ValueError(f"not a Dagster run id: {dagster_run_id!r}")
    uri = tracking_uri()
    with _lock:
        if (uri, dagster_run_id) in _runs:
            return _runs[(uri, dagster_run_id)]
        client = mlflow_client(uri)
        experiment = client.get_experiment_by_name(experiment_name())
        if experiment is None:
            return None
        found = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{DAGSTER_RUN_TAG}` = '{dagster_run_id}'",
            max_results=1,
        )
        if not found:
            return None
        _runs[(uri, dagster_run_id)] = found[0].info.run_id
        return found[0].info.run_id


def mlflow_run_for_dagster_run(dagster_run_id: str, *, workflow: str | None = None) -> str:
    """The MLflow run id for a Dagster run, created (tagged ``dagster.run_id``) on first use."""
    with _lock:
        existing = find_mlflow_run(dagster_run_id)
        if existing is not None:
            return existing
        client = mlflow_client()
        tags = {DAGSTER_RUN_TAG: dagster_run_id}
        if workflow:
            tags[WORKFLOW_TAG] = workflow
        name = f"{workflow or 'kitchen'}-{dagster_run_id[:8]}"
        run = client.create_run(_experiment_id(client), tags=tags, run_name=name)
        _runs[(tracking_uri(), dagster_run_id)] = run.info.run_id
        return str(run.info.run_id)


class MlflowSink:
    """One MLflow run per workflow run: ``training.step`` metrics at their step, eval metrics per model,
    ended with the workflow's status."""

    def __call__(self, event: TelemetryEvent) -> None:
        dagster_run_id = str(event.metadata["run_id"])
        if event.name == WORKFLOW_STOP:
            self._end(dagster_run_id, str(event.metadata["status"]))
            return
        if event.name not in (WORKFLOW_START, TRAINING_STEP, EVAL_COMPLETE):
            return
        # Created at workflow start, so MLflow's one-off costs (import, a new store's schema) are not
        # paid inside the training loop where they would distort step timings.
        run_id = mlflow_run_for_dagster_run(dagster_run_id, workflow=str(event.metadata["workflow"]))
        if event.name == WORKFLOW_START:
            return
        from mlflow.entities import Metric

        millis = int(event.timestamp * 1000)
        if event.name == TRAINING_STEP:
            step = int(event.measurements["step"])
            metrics = [
                Metric(STEP_METRICS.get(key, key), float(value), millis, step)
                for key, value in event.measurements.items()
                if key in STEP_METRICS or key not in _NOT_LOGGED
            ]
        else:
            model = event.metadata["model"]
            metrics = [
                Metric(f"eval/{model}/{k}", float(v), millis, 0) for k, v in event.measurements.items()
            ]
        mlflow_client().log_batch(run_id, metrics=metrics)

    def _end(self, dagster_run_id: str, status: str) -> None:
        # Only a run this process created or looked up is ended: runs that logged nothing cost no MLflow call.
        with _lock:
            run_id = _runs.get((tracking_uri(), dagster_run_id))
        if run_id is not None:
            mlflow_client().set_terminated(run_id, status=_STATUS[status], end_time=int(time.time() * 1000))
