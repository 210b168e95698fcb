"""The Dagster code location the CLI drives, loaded by module name as ``dagster`` itself loads one.

The library never imports the Dagster layer; the CLI is a shell over it. ``KITCHEN_CODE_LOCATION`` names
another module (one that builds ``Definitions`` with ``build_definitions(backend)``), so a team's own code
location, with its own workflows registered, runs under ``kitchen run`` unchanged.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

CODE_LOCATION_ENV = "KITCHEN_CODE_LOCATION"
DEFAULT_CODE_LOCATION = "kitchen_assets.definitions"  # the module pyproject.toml's [tool.dagster] names


def load_definitions(backend: str | None) -> Any:
    """``build_definitions(backend)`` of the code location module."""
    name = os.environ.get(CODE_LOCATION_ENV, "").strip() or DEFAULT_CODE_LOCATION
    module = importlib.import_module(name)
    build = getattr(module, "build_definitions", None)
    if build is None:
        raise ValueError(f"{CODE_LOCATION_ENV}={name}: the module has no build_definitions(backend)")
    return build(backend)
