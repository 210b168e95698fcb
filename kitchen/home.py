"""Where Kitchen keeps what it makes: one root, ``KITCHEN_HOME`` (default ``~/.kitchen``)."""

from __future__ import annotations

import os
from pathlib import Path


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


def dagster_home() -> Path:
    """``DAGSTER_HOME`` when set, else ``$KITCHEN_HOME/dagster`` (``kitchen.cli.instance`` prepares it)."""
    configured = os.environ.get("DAGSTER_HOME")
    return Path(configured).expanduser().resolve() if configured else kitchen_home() / "dagster"
