"""Export a registered version as a Hugging Face model folder that loads with ``transformers``/``peft`` alone.

Two steps, so every check runs before anything is written: ``plan_export`` resolves the version (an
unknown model or alias fails naming what exists), downloads and hash-checks its files, and works out the
base model (by Hub id for an adapter, as local weights for a merge), failing with one line naming what is
missing; ``write_export`` then builds the folder beside its destination and renames it into place, so a
failure leaves no half-written folder.

The adapter export holds ``adapter_config.json`` (naming the base by Hub id and revision) and
``adapter_model.safetensors`` (the registered bytes), the tokenizer and chat template, and the model
card. The merged export holds the base with the adapter merged in (PEFT's ``merge_and_unload``, float32,
as Kitchen's local engine samples), its ``config.json`` and ``generation_config.json``, the tokenizer and
the card. Kitchen's own files (``kitchen_sampler.json``, the descriptor) stay behind: they name paths on
the machine that trained.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

from kitchen.atomic import atomic_directory
from kitchen.hashing import hash_file
from kitchen.publish.base import (
    HubBase,
    PublishError,
    RecordedBase,
    base_weights,
    hub_base,
    read_descriptor,
    recorded_base,
    require_hub_base,
)
from kitchen.publish.card import CardInputs, render_card
from kitchen.registry.names import ModelRef, parse_model_ref
from kitchen.registry.store import ModelRegistry, RegistryError, VersionView

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CARD = "README.md"

Log = Callable[[str], None]


@dataclass(frozen=True)
class ExportPlan:
    """Everything an export needs, checked: the version, its files, and its base model."""

    view: VersionView
    adapter: Path  # the version's PEFT adapter directory (downloaded, hash-checked)
    tokenizer: Path
    recorded: RecordedBase
    hub: HubBase | None  # the base by Hub id (always set for an adapter export)
    merged: bool
    base_dir: Path | None  # the base's weights on this machine (merged exports only)
    tracking_uri: str  # for display, credentials removed

    @property
    def kind(self) -> str:
        return "merged" if self.merged else "adapter"

    @property
    def model_uri(self) -> str:
        return f"models:/{self.view.version.name}/{self.view.number}"


def plan_export(
    registry: ModelRegistry,
    ref: str | ModelRef,
    *,
    merged: bool = False,
    base_model: str | None = None,
    base_model_id: str | None = None,
) -> ExportPlan:
    """Check that ``ref`` can be exported (as an adapter, or ``merged``) and gather what it takes."""
    from kitchen.registry.loading import sampler_path

    parsed = parse_model_ref(ref) if isinstance(ref, str) else ref
    try:
        registry.preflight()
        path, view = sampler_path(registry, parsed)
    except RegistryError as err:
        raise PublishError(str(err)) from None
    if urlsplit(path).scheme != "file":
        raise PublishError(
            f"{parsed} lives on Tinker ({path}); export needs the adapter's files on this machine "
            "(download the checkpoint with the Tinker SDK and register it locally first)"
        )
    files = registry.download(view)
    descriptor = read_descriptor(files, f"{view.version.name} v{view.number}")
    recorded = recorded_base(registry, view, descriptor)
    if merged:
        hub = hub_base(recorded, base_model_id)
        base_dir: Path | None = base_weights(recorded, base_model)
    else:
        if base_model:
            raise PublishError(
                "--base-model is for --merged exports (an adapter export needs no base weights)"
            )
        hub = require_hub_base(recorded, base_model_id)
        base_dir = None
    tokenizer = files / "tokenizer"
    if not (tokenizer / "tokenizer_config.json").is_file():
        raise PublishError(f"{view.version.name} v{view.number} was registered without its tokenizer files")
    return ExportPlan(
        view=view,
        adapter=Path(url2pathname(urlsplit(path).path)),
        tokenizer=tokenizer,
        recorded=recorded,
        hub=hub,
        merged=merged,
        base_dir=base_dir,
        tracking_uri=registry.display_uri,
    )


def check_target(out: Path) -> None:
    """The destination must be new or an empty directory: an export never mixes with other files."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PublishError(f"{out} already exists and is not an empty folder; export into a new folder")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PublishError(f"cannot create {out}: {parent} is not a folder")


def write_export(
    plan: ExportPlan, out: Path, *, load_id: str | None = None, log: Log = lambda _: None
) -> Path:
    """Write the folder ``plan`` describes to ``out`` (atomically); ``load_id`` is what the card's snippet
    loads (the Hub repo when pushing; by default the folder)."""
    out = out.expanduser().absolute()
    check_target(out)
    # Not private: mkdtemp's 0700 would make the folder this user's only. An empty ``out`` (checked above)
    # is replaced by the rename.
    with atomic_directory(out, private=False) as staging:
        if plan.merged:
            log(f"merging the adapter into the base model ({plan.recorded.display_name})")
            _write_merged(plan, staging)
        else:
            _write_adapter(plan, staging)
        for source in sorted(plan.tokenizer.iterdir()):
            if source.is_file() and not source.name.startswith("."):
                shutil.copyfile(source, staging / source.name)
        listing = [
            (p.relative_to(staging).as_posix(), p.stat().st_size, hash_file(p))
            for p in sorted(staging.rglob("*"))
            if p.is_file()
        ]
        card = CardInputs(
            view=plan.view,
            recorded=plan.recorded,
            hub=plan.hub,
            merged=plan.merged,
            load_id=load_id or f"./{out.name}",
            files=listing,
            tracking_uri=plan.tracking_uri,
        )
        (staging / CARD).write_text(render_card(card))
    return out


def _adapter_config(plan: ExportPlan, base_name: str, revision: str | None) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((plan.adapter / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = base_name
    config["revision"] = revision
    return config


def _write_adapter(plan: ExportPlan, target: Path) -> None:
    assert plan.hub is not None
    config = _adapter_config(plan, plan.hub.repo_id, plan.hub.revision)
    (target / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(plan.adapter / ADAPTER_WEIGHTS, target / ADAPTER_WEIGHTS)


def _write_merged(plan: ExportPlan, target: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert plan.base_dir is not None
    with tempfile.TemporaryDirectory(prefix="kitchen-merge-") as tmp:
        config = _adapter_config(plan, str(plan.base_dir), None)
        (Path(tmp) / ADAPTER_CONFIG).write_text(json.dumps(config))
        shutil.copy2(plan.adapter / ADAPTER_WEIGHTS, Path(tmp) / ADAPTER_WEIGHTS)
        base = AutoModelForCausalLM.from_pretrained(str(plan.base_dir), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, tmp).merge_and_unload()
    model.config.name_or_path = ""  # never the base's directory on this machine
    model.save_pretrained(str(target), safe_serialization=True)
