"""Resolve a dataset name to normalised train/test splits: built-in, local file or directory, or Hub id.

Every source goes through the real ``datasets`` loaders (``load_dataset("json", data_files=...)``,
``load_from_disk``, ``load_dataset(repo_id)``) so behaviour matches what users get elsewhere. What was
tried is recorded, so an unknown name fails with one message naming every possibility ruled out.
The Hub is asked for its revision sha with a bounded timeout first, so an unreachable Hub fails in
seconds instead of sitting in ``datasets``' retry loop; ``HF_HUB_OFFLINE`` means cache only.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
from datasets import Dataset, DatasetDict

from kitchen.data.builtin import builtin_dataset, get_builtin, list_builtin_datasets
from kitchen.data.formats import CHAT, RowFormat
from kitchen.data.schemas import NormalizedRow, SchemaError
from kitchen.home import home_dir
from kitchen.manifests import DatasetManifest

SourceKind = Literal["builtin", "hub", "local-dir", "jsonl", "data-files"]
TestSplitSource = Literal["source", "seeded-split"]

#: File suffix -> ``datasets`` packaged loader.
DATA_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
PREVIEW_ROWS = 3


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` or ``owner/name:config``: a name ``load_dataset_source`` would look up on the Hub."""
    return bool(_HUB_ID.match(name))


class DatasetSourceError(ValueError):
    """The name resolved to nothing usable; the message says what was tried and why each failed."""


@dataclass(frozen=True)
class LoadedDataset:
    """Normalised splits plus everything ``DatasetManifest`` records about where they came from."""

    name: str
    location: str
    source: SourceKind
    dataset: DatasetDict
    schema_found: str
    content_hash: str
    revision: str | None
    skipped_rows: dict[str, int]
    test_split_source: TestSplitSource
    preview: list[NormalizedRow]
    row_format: RowFormat = CHAT

    def preview_rows(self) -> list[dict[str, str]]:
        """The first rows, readable (the dataset asset's preview table)."""
        return [self.row_format.preview(row) for row in self.preview]

    @property
    def train_rows(self) -> int:
        return len(self.dataset["train"])

    @property
    def test_rows(self) -> int:
        return len(self.dataset["test"])

    def manifest(self, path: str | Path) -> DatasetManifest:
        return DatasetManifest(
            name=self.name,
            source=self.source,
            path=str(path),
            revision=self.revision,
            content_hash=self.content_hash,
            schema_found=self.schema_found,
            train_rows=self.train_rows,
            test_rows=self.test_rows,
            skipped_rows=dict(self.skipped_rows),
            test_split_source=self.test_split_source,
        )


def load_dataset_source(
    name: str,
    *,
    test_size: float | int = 0.1,
    seed: int = 0,
    max_rows: int | None = None,
    revision: str | None = None,
    split: str | None = None,
    hub_timeout: float = 10.0,
    row_format: RowFormat = CHAT,
) -> LoadedDataset:
    """Load ``name`` and normalise it to ``train``/``test`` splits of ``row_format``'s rows (default chat
    ``{"messages", "answer"}``).

    Tried in order: a built-in name; an existing path (``.jsonl``/``.json``/``.csv``/``.parquet``
    file, a ``save_to_disk`` directory, or a directory of data files whose ``train*``/``test*``
    names pick splits); a Hub id ``owner/name`` or ``owner/name:config``. ``split`` names the
    source split to train on (default: the first of ``row_format.train_splits`` present, usually
    ``train``, or the only split); the test split is the first of ``row_format.test_splits`` present
    (``test``, ``validation``, ...) unless ``split`` is given or there is none, in which case
    ``test_size`` rows are split off with ``seed``. ``max_rows`` caps the rows read from
    each source split (the first ones; built-ins generate no more than that).
    """
    tried: list[str] = []

    entry = get_builtin(name)
    if entry is not None:
        train_size = min(max_rows, entry.train_size) if max_rows is not None else None
        raw = builtin_dataset(name, seed=seed, train_size=train_size)
        return _prepare(
            entry.name, entry.name, "builtin", raw, None, test_size, seed, max_rows, split, row_format
        )
    known = ", ".join(sorted(b.name for b in list_builtin_datasets()))
    tried.append(f"not a built-in dataset (known: {known})")

    path = Path(name).expanduser()
    if path.exists():
        raw, kind = _load_local(path, row_format.split_names)
        return _prepare(
            name, str(path.resolve()), kind, raw, None, test_size, seed, max_rows, split, row_format
        )
    tried.append(f"no such file or directory: {path}")

    if path.suffix.lower() in DATA_FILE_FORMATS:
        tried.append("looks like a file path, so the Hugging Face Hub was not tried")
    elif _HUB_ID.match(name):
        hub = _load_hub(name, revision, hub_timeout, tried)
        if hub is not None:
            raw, sha = hub
            return _prepare(name, name, "hub", raw, sha, test_size, seed, max_rows, split, row_format)
    else:
        tried.append("not a Hugging Face Hub id (expected owner/name or owner/name:config)")
    raise DatasetSourceError(f"Cannot load dataset {name!r}: " + "; ".join(tried) + ".")


