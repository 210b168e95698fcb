"""Run unmodified tinker-SDK programs offline on the local engine.

``install()`` makes ``tinker.ServiceClient`` and ``tinker.RestClient`` the local engine's for this
process; a program that then calls ``tinker.ServiceClient(...)`` (tinker-cookbook's loops do, at run time)
trains and samples here, on the CPU or a local GPU, with no key and no network::

    from resources.local_engine.dropin import install
    install()                                   # or: with installed(): ...
    asyncio.run(tinker_cookbook.supervised.train.main(config))

For a program you do not edit, the module runs it with the engine installed first::

    python -m resources.local_engine.dropin -m tinker_cookbook.recipes.sl_basic model_name=/path/to/model
    python -m resources.local_engine.dropin my_script.py --its-flags

Base models are local Hugging Face directories, Kitchen's packaged ``SmolLM2-135M-Instruct``, or Hub
ids (downloaded when the Hub is reachable). Engine settings come from keywords (to ``install``,
``installed`` or ``ServiceClient``), else from the environment: ``KITCHEN_HOME`` (checkpoints under
``$KITCHEN_HOME/engine``), ``KITCHEN_ENGINE_DEVICE`` (``auto``, ``cpu``, ``cuda``...),
``KITCHEN_ENGINE_DTYPE`` (``auto``, ``float32``, ``bfloat16``, ``float16``), ``KITCHEN_ENGINE_THREADS``.

What differs from the service: checkpoints are ``file://`` directories under the engine root, kept
until deleted (``ttl_seconds`` is checked, not enforced); ``save_weights_and_get_sampling_client``
writes nothing (the sampler holds an in-memory copy of the LoRA weights); ``stable_reinforce`` trains
with the importance-sampling objective on the recorded sampling logprobs (see ``losses``); sessions,
billing, projects, publishing and ``inflight`` samplers do not exist here.
"""

from __future__ import annotations

import os
import runpy
import shutil
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from tinker import types

from kitchen.home import home_dir
from resources.futures import EngineFuture, resolved, run_now
from resources.local_engine.checkpoints import (
    SAMPLER_MANIFEST,
    STATE_MANIFEST,
    CheckpointError,
    read_run_record,
    read_sampler,
    read_state_info,
)
from resources.local_engine.runtime import resolve_device, resolve_dtype
from resources.local_engine.sampling import LocalSamplingClient
from resources.local_engine.service import LocalServiceClient
from resources.local_engine.training import LocalTrainingClient
from resources.local_engine.uris import path_from_uri, uri_for_path

__all__ = ["EngineSettings", "RestClient", "ServiceClient", "install", "installed", "main"]

Status = Literal["success", "errored", "interrupted"]

_ENV_DEVICE = "KITCHEN_ENGINE_DEVICE"
_ENV_DTYPE = "KITCHEN_ENGINE_DTYPE"
_ENV_THREADS = "KITCHEN_ENGINE_THREADS"


@dataclass(frozen=True)
class EngineSettings:
    """Where and how the local engine runs; ``None`` fields fall back to the environment, then defaults."""

    root: Path | None = None
    device: str | None = None
    dtype: str | None = None
    num_threads: int | None = None

    def resolved(self) -> EngineSettings:
        """Every field filled in; a bad environment value fails here, naming the variable."""
        threads = self.num_threads
        if threads is None and (raw := os.environ.get(_ENV_THREADS)):
            try:
                threads = int(raw)
            except ValueError:
                raise ValueError(f"{_ENV_THREADS}={raw!r} is not an integer number of threads") from None
        if threads is not None and threads < 1:
            raise ValueError(f"num_threads ({_ENV_THREADS}) must be >= 1, got {threads}")
        device = self.device or os.environ.get(_ENV_DEVICE) or "auto"
        dtype = self.dtype or os.environ.get(_ENV_DTYPE) or "auto"
        try:
            resolve_dtype(dtype, resolve_device(device))
        except ValueError as err:
            raise ValueError(f"engine setting ({_ENV_DEVICE}/{_ENV_DTYPE}): {err}") from None
        return EngineSettings(
            root=Path(self.root).expanduser() if self.root is not None else home_dir("engine"),
            device=device,
            dtype=dtype,
            num_threads=threads,
        )

    def merged(self, other: EngineSettings) -> EngineSettings:
        """``self``, with ``other``'s values where ``self`` has none."""
        return replace(
            self,
            root=self.root if self.root is not None else other.root,
            device=self.device or other.device,
            dtype=self.dtype or other.dtype,
            num_threads=self.num_threads if self.num_threads is not None else other.num_threads,
        )


