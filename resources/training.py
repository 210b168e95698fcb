"""The training backend as a swappable Dagster resource: the same assets run on any implementation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

from kitchen.contract import BackendUnavailableError, ServiceClient
from kitchen.manifests import BaseModelManifest

__all__ = ["BackendUnavailableError", "LocalBackend", "TrainingBackend"]

if TYPE_CHECKING:
    from resources.local_engine import LocalServiceClient


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

    @abstractmethod
    def starting_state(self, sampler_path: str, state_path: str | None, base_model: BaseModelManifest) -> str:
        """A training-state path holding a registered adapter's weights, to start a new run from."""

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
    dtype: str = "auto"
    """``auto``: float32 on a CPU, bfloat16 (under float32 LoRA weights) on a GPU."""
    num_threads: int | None = None
    max_batch_tokens: int = 8192
    """Tokens per forward/backward pass; larger batches run in micro-batches whose gradients add up. Bounds
    activation memory; on a GPU with memory to spare, a budget that holds the whole batch is faster."""
    root: str | None = None

    @property
    def backend_name(self) -> str:
        return "local"

    def resolve_base_model(self, name: str) -> BaseModelManifest:
        from kitchen.models.base import resolve_base_model

        return resolve_base_model(name)

    def service_client(self) -> LocalServiceClient:
        from resources.local_engine import LocalServiceClient

        return LocalServiceClient(
            root=Path(self.root) if self.root else None,
            device=self.device,
            dtype=self.dtype,
            num_threads=self.num_threads,
            max_batch_tokens=self.max_batch_tokens,
        )

    def starting_state(self, sampler_path: str, state_path: str | None, base_model: BaseModelManifest) -> str:
        """The recorded state when this machine still has it, else one imported from the adapter."""
        from resources.local_engine.checkpoints import CheckpointError, read_training_state
        from resources.local_engine.uris import path_from_uri

        if state_path and state_path.startswith("file://"):
            try:
                read_training_state(path_from_uri(state_path), with_optimizer=False)
                return state_path
            except (CheckpointError, FileNotFoundError):
                pass  # another machine's path, or cleaned up: the adapter itself is the source of truth
        return self.service_client().import_adapter(sampler_path)