def save_dataset(loaded: LoadedDataset, out_dir: str | Path | None = None) -> Path:
    """Write ``loaded.dataset`` with ``save_to_disk`` under a content-addressed directory, atomically.

    The directory name ends with the content hash, so saving the same rows twice is a no-op and a
    reader never sees a half-written dataset (it is written to a temporary sibling, then renamed).
    """
    root = Path(out_dir) if out_dir is not None else home_dir("datasets")
    root.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", loaded.name.strip("/")).strip("._")[-60:] or "dataset"
    target = root / f"{slug}-{loaded.content_hash[:16]}"
    if (target / "dataset_dict.json").exists():
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        loaded.dataset.save_to_disk(str(staging))
        try:
            staging.rename(target)
        except OSError:
            if not (target / "dataset_dict.json").exists():  # a concurrent writer won the race: fine
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_saved_dataset(path: str | Path) -> DatasetDict:
    """Read back what ``save_dataset`` wrote."""
    loaded = datasets.load_from_disk(str(path))
    if not isinstance(loaded, DatasetDict):
        raise DatasetSourceError(f"{path} holds a single Dataset, not a train/test DatasetDict")
    return loaded


def content_hash(dataset: DatasetDict) -> str:
    """Stable sha256 of the normalised rows, split by split (independent of Arrow file layout)."""
    digest = hashlib.sha256()
    for split in sorted(dataset):
        digest.update(f"\0split:{split}\0".encode())
        for row in dataset[split]:
            digest.update(json.dumps(row, sort_keys=True, separators=(",", ":")).encode())
            digest.update(b"\n")
    return digest.hexdigest()


# -- local sources --------------------------------------------------------------------------------


def _local_cache_dir() -> str:
    """``datasets`` caches parsed local files; keep that under the Kitchen home, not ~/.cache."""
    return str(home_dir("cache", "datasets"))


def _load_local(path: Path, split_names: tuple[str, ...]) -> tuple[DatasetDict, SourceKind]:
    if path.is_file():
        fmt = DATA_FILE_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DatasetSourceError(f"{path} is a file but not a data file ({', '.join(DATA_FILE_FORMATS)})")
        raw = _load_files(fmt, {"train": [str(path)]})
        return raw, "jsonl" if fmt == "json" else "data-files"
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        saved = datasets.load_from_disk(str(path))
        return (saved if isinstance(saved, DatasetDict) else DatasetDict({"train": saved})), "local-dir"
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in DATA_FILE_FORMATS
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DatasetSourceError(
            f"{path} is a directory with neither a save_to_disk dataset nor data files "
            f"({', '.join(DATA_FILE_FORMATS)})"
        )
    formats = {DATA_FILE_FORMATS[p.suffix.lower()] for p in files}
    if len(formats) > 1:
        raise DatasetSourceError(f"{path} mixes data file formats {sorted(formats)}; use one format")
    data_files: dict[str, list[str]] = {}
    for file in files:
        data_files.setdefault(_split_of(file.relative_to(path), split_names), []).append(str(file))
    return _load_files(formats.pop(), data_files), "data-files"


