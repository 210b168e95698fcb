"""Stores asset outputs as readable JSON manifests under ``KITCHEN_HOME/manifests`` (never pickles)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import dagster as dg

from kitchen import manifests
from kitchen.home import home_dir


def manifest_path(asset_key: dg.AssetKey, root: Path | None = None) -> Path:
    base = root or home_dir("manifests")
    return base.joinpath(*asset_key.path).with_suffix(".json")


def read_manifest(asset_key: dg.AssetKey, root: Path | None = None) -> manifests.Manifest:
    """Load the latest stored manifest for ``asset_key``."""
    path = manifest_path(asset_key, root)
    if not path.is_file():
        raise FileNotFoundError(f"no manifest for asset {asset_key.to_user_string()} at {path}")
    return manifests.read_manifest_file(path)


class ManifestIOManager(dg.ConfigurableIOManager):
    """Each asset's manifest is a JSON file named by its key; written atomically."""

    root: str | None = None

    def _root(self) -> Path | None:
        return Path(self.root) if self.root else None

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        if not isinstance(obj, manifests.Manifest):
            raise TypeError(f"{context.asset_key}: assets must return a kitchen manifest, got {type(obj)}")
        path = manifest_path(context.asset_key, self._root())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifests.manifest_payload(obj), indent=2))
        os.replace(tmp, path)
        context.add_output_metadata({"manifest": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> Any:
        return read_manifest(context.asset_key, self._root())
