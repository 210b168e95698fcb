"""Checkpoint addresses: the local engine names checkpoints by ``file://`` URIs.

Tinker names checkpoints ``tinker://...``; the local engine uses ``file:///abs/dir`` in the same
places, so workflow code passes paths through untouched whichever backend made them.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

_SCHEME = "file"


def uri_for_path(path: Path | str) -> str:
    """The ``file://`` URI of ``path`` (made absolute first)."""
    return Path(path).expanduser().resolve().as_uri()


def path_from_uri(uri: str) -> Path:
    """The local path a ``file://`` URI names.

    Anything else is refused rather than guessed at: a ``tinker://`` path belongs to the Tinker
    service, and a bare path is ambiguous about where it came from.
    """
    parsed = urlparse(uri)
    if parsed.scheme != _SCHEME:
        hint = " (tinker:// paths live on the Tinker service)" if parsed.scheme == "tinker" else ""
        raise ValueError(
            f"the local engine addresses checkpoints by file:// URIs, got {uri!r}{hint}; "
            "use uri_for_path() to make one"
        )
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"file URI {uri!r} names a remote host {parsed.netloc!r}")
    return Path(url2pathname(parsed.path))


def check_checkpoint_name(name: str) -> str:
    """A checkpoint name becomes one directory name, so it must not escape or hide inside the layout."""
    if not isinstance(name, str) or not name:
        raise ValueError("checkpoint name must be a non-empty string")
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith(".") or "\x00" in name:
        raise ValueError(
            f"checkpoint name {name!r} must be a plain directory name (no separators, not starting with '.')"
        )
    return name
