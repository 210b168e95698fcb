"""Content hashes, so every manifest names exactly the bytes it stands for."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

_CHUNK = 1 << 20
#: What a sampler checkpoint's identity is made of: the PEFT adapter as saved. Not the engine's own
#: ``kitchen_sampler.json`` beside it, which records a per-session id and the step.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_json(obj: Any) -> str:
    """Hash of a JSON-serialisable object with sorted keys (stable across runs)."""
    return hash_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(root: Path) -> str:
    """Hash of every file under ``root``: relative names and contents, in sorted order."""
    if root.is_file():
        return hash_file(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(hash_file(path).encode())
    return digest.hexdigest()


def weights_content_hash(sampler_uri: str) -> str:
    """The identity of trained weights: the adapter files' bytes for local (``file://``) weights, the
    path itself for Tinker weights (``tinker://`` paths name immutable weights).

    File URIs are decoded (``%20`` is a space). Missing weights raise ``FileNotFoundError`` rather than
    hashing nothing, and any other scheme raises ``ValueError``.
    """
    parts = urlsplit(sampler_uri)
    if parts.scheme == "tinker":
        return hash_json(sampler_uri)
    if parts.scheme != "file":
        raise ValueError(f"cannot hash weights at {sampler_uri!r}: expected a file:// or tinker:// URI")
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"cannot hash weights at {sampler_uri!r}: the file URI names host {parts.netloc!r}")
    directory = Path(url2pathname(parts.path))
    if not directory.is_dir():
        raise FileNotFoundError(f"trained weights {sampler_uri} do not exist (no directory {directory})")
    missing = [name for name in ADAPTER_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"trained weights {sampler_uri} lack {', '.join(missing)} in {directory}")
    return hash_json({name: hash_file(directory / name) for name in ADAPTER_FILES})