def _split_of(relative: Path, split_names: tuple[str, ...]) -> str:
    """``train.jsonl``, ``test-00000-of-00001.parquet``, ``validation/part.csv``: the split it names, the
    longest of ``split_names`` a directory or the file's stem is or starts with (then ``-``, ``_`` or
    ``.``), so ``train_prefs-0000.parquet`` is ``train_prefs`` when the format knows that name and
    ``train`` otherwise. Files that name no split are training data."""
    longest_first = sorted(split_names, key=len, reverse=True)
    for part in (*relative.parts[:-1], relative.name.split(".")[0]):
        lowered = part.lower()
        for name in longest_first:
            if lowered == name or (lowered.startswith(name) and lowered[len(name)] in "-_."):
                return name
    return "train"


def _load_files(fmt: str, data_files: dict[str, list[str]]) -> DatasetDict:
    kwargs: dict[str, Any] = {}
    if fmt == "csv":  # read every column as text: "007" and "42" are answers, not numbers
        with open(next(iter(data_files.values()))[0], newline="") as handle:
            header = next(csv.reader(handle), [])
        kwargs["features"] = datasets.Features({column: datasets.Value("string") for column in header})
    try:
        loaded = datasets.load_dataset(fmt, data_files=data_files, cache_dir=_local_cache_dir(), **kwargs)
    except Exception as error:  # mixed column types, bad JSON, ...: say which files and how they were read
        files = sorted(f for fs in data_files.values() for f in fs)
        raise DatasetSourceError(f"datasets could not read {files} as {fmt}: {error}") from error
    assert isinstance(loaded, DatasetDict)
    return loaded


# -- the Hub --------------------------------------------------------------------------------------


def _hub_offline() -> tuple[bool, bool]:
    """(offline requested, libraries agree). The libraries read HF_HUB_OFFLINE at import, so an
    environment variable set later is only honoured by skipping the Hub altogether."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    libraries = bool(constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE)
    return env or libraries, libraries


def _load_hub(
    name: str, revision: str | None, timeout: float, tried: list[str]
) -> tuple[DatasetDict, str | None] | None:
    """The dataset and its revision sha, or None (with the reason appended to ``tried``)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id, _, config = name.partition(":")
    offline, libraries_offline = _hub_offline()
    if offline:
        if not libraries_offline:
            tried.append("HF_HUB_OFFLINE was set after the Hub libraries loaded, so the Hub was not tried")
            return None
        try:
            return _hub_load(repo_id, config, revision), revision
        except Exception as error:
            tried.append(
                "HF_HUB_OFFLINE is set and the Hugging Face Hub cache has no usable copy of "
                f"{repo_id} ({error})"
            )
            return None
    try:
        info = HfApi().dataset_info(repo_id, revision=revision, timeout=timeout)
    except GatedRepoError:
        tried.append(f"the Hugging Face Hub dataset {repo_id} is gated: accept its terms and log in")
        return None
    except RepositoryNotFoundError:
        tried.append(f"the Hugging Face Hub has no dataset {repo_id} (or it is private and no token is set)")
        return None
    except RevisionNotFoundError:
        tried.append(f"the Hugging Face Hub dataset {repo_id} has no revision {revision!r}")
        return None
    except Exception as error:  # network errors come from httpx, OSError or HfHubHTTPError
        tried.append(
            f"the Hugging Face Hub could not be reached ({type(error).__name__}: {error}); "
            "set HF_HUB_OFFLINE=1 to use a cached copy"
        )
        return None
    try:
        return _hub_load(repo_id, config, info.sha), info.sha
    except Exception as error:
        message = f"Hub dataset {name!r} (revision {info.sha}) failed to load: {error}"
        raise DatasetSourceError(message) from error


