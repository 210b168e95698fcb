"""Registered-model names and references (``NAME``, ``NAME@alias``, ``NAME/version``, ``models:/...``).

Names are checked when a run is configured, so a name MLflow would refuse fails at launch, not after
training. The error names the rule that was broken.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import PurePath

from kitchen.hashing import hash_json
from kitchen.manifests import BaseModelManifest, DatasetManifest

# MLflow's database column holds 256 characters; SQLite does not enforce it, MySQL and PostgreSQL do.
MAX_NAME_LENGTH = 256
_SLUG_UNSAFE = re.compile(r"[^a-z0-9._-]+")
_ALIAS = re.compile(r"^[\w-]+$")


class InvalidModelName(ValueError):
    """A registered-model name that MLflow (or a ``models:/`` URI) cannot hold; says which rule."""


def validate_model_name(name: str) -> str:
    """Return ``name`` if MLflow accepts it as a registered-model name, else raise naming the rule."""
    rules: list[tuple[bool, str]] = [
        (not name or not name.strip(), "it must not be empty"),
        ("/" in name or ":" in name, "MLflow names cannot contain '/' or ':'"),
        ("@" in name, "it cannot contain '@', which separates name and alias in models:/NAME@alias"),
        (name != name.strip(), "it cannot start or end with whitespace"),
        (len(name) > MAX_NAME_LENGTH, f"it must be at most {MAX_NAME_LENGTH} characters (got {len(name)})"),
        (
            bool(name) and _resolves_elsewhere(name),
            "MLflow treats names as paths in places, so a name must not resolve to another one "
            f"(no '.' or '..' parts or doubled '/'; this one resolves to {posixpath.normpath(name)!r})",
        ),
    ]
    for broken, rule in rules:
        if broken:
            raise InvalidModelName(f"registered model name {name!r} is invalid: {rule}")
    # MLflow's own check, in case a newer MLflow is stricter than the rules above.
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
    except MlflowException as err:
        raise InvalidModelName(f"registered model name {name!r} is invalid: {err.message}") from err
    return name


def _resolves_elsewhere(name: str) -> bool:
    """MLflow's ``path_not_unique``: the name, read as a path, normalises to something else."""
    norm = posixpath.normpath(name)
    return norm != name or norm == "." or norm.startswith(("..", "/"))


def _slug(text: str, *, is_path: bool) -> str:
    """A lower-case, name-safe rendering of a reference; a local path contributes its last part only."""
    if is_path:
        text = PurePath(text.rstrip("/\\")).stem or text
    return _SLUG_UNSAFE.sub("-", text.lower()).strip("-.") or "model"


def derive_model_name(workflow: str, base_model: BaseModelManifest, dataset: DatasetManifest) -> str:
    """``<workflow>-<base>-<dataset>``: one registered model per workflow, base model and dataset.

    Hub ids keep their organisation (``huggingfacetb-smollm2-135m-instruct``); local paths contribute
    their last part, so the name does not depend on where a checkout lives.
    """
    base_name = base_model.name
    if base_model.source == "registry":  # models:/NAME@alias: the registered model's name
        base_name = base_name.removeprefix("models:/").split("@")[0].rsplit("/", 1)[0]
    base = _slug(base_name, is_path=base_model.source == "local")
    data = _slug(dataset.name, is_path=dataset.source in ("local-dir", "jsonl", "data-files"))
    name = f"{_slug(workflow, is_path=False)}-{base}-{data}"
    if len(name) > MAX_NAME_LENGTH:
        suffix = hash_json([workflow, base_model.name, dataset.name])[:12]
        name = f"{name[: MAX_NAME_LENGTH - 13]}-{suffix}"
    return validate_model_name(name)


@dataclass(frozen=True)
class ModelRef:
    """A registered model, optionally pinned to a version or an alias (neither: the latest version)."""

    name: str
    version: str | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.alias:
            return f"{self.name}@{self.alias}"
        return f"{self.name}/{self.version}" if self.version else self.name

    @property
    def uri(self) -> str:
        return f"models:/{self}"


def parse_model_ref(ref: str) -> ModelRef:
    """Parse ``NAME``, ``NAME@alias``, ``NAME/3`` or the same behind ``models:/``."""
    text = ref.removeprefix("models:/")
    if "@" in text:
        name, alias = text.split("@", 1)
        if not _ALIAS.match(alias):
            raise ValueError(
                f"model reference {ref!r}: alias {alias!r} may hold letters, digits, _ and - only"
            )
        return ModelRef(validate_model_name(name), alias=alias)
    if "/" in text:
        name, version = text.rsplit("/", 1)
        if not version.isdigit():
            raise ValueError(f"model reference {ref!r}: version {version!r} must be a positive integer")
        return ModelRef(validate_model_name(name), version=str(int(version)))
    return ModelRef(validate_model_name(text))
