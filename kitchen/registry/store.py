"""Kitchen's model registry: an MLflow tracking store plus model registry, reached through ``MlflowClient``.

Every call goes through one explicit client (no ``mlflow.set_tracking_uri``), so two registries in one
process never log into each other's store. The default is the embedded SQLite store the telemetry sink
also uses (``$KITCHEN_HOME/mlflow.db``, artifacts under ``$KITCHEN_HOME/mlruns``), and runs are found by
the same ``dagster.run_id`` tag, so a Dagster run's training metrics and its registration share one
MLflow run. A team points ``MLFLOW_TRACKING_URI`` at an ``mlflow server`` by URL.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from kitchen.atomic import atomic_directory
from kitchen.hashing import hash_json
from kitchen.home import home_dir, kitchen_home
from kitchen.locks import file_lock, lock_path
from kitchen.registry.names import ModelRef, parse_model_ref, validate_model_name
from kitchen.secrets import redact_text, redact_uri, secret_values
from kitchen.telemetry.sinks import mlflow as telemetry_mlflow
from kitchen.telemetry.sinks.mlflow import DAGSTER_RUN_TAG

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel

DAGSTER_MLFLOW_RUN_TAG = "dagster_run_id"  # dagster-mlflow's tag, also set so its lookups find our runs
WEIGHTS_HASH_TAG = "kitchen.weights.hash"
MODEL_ARTIFACT_DIR = "model"
_REMOTE_SCHEMES = ("http", "https")


class RegistryError(RuntimeError):
    """The registry cannot be used as configured; the message says what to fix."""


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else ``sqlite:///$KITCHEN_HOME/mlflow.db``: the telemetry sink's rule."""
    return telemetry_mlflow.tracking_uri()


def default_experiment_name() -> str:
    """``MLFLOW_EXPERIMENT_NAME``, else ``kitchen``: the telemetry sink's rule."""
    return telemetry_mlflow.experiment_name()


def default_artifact_root() -> str:
    """Absolute, so artifacts never land in ``./mlruns`` relative to whatever directory a run started in
    (the same location the telemetry sink gives the experiments it creates)."""
    return (kitchen_home() / "mlruns").resolve().as_uri()


def is_remote(uri: str) -> bool:
    return urlsplit(uri).scheme in _REMOTE_SCHEMES


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///")
    return None if path in ("", ":memory:") else Path(path)


def open_client(tracking_uri: str, registry_uri: str | None = None) -> MlflowClient:
    """An ``MlflowClient`` whose stores exist. For SQLite, the first connection creates the tables and
    runs MLflow's migrations; two processes doing that at once on a fresh file fail one of them, so it
    happens under a lock beside each database file (shared with the telemetry sink)."""
    from mlflow import MlflowClient

    tracking_db = _sqlite_path(tracking_uri)
    registry_db = _sqlite_path(registry_uri) if registry_uri else None
    with ExitStack() as locks:
        for db in sorted({d for d in (tracking_db, registry_db) if d is not None}):  # one order for all
            locks.enter_context(file_lock(lock_path(db)))
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
        if tracking_db is not None:
            client.search_experiments(max_results=1)
        if registry_db is not None:
            client.search_registered_models(max_results=1)
    return client


@dataclass(frozen=True)
class VersionView:
    """A model version with its aliases filled in (MLflow's search results leave them empty)."""

    version: ModelVersion
    aliases: tuple[str, ...]

    @property
    def number(self) -> str:
        return str(self.version.version)

    @property
    def tags(self) -> dict[str, str]:
        return dict(self.version.tags or {})


