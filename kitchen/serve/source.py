"""What the server samples from, and following a registry alias as it moves.

A ``Locator`` says which version a reference names right now (cheap: one registry lookup) and where its
weights are (``sampler_path``: downloads and checks the version once). ``ModelSource`` holds the version
being served and polls the locator on an interval; when ``champion`` moves it opens a sampling client on
the new version and swaps it in between requests, so no restart is needed and no request sees a mix:
each request takes one ``Served`` snapshot and names the version that produced it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from kitchen.contract import SamplingClient
from kitchen.registry.loading import sampler_path
from kitchen.registry.names import ModelRef
from kitchen.registry.store import ModelRegistry

log = logging.getLogger("kitchen.serve")


class Locator(Protocol):
    name: str
    """The id clients ask for (``NAME@champion``, ``NAME/3`` or a sampler path)."""

    def current_version(self) -> str:
        """The version the reference names now (``NAME/3``); cheap enough to call every few seconds."""
        ...

    def sampler_path(self, version: str) -> str:
        """What ``create_sampling_client(model_path=...)`` takes for ``version``."""
        ...


class RegistryLocator:
    """A registered model reference; an alias or a bare name is re-resolved on every check."""

    def __init__(self, registry: ModelRegistry, ref: ModelRef) -> None:
        self.registry = registry
        self.ref = ref
        self.name = str(ref)

    def current_version(self) -> str:
        view = self.registry.resolve(self.ref)
        return f"{view.version.name}/{view.number}"

    def sampler_path(self, version: str) -> str:
        name, number = version.rsplit("/", 1)
        path, _ = sampler_path(self.registry, ModelRef(name, version=number))
        return path

    def backend(self) -> str | None:
        """The backend that trained the version named now (its ``kitchen.backend`` tag)."""
        return self.registry.resolve(self.ref).tags.get("kitchen.backend")


class SamplerLocator:
    """A fixed sampler path (a run's ``file://`` or ``tinker://`` weights): it never moves."""

    def __init__(self, path: str) -> None:
        if not urlsplit(path).scheme and Path(path).exists():
            path = Path(path).resolve().as_uri()
        self.name = path
        self._path = path

    def current_version(self) -> str:
        return self._path

    def sampler_path(self, version: str) -> str:
        return self._path


@dataclass(frozen=True)
class Served:
    """One version being served: its name, its sampling client and that client's tokenizer."""

    version: str
    client: SamplingClient
    tokenizer: Any
    since: float


class ModelSource:
    """The version to serve now, refreshed from ``locator`` every ``poll_s`` seconds (``None``: never)."""

    def __init__(
        self,
        locator: Locator,
        open_sampler: Callable[[str], SamplingClient],
        *,
        poll_s: float | None = 5.0,
    ) -> None:
        self.locator = locator
        self.name = locator.name
        self._open = open_sampler
        self.poll_s = poll_s
        self._served: Served | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_checked: float | None = None
        self.last_error: str | None = None

    @property
    def loaded(self) -> bool:
        return self._served is not None

    @property
    def served(self) -> Served:
        served = self._served
        if served is None:
            raise RuntimeError("ModelSource.load() has not been called")
        return served

    def load(self) -> Served:
        """Open the version named now; the first call's failure is the caller's (fail at startup)."""
        version = self.locator.current_version()
        with self._lock:
            if self._served is None or self._served.version != version:
                client = self._open(self.locator.sampler_path(version))
                previous = self._served
                self._served = Served(version, client, client.get_tokenizer(), time.time())
                if previous is not None:
                    log.info("%s moved: now serving %s (was %s)", self.name, version, previous.version)
            self.last_checked = time.time()
            self.last_error = None
            return self._served

    def refresh(self) -> bool:
        """One check; True if a new version is now served. A failing registry keeps the old version
        serving and records the reason (``last_error``, shown by ``/health``)."""
        before = self._served.version if self._served is not None else None
        try:
            return self.load().version != before
        except Exception as err:
            self.last_error = f"{type(err).__name__}: {err}"[:500]
            log.warning("checking %s failed, still serving %s: %s", self.name, before, self.last_error)
            return False

    def start(self) -> None:
        """Start polling in a daemon thread (a no-op without ``poll_s``)."""
        if self.poll_s is None or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="kitchen-serve-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _poll(self) -> None:
        assert self.poll_s is not None
        while not self._stop.wait(self.poll_s):
            self.refresh()
