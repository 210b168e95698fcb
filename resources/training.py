"""The training backend as a swappable Dagster resource: the same assets run on any implementation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import dagster as dg

from kitchen.contract import ServiceClient
from kitchen.manifests import BaseModelManifest


class BackendUnavailableError(RuntimeError):
    """The backend cannot be used (missing credentials, unreachable service); raised before any work."""


class TrainingBackend(dg.ConfigurableResource, ABC):
    """Makes the contract's ``ServiceClient``; bind ``LocalBackend`` or ``TinkerBackend`` as ``training``."""

    @property
    @abstractmethod
    def backend_name(self) -> str: ...

    @abstractmethod
    def service_client(self) -> ServiceClient: ...

    @abstractmethod
    def resolve_base_model(self, name: str) -> BaseModelManifest:
        """Turn a user's model name into what this backend trains on, or fail naming what was tried."""

    def preflight(self) -> None:
        """Fail fast (before any asset does work) when the backend cannot be used; a no-op by default."""

    def is_transient(self, error: BaseException) -> bool:
        """Whether retrying the training step may succeed (and resume from its last checkpoint).

        Network-shaped errors by default; a backend adds its client library's retryable errors.
        """
        return isinstance(error, ConnectionError | TimeoutError | BackendUnavailableError)


class LocalBackend(TrainingBackend):
    """Kitchen's own PyTorch + PEFT engine: laptops, CI and single GPUs."""

    device: str = "auto"
    num_threads: int | None = None
    root: str | None = None

    @property
    def backend_name(self) -> str:
        return "local"

    def resolve_base_model(self, name: str) -> BaseModelManifest:
        from kitchen.models.base import resolve_base_model

        return resolve_base_model(name)

    def service_client(self) -> ServiceClient:
        from resources.local_engine import LocalServiceClient

        return LocalServiceClient(
            root=Path(self.root) if self.root else None, device=self.device, num_threads=self.num_threads
        )
