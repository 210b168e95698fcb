"""Where Kitchen keeps what it makes: one root, ``KITCHEN_HOME`` (default ``~/.kitchen``)."""

from __future__ import annotations

import os
from pathlib import Path

from kitchen.locks import once


def kitchen_home() -> Path:
    """The root for caches, datasets, datums, checkpoints and the Dagster instance."""
    root = Path(os.environ.get("KITCHEN_HOME") or Path.home() / ".kitchen").expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def home_dir(*parts: str) -> Path:
    """A subdirectory of the Kitchen home, created on first use."""
    path = kitchen_home().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


#: Kitchen's Dagster instance settings (run retries on, one queued run at a time, no telemetry). Read
#: from the source checkout; an installed wheel has no scripts/ and keeps Dagster's defaults.
INSTANCE_SETTINGS = Path(__file__).resolve().parents[1] / "scripts" / "dagster.yaml"
_INSTANCE_READY = ".kitchen-instance-ready"


def dagster_home() -> Path:
    """``DAGSTER_HOME`` when set, else ``$KITCHEN_HOME/dagster``."""
    configured = os.environ.get("DAGSTER_HOME")
    return Path(configured).expanduser().resolve() if configured else kitchen_home() / "dagster"


def prepare_dagster_home(settings: Path | None = INSTANCE_SETTINGS) -> Path:
    """Make the persistent Dagster instance ready and point ``DAGSTER_HOME`` at it; returns its path.

    On first use: creates the directory, installs ``settings`` as ``dagster.yaml`` if it has none (an
    existing file is the user's and stays), and opens the instance once so its SQLite storages (runs,
    event-log index, schedules) exist. That happens under a file lock in the directory, because two
    processes creating the same SQLite tables at once fail one of them (``table runs already exists``);
    later calls see the marker and return at once.
    """
    home = dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    marker = home / _INSTANCE_READY

    def create() -> None:
        config = home / "dagster.yaml"
        if settings is not None and settings.is_file() and not config.exists():
            staging = home / ".dagster.yaml.tmp"
            staging.write_bytes(settings.read_bytes())
            staging.replace(config)
        import dagster as dg

        with dg.DagsterInstance.get() as instance:
            instance.get_runs(limit=1)
        marker.write_text("the Dagster instance here was created by kitchen.home.prepare_dagster_home\n")

    once(marker.is_file, create, home / ".kitchen-instance.lock")
    return home