_installed_settings = EngineSettings()
"""What ``install`` was given: the defaults of every ``ServiceClient`` the program then constructs."""


def _resolve_base_model(name: str) -> str:
    """A local model directory as given; anything else through Kitchen's resolver (the packaged model, a
    Hub id), which fails naming what it tried."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    from kitchen.models.base import resolve_base_model

    return resolve_base_model(name).backend_model


class ServiceClient:
    """``tinker.ServiceClient`` on the local engine: the SDK's constructor (its arguments accepted; a
    session's ``user_metadata`` and ``display_name`` are kept, ``base_url``/``api_key``/``project_id``
    unused), use as a context manager, creation calls returning awaitable futures, ``create_rest_client``
    and ``close``. Engine settings are the keyword-only ``root``, ``device``, ``dtype``, ``num_threads``."""

    def __init__(
        self,
        user_metadata: dict[str, str] | None = None,
        project_id: str | None = None,
        *,
        display_name: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        default_headers_overrides: Mapping[str, str] | None = None,
        root: Path | str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        num_threads: int | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            warnings.warn(
                f"ServiceClient ignores unsupported arguments: {', '.join(sorted(kwargs))}",
                FutureWarning,
                stacklevel=2,
            )
        self.user_metadata = dict(user_metadata or {})
        self.display_name = display_name
        given = EngineSettings(Path(root) if root is not None else None, device, dtype, num_threads)
        self.settings = given.merged(_installed_settings).resolved()
        self._engine: LocalServiceClient | None = None
        self._lock = threading.Lock()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------------

    def __enter__(self) -> ServiceClient:
        self._check_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        status: Status = (
            "success" if exc_type is None else "errored" if issubclass(exc_type, Exception) else "interrupted"
        )
        self.close(status).result()

    def close(self, status: Status = "success", detail: str | None = None) -> EngineFuture[None]:
        """End the session: later creation calls raise. Clients already made keep working (their models
        are freed when they are garbage-collected)."""
        with self._lock:
            self._closed = True
        return resolved(None)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("ServiceClient is closed")

    @property
    def engine(self) -> LocalServiceClient:
        """The local engine behind this client, made on first use (constructing stays instant)."""
        with self._lock:
            self._check_open()
            if self._engine is None:
                settings = self.settings
                assert settings.root is not None and settings.device and settings.dtype
                self._engine = LocalServiceClient(
                    root=settings.root,
                    device=settings.device,
                    dtype=settings.dtype,
                    num_threads=settings.num_threads,
                )
            return self._engine

    # -- creation ----------------------------------------------------------------------------------------

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        optimizer: Any = None,
    ) -> EngineFuture[LocalTrainingClient]:
        """As the SDK: LoRA on attention, MLP and unembedding layers unless told otherwise."""
        engine = self.engine
        return run_now(
            lambda: engine.create_lora_training_client(
                _resolve_base_model(base_model),
                rank,
                seed,
                train_mlp=train_mlp,
                train_attn=train_attn,
                train_unembed=train_unembed,
                user_metadata=user_metadata,
                optimizer=optimizer,
            ).result()
        )

    def create_training_client_from_state(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
        optimizer: Any = None,
    ) -> EngineFuture[LocalTrainingClient]:
        engine = self.engine
        return run_now(
            lambda: engine.create_training_client_from_state(
                path,
                _resolve_base_model(base_model) if base_model else None,
                user_metadata,
                optimizer=optimizer,
            ).result()
        )

    def create_training_client_from_state_with_optimizer(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
    ) -> EngineFuture[LocalTrainingClient]:
        engine = self.engine
        return run_now(
            lambda: engine.create_training_client_from_state_with_optimizer(
                path, _resolve_base_model(base_model) if base_model else None, user_metadata
            ).result()
        )

    def create_sampling_client(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: Any = None,
        record_stability_info: bool = False,
    ) -> EngineFuture[LocalSamplingClient]:
        if model_path is None and base_model is None:
            raise ValueError("Either model_path or base_model must be provided")
        engine = self.engine
        return run_now(
            lambda: engine.create_sampling_client(
                model_path,
                _resolve_base_model(base_model) if base_model else None,
                record_stability_info=record_stability_info,
            ).result()
        )

    def create_rest_client(self) -> RestClient:
        """The SDK deprecates this for ``tinker.RestClient()``; both work here."""
        return RestClient(root=self.settings.root)

    # The SDK's deprecated async variants, still in its tutorials.

    async def create_lora_training_client_async(self, *args: Any, **kwargs: Any) -> LocalTrainingClient:
        return await self.create_lora_training_client(*args, **kwargs)

    async def create_training_client_from_state_async(self, *args: Any, **kwargs: Any) -> LocalTrainingClient:
        return await self.create_training_client_from_state(*args, **kwargs)

    async def create_training_client_from_state_with_optimizer_async(
        self, *args: Any, **kwargs: Any
    ) -> LocalTrainingClient:
        return await self.create_training_client_from_state_with_optimizer(*args, **kwargs)

    async def create_sampling_client_async(self, *args: Any, **kwargs: Any) -> LocalSamplingClient:
        return await self.create_sampling_client(*args, **kwargs)


# -- the REST client -----------------------------------------------------------------------------------------

_KINDS = {"weights": ("state", "training"), "sampler_weights": ("sampler", "sampler")}
"""Checkpoint id prefix (Tinker's path segment) -> (the engine's directory, ``CheckpointType``)."""


class RestClient:
    """``tinker.RestClient`` over the engine's checkpoint directories: training runs (one per training
    client) and their checkpoints, by run id or by checkpoint path. A training run is a session directory
    ``<root>/<run id>``; a checkpoint id is ``weights/<name>`` or ``sampler_weights/<name>``, as in
    ``tinker://<run id>/weights/<name>``. Errors are ``ValueError`` s naming what is missing."""

    def __init__(
        self,
        _holder: Any = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        root: Path | str | None = None,
    ) -> None:
        settings = EngineSettings(Path(root) if root is not None else None).merged(_installed_settings)
        root_dir = settings.resolved().root
        assert root_dir is not None
        self.root = root_dir

    def get_training_run(
        self, training_run_id: str, access_scope: str = "owned"
    ) -> EngineFuture[types.TrainingRun]:
        return run_now(lambda: _training_run(self._run_dir(training_run_id)))

    def get_training_run_by_tinker_path(
        self, tinker_path: str, access_scope: str = "owned"
    ) -> EngineFuture[types.TrainingRun]:
        return run_now(lambda: _training_run(_checkpoint_dir(tinker_path).parent.parent))

    def list_checkpoints(self, training_run_id: str) -> EngineFuture[types.CheckpointsListResponse]:
        def listing() -> types.CheckpointsListResponse:
            run_dir = self._run_dir(training_run_id)
            checkpoints = sorted(_checkpoints(run_dir), key=lambda c: c.time)
            return types.CheckpointsListResponse(checkpoints=checkpoints)

        return run_now(listing)

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> EngineFuture[None]:
        def delete() -> None:
            prefix, _, name = checkpoint_id.partition("/")
            if prefix not in _KINDS or not name or "/" in name:
                raise ValueError(
                    f"checkpoint id {checkpoint_id!r} is not weights/<name> or sampler_weights/<name>"
                )
            _delete(self._run_dir(training_run_id) / _KINDS[prefix][0] / name)

        return run_now(delete)

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> EngineFuture[None]:
        """Delete the checkpoint a path names (the cookbook's rolling checkpoints are deleted this way)."""
        return run_now(lambda: _delete(_checkpoint_dir(tinker_path)))

    def _run_dir(self, training_run_id: str) -> Path:
        if not training_run_id or "/" in training_run_id or training_run_id.startswith("."):
            raise ValueError(f"training run id {training_run_id!r} is not a plain name")
        run_dir = self.root / training_run_id
        if not run_dir.is_dir():
            raise ValueError(f"no training run {training_run_id!r} under {self.root}")
        return run_dir