def _hub_load(repo_id: str, config: str, revision: str | None) -> DatasetDict:
    loaded = datasets.load_dataset(repo_id, config or None, revision=revision)
    if not isinstance(loaded, DatasetDict):
        raise DatasetSourceError(f"{repo_id} did not load as a DatasetDict ({type(loaded).__name__})")
    return loaded


# -- normalising and splitting --------------------------------------------------------------------


def _prepare(
    name: str,
    location: str,
    source: SourceKind,
    raw: DatasetDict,
    revision: str | None,
    test_size: float | int,
    seed: int,
    max_rows: int | None,
    split: str | None,
    row_format: RowFormat,
) -> LoadedDataset:
    train_name, test_name = _pick_splits(raw, split, name, row_format)
    train_raw = _head(raw[train_name], max_rows)
    schema = row_format.detect(train_raw.column_names)
    skipped: Counter[str] = Counter()

    train = row_format.normalize(train_raw, schema)
    skipped.update(train.skipped)
    if not train.rows:
        raise SchemaError(
            f"No usable rows in {name!r} split {train_name!r} (schema {schema}): "
            f"all {len(train_raw)} skipped ({_reasons(train.skipped)})"
        )
    test_rows: list[NormalizedRow] = []
    if test_name is not None:
        test = row_format.normalize(_head(raw[test_name], max_rows), schema)
        skipped.update(test.skipped)
        test_rows = test.rows

    train_ds = Dataset.from_list(train.rows, features=row_format.features)
    test_split_source: TestSplitSource = "source"
    if test_rows:
        test_ds = Dataset.from_list(test_rows, features=row_format.features)
    else:
        test_split_source = "seeded-split"
        train_ds, test_ds = _seeded_split(train_ds, test_size, seed, name)
    dataset = DatasetDict({"train": train_ds, "test": test_ds})
    return LoadedDataset(
        name=name,
        location=location,
        source=source,
        dataset=dataset,
        schema_found=schema,
        content_hash=content_hash(dataset),
        revision=revision,
        skipped_rows=dict(sorted(skipped.items())),
        test_split_source=test_split_source,
        preview=[dict(train_ds[i]) for i in range(min(PREVIEW_ROWS, len(train_ds)))],
        row_format=row_format,
    )


def _pick_splits(
    raw: DatasetDict, split: str | None, name: str, row_format: RowFormat
) -> tuple[str, str | None]:
    splits = list(raw)
    if split is not None:
        if split not in raw:
            raise DatasetSourceError(f"Dataset {name!r} has no split {split!r}; splits: {splits}")
        return split, None
    train = next((s for s in row_format.train_splits if s in raw), None)
    if train is None and len(splits) == 1:
        train = splits[0]
    if train is None:
        wanted = " or ".join(repr(s) for s in row_format.train_splits)
        raise DatasetSourceError(
            f"Dataset {name!r} has no {wanted} split; choose one with split=... from {splits}"
        )
    test = next((s for s in row_format.test_splits if s in raw and s != train), None)
    return train, test


def _head(ds: Dataset, max_rows: int | None) -> Dataset:
    return ds if max_rows is None or len(ds) <= max_rows else ds.select(range(max_rows))


def _seeded_split(ds: Dataset, test_size: float | int, seed: int, name: str) -> tuple[Dataset, Dataset]:
    try:
        parts = ds.train_test_split(test_size=test_size, seed=seed)
    except ValueError as error:
        raise DatasetSourceError(
            f"Dataset {name!r} has no test split and {len(ds)} usable rows cannot be split with "
            f"test_size={test_size}: {error}"
        ) from error
    return parts["train"], parts["test"]


def _reasons(counts: Counter[str]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in counts.most_common()) or "no rows"


def preview_text(loaded: LoadedDataset) -> str:
    """A few rows as readable text, for asset metadata and logs."""
    lines: list[str] = []
    for row in loaded.preview:
        for message in row["messages"]:
            lines.append(f"{message['role']}: {message['content']}")
        if row.get("answer") is not None:
            lines.append(f"(answer: {row['answer']})")
        lines.append("")
    return "\n".join(lines).strip()
