"""Load a registered version back for sampling and evaluation through the training-client contract."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

from kitchen.contract import SamplingClient, ServiceClient
from kitchen.hashing import hash_file, hash_json
from kitchen.registry.lineage import ADAPTER_FILES
from kitchen.registry.names import ModelRef
from kitchen.registry.register import DESCRIPTOR
from kitchen.registry.store import WEIGHTS_HASH_TAG, ModelRegistry, RegistryError, VersionView


def sampler_path(registry: ModelRegistry, ref: str | ModelRef) -> tuple[str, VersionView]:
    """What ``create_sampling_client(model_path=...)`` takes for ``ref``: ``tinker://`` as registered, or
    the ``file://`` URI of the version's adapter, downloaded once and checked against its weights hash."""
    view = registry.resolve(ref)
    source = str(view.version.source)
    if urlsplit(source).scheme == "tinker":
        return source, view
    local = registry.download(view)
    descriptor_path = local / DESCRIPTOR
    if not descriptor_path.is_file():
        raise RegistryError(
            f"{view.version.name} v{view.number} has no {DESCRIPTOR}: not registered by Kitchen"
        )
    descriptor = json.loads(descriptor_path.read_text())
    adapter = local / (descriptor["weights"].get("adapter_dir") or "adapter")
    expected = view.tags.get(WEIGHTS_HASH_TAG)
    actual = hash_json(
        {
            "base": descriptor["base_model"]["content_hash"],
            "adapter": {name: hash_file(adapter / name) for name in ADAPTER_FILES},
        }
    )
    if expected != actual:
        raise RegistryError(
            f"{view.version.name} v{view.number}: the adapter in {adapter} does not match the registered "
            f"weights hash ({actual[:12]} != {str(expected)[:12]}); delete {local} and retry"
        )
    return Path(adapter).resolve().as_uri(), view


def load_sampling_client(
    service: ServiceClient, registry: ModelRegistry, ref: str | ModelRef
) -> SamplingClient:
    """A sampling client on the registered weights ``ref`` names (``NAME@champion``, ``NAME/3``, ...)."""
    path, _ = sampler_path(registry, ref)
    return service.create_sampling_client(model_path=path).result()