def _checkpoint_dir(path: str) -> Path:
    """The directory of a checkpoint path (``file://.../<run>/state|sampler/<name>``), which must exist."""
    directory = path_from_uri(path)
    if directory.parent.name not in ("state", "sampler"):
        raise ValueError(f"{path} is not a local engine checkpoint (<root>/<run>/state|sampler/<name>)")
    if not directory.is_dir():
        raise ValueError(f"checkpoint {path} does not exist")
    return directory


def _delete(directory: Path) -> None:
    if not ((directory / STATE_MANIFEST).is_file() or (directory / SAMPLER_MANIFEST).is_file()):
        raise ValueError(f"{directory} is not a local engine checkpoint; refusing to delete it")
    shutil.rmtree(directory)


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)


def _checkpoints(run_dir: Path) -> list[types.Checkpoint]:
    found = []
    for prefix, (folder, kind) in _KINDS.items():
        manifest = STATE_MANIFEST if folder == "state" else SAMPLER_MANIFEST
        parent = run_dir / folder
        if not parent.is_dir():
            continue
        for directory in parent.iterdir():
            if directory.name.startswith(".") or not (directory / manifest).is_file():
                continue
            found.append(
                types.Checkpoint(
                    checkpoint_id=f"{prefix}/{directory.name}",
                    checkpoint_type=kind,  # type: ignore[arg-type]
                    time=_mtime(directory / manifest),
                    tinker_path=uri_for_path(directory),
                    size_bytes=sum(f.stat().st_size for f in directory.iterdir() if f.is_file()),
                )
            )
    return found