class ModelRegistry:
    """Registration, aliases and loading against one tracking store and model registry."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        registry_uri: str | None = None,
        artifact_root: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri
        # A server decides where artifacts go (``--artifacts-destination``); a local store gets ours.
        self.artifact_root = artifact_root or (None if is_remote(tracking_uri) else default_artifact_root())
        self.timeout_s = timeout_s
        self._client: MlflowClient | None = None

    @property
    def display_uri(self) -> str:
        return redact_uri(self.tracking_uri)

    # -- connecting ---------------------------------------------------------------------------------

    def preflight(self) -> None:
        """Fail in seconds, naming the problem, when the store cannot be reached or written.

        Meant to run before training: MLflow's own HTTP client retries an unreachable server for
        minutes, which is the wrong time to find out.
        """
        for uri in dict.fromkeys((self.tracking_uri, self.registry_uri)):
            if is_remote(uri):
                self._probe_server(uri)
            elif (db := _sqlite_path(uri)) is not None:
                self._check_writable(db.parent, f"the SQLite store {db}")
            elif urlsplit(uri).scheme in ("", "file"):
                path = Path(urlsplit(uri).path if "://" in uri else uri)
                self._check_writable(path, f"the file store {path}")
            else:
                self._call(lambda: self.client.search_experiments(max_results=1), "reach")

    def _probe_server(self, uri: str) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        where = redact_uri(uri)
        try:
            response = http_request(
                get_default_host_creds(uri),
                "/api/2.0/mlflow/registered-models/search",
                "GET",
                max_retries=0,
                timeout=self.timeout_s,
                raise_on_status=False,
                params={"max_results": 1},
            )
        except MlflowException as err:
            reason = str(err.message).split("exception", 1)[-1].strip(" :'\"")[:300]
            raise RegistryError(
                f"MLflow tracking server {where} is unreachable ({reason}). Start it, or point "
                "MLFLOW_TRACKING_URI / the registry resource's tracking_uri at a running one."
            ) from err
        if response.status_code in (401, 403):
            raise RegistryError(
                f"MLflow tracking server {where} refused the credentials (HTTP {response.status_code}); set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN."
            )
        if response.status_code != 200:
            raise RegistryError(
                f"{where} answered HTTP {response.status_code} to a model-registry request; is it an MLflow "
                f"tracking server with the registry enabled? ({response.text[:200]!r})"
            )

    @staticmethod
    def _check_writable(directory: Path, what: str) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RegistryError(f"cannot create the directory for {what}: {err}") from err
        if not os.access(directory, os.W_OK):
            raise RegistryError(f"{what} is not writable by this user ({directory})")

    @property
    def client(self) -> MlflowClient:
        """The client, with the store's tables created once (under a lock for SQLite)."""
        if self._client is None:
            self._client = open_client(self.tracking_uri, self.registry_uri)
        return self._client

    def _call(self, fn: Any, verb: str) -> Any:
        """``fn()``; any failure (MLflow's, a missing database driver, a refused connection) becomes one
        ``RegistryError`` line naming the store without its credentials. The original exception is not
        chained: its text may hold the password, and Dagster records a failure's whole cause chain."""
        from mlflow.exceptions import MlflowException

        try:
            return fn()
        except Exception as err:
            detail = str(err.message) if isinstance(err, MlflowException) else f"{type(err).__name__}: {err}"
            uris = {"tracking": self.tracking_uri, "registry": self.registry_uri}
            detail = redact_text(" ".join(detail.split()), secret_values(uris, min_length=1))
            for uri in uris.values():
                detail = detail.replace(uri, redact_uri(uri))
            error = RegistryError(f"could not {verb} MLflow store {self.display_uri}: {detail[:400]}")
        raise error

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Serialises registration of one model on this machine (version numbering is the store's job)."""
        key = hash_json([self.registry_uri, name])[:16]
        with file_lock(home_dir("locks") / f"registry-{key}.lock"):
            yield

    # -- experiments and runs -----------------------------------------------------------------------

    def experiment_id(self, name: str) -> str:
        """The experiment's id, created (with an absolute artifact location) if missing."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

        client = self.client
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment.experiment_id)
            return str(experiment.experiment_id)
        try:
            return str(client.create_experiment(name, artifact_location=self.artifact_root))
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            found = client.get_experiment_by_name(name)  # another process created it first
            assert found is not None
            return str(found.experiment_id)

    def run_for_dagster_run(
        self, experiment_id: str, dagster_run_id: str, *, run_name: str, tags: dict[str, str]
    ) -> Run:
        """The MLflow run recording ``dagster_run_id`` (found by its tag, e.g. the one the telemetry sink
        started, or started now), carrying ``tags``."""
        from mlflow.entities import RunTag

        found = self.client.search_runs(
            [experiment_id], f"tags.`{DAGSTER_RUN_TAG}` = '{_quote(dagster_run_id)}'", max_results=1
        )
        run_tags = {DAGSTER_RUN_TAG: dagster_run_id, DAGSTER_MLFLOW_RUN_TAG: dagster_run_id, **tags}
        if not found:
            return self.client.create_run(experiment_id, run_name=run_name, tags=run_tags)
        run_id = found[0].info.run_id
        items = [RunTag(k, v) for k, v in run_tags.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(run_id, tags=items[start : start + 100])
        return self.client.get_run(run_id)

    def run_url(self, experiment_id: str, run_id: str) -> str | None:
        if not is_remote(self.tracking_uri):
            return None
        return f"{self._ui_base()}/#/experiments/{experiment_id}/runs/{run_id}"

    def version_url(self, name: str, version: str) -> str | None:
        if not is_remote(self.registry_uri):
            return None
        from urllib.parse import quote

        return f"{self._ui_base(self.registry_uri)}/#/models/{quote(name, safe='')}/versions/{version}"

    def _ui_base(self, uri: str | None = None) -> str:
        return redact_uri(uri or self.tracking_uri).rstrip("/")

    # -- registered models and versions -------------------------------------------------------------

    def ensure_registered_model(self, name: str, *, description: str, tags: dict[str, str]) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

        validate_model_name(name)
        try:
            self.client.get_registered_model(name)
            return
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
        try:
            self.client.create_registered_model(name, tags=tags, description=description)
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise

    def versions_with_weights(self, name: str, weights_hash: str) -> list[ModelVersion]:
        """Versions of ``name`` holding exactly these weights, oldest first."""
        found = self.client.search_model_versions(
            f"name = '{_quote(name)}' and tags.`{WEIGHTS_HASH_TAG}` = '{weights_hash}'"
        )
        return sorted(found, key=lambda v: int(v.version))

    def aliases(self, name: str) -> dict[str, str]:
        """alias -> version number."""
        return {alias: str(v) for alias, v in self.client.get_registered_model(name).aliases.items()}

    def version(self, name: str, version: str) -> ModelVersion:
        return self.client.get_model_version(name, version)

    def resolve(self, ref: str | ModelRef) -> VersionView:
        """The version ``ref`` names (an alias, a number, or the latest); fails naming what exists."""
        from mlflow.exceptions import MlflowException

        ref = parse_model_ref(ref) if isinstance(ref, str) else ref
        try:
            aliases = self.aliases(ref.name)
        except MlflowException as err:
            known = ", ".join(m.name for m in self.list_models()[:20]) or "none yet"
            where = self.display_uri
            raise RegistryError(f"no registered model {ref.name!r} in {where} (models: {known})") from err
        if ref.alias is not None:
            if ref.alias not in aliases:
                raise RegistryError(
                    f"{ref.name} has no alias {ref.alias!r} (aliases: {_fmt_aliases(aliases) or 'none'})"
                )
            number = aliases[ref.alias]
        elif ref.version is not None:
            number = ref.version
        else:
            all_versions = self.client.search_model_versions(f"name = '{_quote(ref.name)}'")
            if not all_versions:
                raise RegistryError(f"{ref.name} has no versions")
            number = str(max(int(v.version) for v in all_versions))
        try:
            version = self.client.get_model_version(ref.name, number)
        except MlflowException as err:
            raise RegistryError(f"{ref.name} has no version {number}") from err
        return VersionView(version, tuple(a for a, v in aliases.items() if v == number))

    def versions(self, name: str) -> list[VersionView]:
        """Every version of ``name``, newest first, with aliases."""
        aliases = self.aliases(name)
        found = self.client.search_model_versions(f"name = '{_quote(name)}'")
        found.sort(key=lambda v: int(v.version), reverse=True)
        return [VersionView(v, tuple(a for a, n in aliases.items() if n == str(v.version))) for v in found]

    def list_models(self) -> list[RegisteredModel]:
        models: list[RegisteredModel] = []
        token = None
        while True:
            page = self.client.search_registered_models(max_results=200, page_token=token)
            models.extend(page)
            token = page.token
            if not token:
                return sorted(models, key=lambda m: m.name)

    # -- loading back -------------------------------------------------------------------------------

    def download(self, view: VersionView) -> Path:
        """The version's files in a local cache (``$KITCHEN_HOME/registry/NAME/VERSION``), fetched once."""
        version = view.version
        if urlsplit(version.source).scheme == "tinker":
            raise RegistryError(
                f"{version.name} v{version.version} lives on Tinker ({version.source}); "
                "sample it through the Tinker backend instead of downloading it"
            )
        target = home_dir("registry", version.name) / str(version.version)
        if target.is_dir():
            return target
        import mlflow.artifacts

        # A concurrent download of the same version may finish first: fine.
        with atomic_directory(target, already_done=Path.is_dir) as staging:
            fetched = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=version.source,
                    dst_path=str(staging / ".fetch"),
                    tracking_uri=self.tracking_uri,
                    registry_uri=self.registry_uri,
                )
            )
            for item in fetched.iterdir():  # the version's files, not the artifact folder holding them
                item.rename(staging / item.name)
            shutil.rmtree(staging / ".fetch")
        return target


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def _fmt_aliases(aliases: dict[str, str]) -> str:
    return ", ".join(f"{a} -> v{v}" for a, v in sorted(aliases.items()))
