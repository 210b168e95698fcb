"""The MLflow model registry as a Dagster resource (bound as ``registry``).

Configuration, in order: the resource's ``tracking_uri``, ``MLFLOW_TRACKING_URI``, else the embedded
SQLite store at ``$KITCHEN_HOME/mlflow.db`` with artifacts under ``$KITCHEN_HOME/mlruns`` (the store the
telemetry sink logs training metrics to; set the URI through ``MLFLOW_TRACKING_URI`` to keep both on one
server).
A team sets ``MLFLOW_TRACKING_URI=http://mlflow.internal:5000``; credentials come from MLflow's own
environment variables (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN``) and are never copied into
config, tags, params or logs.
"""

import os

import dagster as dg
from pydantic import Field

from kitchen.registry.store import ModelRegistry, default_experiment_name, default_tracking_uri, redact_uri


class MlflowRegistry(dg.ConfigurableResource):
    """``MlflowClient`` on the configured tracking store and model registry."""

    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI (http(s)://, sqlite:///, ...). Default: MLFLOW_TRACKING_URI, else "
        "the embedded SQLite store under KITCHEN_HOME.",
    )
    registry_uri: str | None = Field(
        default=None,
        description="Model registry URI when it differs (default: MLFLOW_REGISTRY_URI, else tracking).",
    )
    artifact_location: str | None = Field(
        default=None,
        description="Artifact root for experiments Kitchen creates. Default: KITCHEN_HOME/mlruns "
        "for local stores; the server's own (--artifacts-destination) for a tracking server.",
    )
    experiment_name: str | None = Field(
        default=None, description="MLflow experiment (default: MLFLOW_EXPERIMENT_NAME, else 'kitchen')."
    )
    dagster_url: str | None = Field(
        default=None,
        description="Dagster UI base URL for the link back from each version to its run. Default: "
        "KITCHEN_DAGSTER_URL, else http://127.0.0.1:3000 (make ui).",
    )
    request_timeout_s: float = Field(default=10.0, gt=0, description="Timeout of the preflight probe.")

    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or default_tracking_uri()

    def registry(self) -> ModelRegistry:
        """A registry on the configured store (resolved now, so KITCHEN_HOME and env changes apply)."""
        return ModelRegistry(
            self.resolved_tracking_uri(),
            registry_uri=self.registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or None,
            artifact_root=self.artifact_location,
            timeout_s=self.request_timeout_s,
        )

    def preflight(self) -> None:
        """Fail before training when the store is unreachable or unwritable (raises ``RegistryError``)."""
        self.registry().preflight()

    def resolved_experiment_name(self) -> str:
        return self.experiment_name or default_experiment_name()

    def dagster_run_url(self, run_id: str) -> str:
        base = self.dagster_url or os.environ.get("KITCHEN_DAGSTER_URL") or "http://127.0.0.1:3000"
        return f"{redact_uri(base).rstrip('/')}/runs/{run_id}"
