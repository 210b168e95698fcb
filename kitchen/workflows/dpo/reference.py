"""The frozen reference's log-probabilities of every comparison datum, computed once and stored.

tinker-cookbook computes them every step through a sampling client on the initial weights
(``compute_logprobs`` on the datum's full sequence, element 0 dropped); Kitchen computes the same numbers
once per (comparisons, reference weights, backend), as an asset, and keeps them in a directory named by
that identity, so a rerun with another beta or loss reuses them instead of scoring again, and the lineage
names the reference they came from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tinker import types

from kitchen.atomic import atomic_directory
from kitchen.contract import SamplingClient
from kitchen.hashing import hash_json
from kitchen.home import home_dir

#: Requests in flight at once: enough for the local engine to batch and Tinker to pipeline, few enough
#: not to queue thousands of requests on a remote service.
WINDOW = 256
_SCHEMA = pa.schema([("logprobs", pa.list_(pa.float32()))])
_META = "meta.json"


def full_sequence(datum: types.Datum) -> types.ModelInput:
    """The datum's whole token sequence: its input plus the last target (as tinker-cookbook rebuilds it)."""
    targets = datum.loss_fn_inputs["target_tokens"].tolist()
    return datum.model_input.append_int(int(targets[-1]))


def target_logprobs(
    client: SamplingClient,
    datums: Sequence[types.Datum],
    *,
    log: Callable[[str], None] | None = None,
    label: str = "",
) -> list[np.ndarray]:
    """``log p(target_t | input[: t + 1])`` of every datum's targets under ``client``'s weights."""
    out: list[np.ndarray] = []
    for start in range(0, len(datums), WINDOW):
        chunk = datums[start : start + WINDOW]
        futures = [client.compute_logprobs(full_sequence(d)) for d in chunk]
        for index, (datum, future) in enumerate(zip(chunk, futures, strict=True), start):
            scored = future.result()[1:]
            n = datum.model_input.length
            if len(scored) != n or any(x is None for x in scored):
                raise ValueError(
                    f"datum {index}: compute_logprobs returned {len(scored)} scores for {n} targets"
                )
            out.append(np.asarray(scored, dtype=np.float32))
        if log is not None:
            log(f"{label}scored {min(start + WINDOW, len(datums))}/{len(datums)} sequences")
    return out


def logprobs_hash(splits: Mapping[str, Sequence[np.ndarray]]) -> str:
    digest = hashlib.sha256()
    for split in sorted(splits):
        digest.update(f"\0{split}\0".encode())
        for values in splits[split]:
            array = np.asarray(values, dtype="<f4")
            digest.update(len(array).to_bytes(8, "little"))
            digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class StoredReference:
    directory: Path
    content_hash: str
    num_sequences: int
    seconds: float
    """How long computing them took (when they were computed, not when reused)."""


def reference_directory(identity: Mapping[str, object], root: str | Path | None = None) -> Path:
    """Where the log-probabilities of ``identity`` (comparisons, reference weights, backend) are kept."""
    base = Path(root) if root is not None else home_dir("reference_logprobs")
    return base / hash_json(dict(identity))[:24]


def load_stored_reference(directory: Path) -> StoredReference | None:
    """What an earlier run stored for the same identity, or None."""
    meta = directory / _META
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    return StoredReference(directory, info["content_hash"], info["num_sequences"], info["seconds"])


def save_reference_logprobs(
    splits: Mapping[str, Sequence[np.ndarray]], directory: Path, *, seconds: float
) -> StoredReference:
    """One Parquet file per split plus ``meta.json``, written to a temporary sibling and renamed, so a
    reader never sees half of them (``meta.json`` marks a complete directory)."""
    digest = logprobs_hash(splits)
    stored = StoredReference(directory, digest, sum(len(v) for v in splits.values()), seconds)
    # A concurrent writer of the same values may win the rename: fine.
    with atomic_directory(directory, already_done=lambda d: load_stored_reference(d) is not None) as staging:
        for split, values in splits.items():
            column = pa.array([np.asarray(v, dtype=np.float32) for v in values], type=_SCHEMA[0].type)
            pq.write_table(pa.Table.from_arrays([column], schema=_SCHEMA), staging / f"{split}.parquet")
        meta = {"content_hash": digest, "num_sequences": stored.num_sequences, "seconds": seconds}
        (staging / _META).write_text(json.dumps(meta))
    return stored


def read_reference_logprobs(path: str | Path) -> list[np.ndarray]:
    table = pq.read_table(path, schema=_SCHEMA)
    return [np.asarray(v, dtype=np.float32) for v in table.column("logprobs").to_pylist()]
