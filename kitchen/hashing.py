"""Content hashes, so every manifest names exactly the bytes it stands for."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


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


def weights_content_hash(sampler_path: str) -> str:
    """The identity of saved weights: the adapter's bytes for a local ``file://`` path, the path itself
    for a remote (``tinker://``) one, which names immutable weights."""
    from urllib.parse import urlsplit
    from urllib.request import url2pathname

    parts = urlsplit(sampler_path)
    if parts.scheme != "file":
        return hash_json(sampler_path)
    directory = Path(url2pathname(parts.path))
    files = ("adapter_config.json", "adapter_model.safetensors")
    missing = [name for name in files if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"weights {sampler_path}: {', '.join(missing)} missing in {directory}")
    return hash_json({name: hash_file(directory / name) for name in files})
