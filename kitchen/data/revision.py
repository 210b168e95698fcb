"""The current revision of a dataset source, found cheaply: what a retraining sensor compares between ticks.

Names resolve in the same order as ``load_dataset_source``: a built-in dataset (generated from code, so
its revision never changes), an existing local file or directory (a content hash of its bytes, by the
same ``kitchen.hashing`` helpers the manifests use), or a Hub id (the revision sha from one
``HfApi().dataset_info`` call with a bounded timeout). Nothing is downloaded or parsed.

Hashing a large local file on every check would make each check as slow as the file is big, so a check
is given the previous result: when the files' names, sizes and modification times (the *signature*)
are unchanged, the previous hash is reused without reading a byte.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kitchen.data.builtin import get_builtin
from kitchen.data.sources import DATA_FILE_FORMATS, looks_like_hub_id
from kitchen.hashing import hash_json, hash_tree
from kitchen.hub import HUB_UNREACHABLE_ERRORS

RevisionKind = Literal["builtin", "local", "hub"]
#: A built-in dataset is generated from code and a seed: the same name always means the same rows.
BUILTIN_REVISION = "builtin"
# Hub calls run here so a check can stop waiting at its deadline: besides the request's own timeout,
# huggingface_hub's first request in a process fetches /api/agent-harnesses (3 s timeout of its own).
_HUB_CALLS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kitchen-hub-revision")


class SourceUnavailable(Exception):
    """The source's revision cannot be found right now (missing file, Hub unreachable or unknown);
    the message says which and why."""


@dataclass(frozen=True)
class SourceRevision:
    name: str
    kind: RevisionKind
    revision: str
    #: Local sources only: hash of file names, sizes and mtimes; equal signature means equal revision.
    signature: str | None = None


def source_revision(
    name: str,
    *,
    hub_revision: str | None = None,
    hub_timeout: float = 5.0,
    previous: SourceRevision | None = None,
) -> SourceRevision:
    """The revision of dataset source ``name`` now; raises ``SourceUnavailable`` with the reason. A Hub
    check returns or raises within ``hub_timeout`` seconds.

    ``hub_revision`` is the branch or tag whose sha is asked for (default: the repository's default
    branch). ``previous`` (the last result for ``name``) lets an unchanged local source skip hashing.
    """
    if get_builtin(name) is not None:
        return SourceRevision(name, "builtin", BUILTIN_REVISION)
    path = Path(name).expanduser()
    if path.exists():
        return _local_revision(name, path, previous)
    if path.suffix.lower() in DATA_FILE_FORMATS:
        raise SourceUnavailable(f"no such file: {path}")
    if looks_like_hub_id(name):
        return SourceRevision(name, "hub", _hub_sha(name, hub_revision, hub_timeout))
    raise SourceUnavailable(
        f"{name!r} is neither a built-in dataset, an existing path, nor a Hub id (owner/name)"
    )


def _signature(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    entries = []
    for file in files:
        stat = file.stat()
        entries.append([str(file.relative_to(path)), stat.st_size, stat.st_mtime_ns])
    return hash_json(entries)


def _local_revision(name: str, path: Path, previous: SourceRevision | None) -> SourceRevision:
    try:
        signature = _signature(path)
        if previous is not None and previous.kind == "local" and previous.signature == signature:
            return previous
        return SourceRevision(name, "local", hash_tree(path), signature)
    except OSError as error:  # removed or unreadable between the existence check and the read
        raise SourceUnavailable(f"cannot read {path}: {error}") from error


def _hub_sha(name: str, revision: str | None, timeout: float) -> str:
    from huggingface_hub import HfApi

    if os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        raise SourceUnavailable(f"HF_HUB_OFFLINE is set, so the Hub was not asked for {name}'s revision")
    repo_id = name.partition(":")[0]
    call = _HUB_CALLS.submit(HfApi().dataset_info, repo_id, revision=revision, timeout=timeout)
    try:
        info = call.result(timeout=timeout)
    except FutureTimeout:
        raise SourceUnavailable(
            f"the Hugging Face Hub did not answer for {repo_id} within {timeout:g}s"
        ) from None
    except HUB_UNREACHABLE_ERRORS as error:
        raise SourceUnavailable(
            f"the Hugging Face Hub did not give {repo_id}'s revision ({type(error).__name__}: {error})"
        ) from error
    if not info.sha:
        raise SourceUnavailable(f"the Hugging Face Hub returned no revision sha for {repo_id}")
    return info.sha