def _training_run(run_dir: Path) -> types.TrainingRun:
    checkpoints = _checkpoints(run_dir)
    record = read_run_record(run_dir)
    if record is not None:
        base_model, rank, metadata = record.base_model, record.lora_rank, record.user_metadata or None
    elif checkpoints:  # a session saved before run records existed: its checkpoints say enough
        first = path_from_uri(checkpoints[0].tinker_path)
        info = read_state_info(first) if checkpoints[0].checkpoint_type == "training" else read_sampler(first)
        base_model, rank, metadata = info.base_model, info.rank, None
    else:
        raise CheckpointError(f"{run_dir} holds no training run (no run record, no checkpoint)")

    def newest(kind: str) -> types.Checkpoint | None:
        of_kind = [c for c in checkpoints if c.checkpoint_type == kind]
        return max(of_kind, key=lambda c: c.time) if of_kind else None

    return types.TrainingRun(
        training_run_id=run_dir.name,
        base_model=base_model,
        model_owner="local",
        is_lora=True,
        lora_rank=rank,
        last_request_time=max([_mtime(run_dir), *(c.time for c in checkpoints)]),
        last_checkpoint=newest("training"),
        last_sampler_checkpoint=newest("sampler"),
        user_metadata=metadata,
    )


# -- installing it -------------------------------------------------------------------------------------------


def install(
    *,
    root: Path | str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    num_threads: int | None = None,
) -> Callable[[], None]:
    """Make ``tinker.ServiceClient`` and ``tinker.RestClient`` the local engine's for this process, with
    these engine settings as defaults; returns a function that puts the SDK's back. Code that bound the
    SDK's classes before (``from tinker import ServiceClient`` at import) keeps them: install first."""
    import tinker

    global _installed_settings
    settings = EngineSettings(Path(root) if root is not None else None, device, dtype, num_threads)
    settings.resolved()  # a bad setting fails now, not at the program's first call
    previous = (tinker.ServiceClient, tinker.RestClient, _installed_settings)
    # Stand-ins with the SDK's surface, not subclasses of its classes: setattr, as mypy rightly refuses
    # the assignment.
    setattr(tinker, "ServiceClient", ServiceClient)  # noqa: B010
    setattr(tinker, "RestClient", RestClient)  # noqa: B010
    _installed_settings = settings

    def uninstall() -> None:
        global _installed_settings
        setattr(tinker, "ServiceClient", previous[0])  # noqa: B010
        setattr(tinker, "RestClient", previous[1])  # noqa: B010
        _installed_settings = previous[2]

    return uninstall


@contextmanager
def installed(**settings: Any) -> Iterator[None]:
    """``install(**settings)`` for the duration of a ``with`` block."""
    uninstall = install(**settings)
    try:
        yield
    finally:
        uninstall()


_USAGE = (
    "usage: python -m resources.local_engine.dropin (-m MODULE | SCRIPT) [ARGS...]\n"
    "Runs a tinker-SDK program with the local engine installed behind tinker.ServiceClient.\n"
    "Engine settings: KITCHEN_HOME, KITCHEN_ENGINE_DEVICE, KITCHEN_ENGINE_DTYPE, KITCHEN_ENGINE_THREADS."
)


def main(argv: list[str] | None = None) -> int:
    """Run a module (``-m``) or script as ``__main__`` with the engine installed; its arguments follow."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or (args[0] == "-m" and len(args) < 2):
        print(_USAGE, file=sys.stderr if not args else sys.stdout)
        return 0 if args else 2
    if args[0] != "-m" and not Path(args[0]).is_file():
        print(f"error: no such script {args[0]!r}\n{_USAGE}", file=sys.stderr)
        return 2
    try:
        uninstall = install()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(args)
            runpy.run_path(args[0], run_name="__main__")
    finally:
        uninstall()
    return 0


if __name__ == "__main__":
    # Run the package's copy of this module, so the installed classes and settings are the ones
    # ``import resources.local_engine.dropin`` sees too.
    from resources.local_engine.dropin import main as _main

    sys.exit(_main())
