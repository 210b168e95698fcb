"""A registered model as the starting point of another run: ``--model models:/NAME@champion``.

This is how workflows chain (SFT champion -> DPO or RL -> distilled student). The version's descriptor
names its base model, which the backend resolves as usual and which must hash to what was trained on;
the version's adapter becomes the weights training starts from (a fresh optimizer, as tinker-cookbook's
``load_checkpoint_path`` does) and the "base" column of the new run's evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from kitchen.manifests import BaseModelManifest
from kitchen.registry.loading import sampler_path
from kitchen.registry.names import parse_model_ref
from kitchen.registry.register import DESCRIPTOR
from kitchen.registry.store import ModelRegistry, RegistryError

REGISTERED_PREFIX = "models:/"

#: (sampler path, recorded training-state path, base model) -> a state path the backend can start from.
StartingState = Callable[[str, str | None, BaseModelManifest], str]


def is_registered_ref(name: str) -> bool:
    return name.strip().startswith(REGISTERED_PREFIX)


def resolve_registered_base(
    registry: ModelRegistry,
    ref_text: str,
    *,
    resolve_base: Callable[[str], BaseModelManifest],
    starting_state: StartingState,
) -> BaseModelManifest:
    """The manifest of a registered version as a starting model; fails naming what exists."""
    ref = parse_model_ref(ref_text.strip())
    path, view = sampler_path(registry, ref)
    local = registry.download(view)
    descriptor = json.loads((local / DESCRIPTOR).read_text())
    recorded = descriptor["base_model"]
    base = resolve_base(recorded["name"])
    if base.content_hash != recorded["content_hash"]:
        raise RegistryError(
            f"{ref}: its base model {recorded['name']!r} resolves here to weights with hash "
            f"{base.content_hash[:12]}, but the adapter was trained on {recorded['content_hash'][:12]}"
        )
    number = view.number
    state = starting_state(path, view.tags.get("kitchen.weights.state_path"), base)
    return base.model_copy(
        update={
            "name": ref_text.strip(),
            "source": "registry",
            "registered_version": f"{REGISTERED_PREFIX}{ref.name}/{number}",
            "init_state": state,
            "sampler_path": path,
            "lora_rank": int(descriptor["weights"]["lora_rank"]),
            "content_hash": view.tags.get("kitchen.weights.hash") or base.content_hash,
        }
    )
