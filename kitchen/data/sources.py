"""Resolve a dataset name to normalised train/test splits: built-in, local file or directory, or Hub id.

JSON, JSON lines and CSV files are read line by line by Kitchen itself, so one truncated line, a row with
the wrong number of fields or invalid UTF-8 is skipped and counted (with its line number in the manifest)
instead of failing a whole export, and rows of mixed types are judged one at a time. Parquet files,
``save_to_disk`` directories and Hub datasets go through the real ``datasets`` loaders
(``load_dataset``, ``load_from_disk``). What was tried is recorded, so an unknown name fails with one
message naming every possibility ruled out.
The Hub is asked for its revision sha with a bounded timeout first, so an unreachable Hub fails in
seconds instead of sitting in ``datasets``' retry loop; ``HF_HUB_OFFLINE`` means cache only.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

import datasets
from datasets import Dataset, DatasetDict

from kitchen.atomic import atomic_directory
from kitchen.data.builtin import builtin_dataset, get_builtin, list_builtin_datasets
from kitchen.data.dedup import DedupCounts, DedupMode, heldout_rows, unique_rows
from kitchen.data.formats import CHAT, RowFormat
from kitchen.data.schemas import MAX_SKIPPED_EXAMPLES, NormalizedRow, SchemaError
from kitchen.home import home_dir
from kitchen.locks import file_lock, home_lock
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
    skipped_examples: list[str] = field(default_factory=list)
    row_format: RowFormat = CHAT
    dedup: DedupCounts = field(default_factory=DedupCounts)

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
            skipped_examples=list(self.skipped_examples),
            test_split_source=self.test_split_source,
            dedup=self.dedup.as_dict(),
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
    dedup: DedupMode = "all",
) -> LoadedDataset:
    """Load ``name`` and normalise it to ``train``/``test`` splits of ``row_format``'s rows (default chat:
    ``{"messages", "answer"}``).

    Tried in order: a built-in name; an existing path (``.jsonl``/``.json``/``.csv``/``.parquet``
    file, a ``save_to_disk`` directory, or a directory of data files whose ``train*``/``test*``
    names pick splits); a Hub id ``owner/name`` or ``owner/name:config``. ``split`` names the
    source split to train on (default: the first of ``row_format.train_splits`` present, usually
    ``train``, or the only split); the test split is the first of ``row_format.test_splits`` present
    (``test``, ``validation``, ...) unless ``split`` is given or there is none, in which case
    ``test_size`` rows are split off with ``seed``. ``max_rows`` caps the rows read from
    each source split (the first ones; built-ins generate no more than that). ``dedup`` removes exact
    duplicates (``kitchen.data.dedup``), counted in ``LoadedDataset.dedup``.
    """
    tried: list[str] = []

    entry = get_builtin(name)
    if entry is not None:
        train_size = min(max_rows, entry.train_size) if max_rows is not None else None
        raw = builtin_dataset(name, seed=seed, train_size=train_size)
        return _prepare(
            entry.name, entry.name, "builtin", raw, None, test_size, seed, max_rows, split, row_format, dedup
        )
    known = ", ".join(sorted(b.name for b in list_builtin_datasets()))
    tried.append(f"not a built-in dataset (known: {known})")

    path = Path(name).expanduser()
    if path.exists():
        raw, kind = _load_local(path, row_format.split_names, max_rows)
        return _prepare(
            name, str(path.resolve()), kind, raw, None, test_size, seed, max_rows, split, row_format, dedup
        )
    tried.append(f"no such file or directory: {path}")

    if path.suffix.lower() in DATA_FILE_FORMATS:
        tried.append("looks like a file path, so the Hugging Face Hub was not tried")
    elif _HUB_ID.match(name):
        hub = _load_hub(name, revision, hub_timeout, tried)
        if hub is not None:
            raw, sha = hub
            return _prepare(name, name, "hub", raw, sha, test_size, seed, max_rows, split, row_format, dedup)
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
    if _saved(target):
        return target
    with atomic_directory(target, already_done=_saved) as staging:  # a concurrent writer may win: fine
        loaded.dataset.save_to_disk(str(staging))
    return target


def _saved(directory: Path) -> bool:
    return (directory / "dataset_dict.json").exists()


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
        # Column batches, rebuilt into the same row dicts: row-by-row Arrow access costs ~60 us a row.
        for batch in dataset[split].iter(batch_size=1000):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns), strict=True):
                row = dict(zip(columns, values, strict=True))
                digest.update(json.dumps(row, sort_keys=True, separators=(",", ":")).encode())
                digest.update(b"\n")
    return digest.hexdigest()


# -- local sources --------------------------------------------------------------------------------


@dataclass
class ParsedRows:
    """One split as read from JSON or CSV files: each row a dict with where it came from (``file line
    n``), and the lines that held no row, counted by reason."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, value: Any, where: str) -> None:
        if isinstance(value, dict):
            self.rows.append(value)
            self.where.append(where)
        else:
            self.skip("not_an_object", where, f"a JSON {type(value).__name__}, not an object")

    def skip(self, reason: str, where: str, detail: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < MAX_SKIPPED_EXAMPLES:
            self.examples.append(f"{where}: {reason} ({detail})")

    def extend(self, other: ParsedRows) -> None:
        self.rows += other.rows
        self.where += other.where
        self.skipped.update(other.skipped)
        self.examples += other.examples[: MAX_SKIPPED_EXAMPLES - len(self.examples)]

    def __len__(self) -> int:
        return len(self.rows)


#: A source split before normalising: Arrow (``datasets``) or Kitchen's own parse of JSON/CSV files.
RawSplit: TypeAlias = Dataset | ParsedRows
_PARSED_FORMATS = ("json", "csv")
_EXPECTED = {
    "json": "one JSON object per line (JSON lines) or a JSON array of objects",
    "csv": "a header row naming the columns, then one row per example",
}


def _local_cache_dir() -> str:
    """``datasets`` caches parsed local files; keep that under the Kitchen home, not ~/.cache."""
    return str(home_dir("cache", "datasets"))


def _load_local(
    path: Path, split_names: tuple[str, ...], max_rows: int | None = None
) -> tuple[Mapping[str, RawSplit], SourceKind]:
    if path.is_file():
        fmt = DATA_FILE_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DatasetSourceError(f"{path} is a file but not a data file ({', '.join(DATA_FILE_FORMATS)})")
        raw = _load_files(fmt, {"train": [str(path)]}, max_rows)
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
    return _load_files(formats.pop(), data_files, max_rows), "data-files"


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


def _load_files(
    fmt: str, data_files: dict[str, list[str]], max_rows: int | None = None
) -> Mapping[str, RawSplit]:
    if fmt in _PARSED_FORMATS:
        splits: dict[str, RawSplit] = {}
        for split, files in data_files.items():
            parsed = ParsedRows()
            for file in files:
                left = None if max_rows is None else max_rows - len(parsed)
                if left is not None and left <= 0:
                    break
                parsed.extend(_parse_file(fmt, Path(file), left))
            splits[split] = parsed
        return splits
    cache = Path(_local_cache_dir())
    try:
        # One process at a time fills the shared cache, whatever datasets' own locking covers.
        with file_lock(home_lock("datasets-cache")):
            loaded = datasets.load_dataset(fmt, data_files=data_files, cache_dir=str(cache))
    except Exception as error:  # a truncated or foreign file: say which files, how read, and the root cause
        files = sorted(f for fs in data_files.values() for f in fs)
        raise DatasetSourceError(
            f"datasets could not read {files} as {fmt}: {_root_cause(error)}; check that each is a valid "
            f"{fmt} file"
        ) from error
    assert isinstance(loaded, DatasetDict)
    return loaded


def _root_cause(error: BaseException) -> str:
    """The innermost cause's message, on one line (``datasets`` wraps it in "An error occurred while
    generating the dataset")."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    text = " ".join(str(error).split()) or "no reason given"
    return f"{type(error).__name__}: {text}"[:300]


def _parse_file(fmt: str, path: Path, max_rows: int | None) -> ParsedRows:
    """Rows of one JSON or CSV file; lines that hold no row are skipped and counted, not fatal."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetSourceError(f"cannot read {path}: {error.strerror or error}") from error
    if not data.strip():
        what = "0 bytes" if not data else "only whitespace"
        raise DatasetSourceError(f"{path} is empty ({what}): it holds no rows; expected {_EXPECTED[fmt]}")
    parsed = ParsedRows()
    (_parse_json if fmt == "json" else _parse_csv)(data, path.name, parsed, max_rows)
    return parsed


def _full(parsed: ParsedRows, max_rows: int | None) -> bool:
    return max_rows is not None and len(parsed) >= max_rows


def _parse_json(data: bytes, label: str, parsed: ParsedRows, max_rows: int | None) -> None:
    """A JSON array of objects, one (pretty-printed) object, or JSON lines; each line of JSON lines
    stands alone, so a truncated or non-UTF-8 line costs that line only."""
    if data.lstrip()[:1] in (b"[", b"{"):
        try:
            document = json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            document = None  # JSON lines, or broken somewhere: read line by line below
        if isinstance(document, list):
            for index, item in enumerate(document, 1):
                if _full(parsed, max_rows):
                    return
                parsed.add(item, f"{label} item {index}")
            return
        if isinstance(document, dict):
            parsed.add(document, f"{label} line 1")
            return
    for number, line in enumerate(data.split(b"\n"), 1):
        if _full(parsed, max_rows):
            return
        if not line.strip():
            continue
        where = f"{label} line {number}"
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            parsed.skip("invalid_utf8", where, f"byte {error.start + 1} is not UTF-8")
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            parsed.skip("invalid_json", where, f"column {error.colno}: {error.msg}")
            continue
        except (ValueError, RecursionError) as error:
            parsed.skip("invalid_json", where, type(error).__name__)
            continue
        parsed.add(value, where)


def _parse_csv(data: bytes, label: str, parsed: ParsedRows, max_rows: int | None) -> None:
    """Every field as text ("007" and "42" are answers, not numbers; "NA" is not missing), an empty
    field as missing; a record with the wrong number of fields or invalid UTF-8 is skipped."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long documents are rows too
    text = data.decode("utf-8-sig", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, [])
    except csv.Error as error:
        raise DatasetSourceError(
            f"{label}: the CSV header row cannot be read ({error}); check that the file is CSV"
        ) from error
    if not any(name.strip() for name in header):
        raise DatasetSourceError(f"{label}: no CSV header row; expected {_EXPECTED['csv']}")
    if not all(_utf8(name) for name in header):
        raise DatasetSourceError(f"{label}: the CSV header row is not valid UTF-8; save the file as UTF-8")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DatasetSourceError(
            f"{label}: the CSV header names column(s) {repeated} more than once; "
            "give each column its own name"
        )
    while not _full(parsed, max_rows):
        first = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            parsed.skip("malformed_csv", f"{label} line {first}", str(error))
            continue
        if not record:
            continue  # a blank line
        last = reader.line_num
        where = f"{label} line {first}" if last == first else f"{label} lines {first}-{last}"
        if len(record) != len(header):
            parsed.skip("wrong_field_count", where, f"{len(record)} fields, the header has {len(header)}")
        elif not all(_utf8(value) for value in record):
            parsed.skip("invalid_utf8", where, "a field is not UTF-8")
        else:
            parsed.add({name: value or None for name, value in zip(header, record, strict=True)}, where)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    raw: Mapping[str, RawSplit],
    revision: str | None,
    test_size: float | int,
    seed: int,
    max_rows: int | None,
    split: str | None,
    row_format: RowFormat,
    dedup: DedupMode = "all",
) -> LoadedDataset:
    train_name, test_name = _pick_splits(raw, split, name, row_format)
    train_raw = _head(raw[train_name], max_rows)
    if isinstance(train_raw, ParsedRows) and not train_raw.rows:
        expected = _EXPECTED["csv" if source == "data-files" else "json"]
        if not train_raw.skipped:
            raise DatasetSourceError(f"No rows in {name!r} split {train_name!r}; expected {expected}")
        raise DatasetSourceError(
            f"No rows could be read from {name!r}: all {sum(train_raw.skipped.values())} non-blank lines "
            f"were skipped ({_reasons(train_raw.skipped)}); first: {'; '.join(train_raw.examples[:3])}. "
            f"Fix those lines; expected {expected}"
        )
    if isinstance(train_raw, Dataset) and len(train_raw) == 0:
        raise DatasetSourceError(f"Dataset {name!r} split {train_name!r} has no rows")
    try:
        schema = _detect_schema(train_raw, row_format)
    except SchemaError as error:
        raise SchemaError(f"Dataset {name!r}: {error}") from None
    skipped: Counter[str] = Counter()
    examples: list[str] = []

    train = _normalize(train_raw, schema, train_name, skipped, examples, row_format)
    if not train:
        raise SchemaError(
            f"No usable rows in {name!r} split {train_name!r} (schema {schema}): all "
            f"{len(train_raw) + _unread(train_raw)} skipped ({_reasons(skipped)}); first: "
            f"{'; '.join(examples[:3])}. Fix those rows; accepted schemas: {row_format.describe()}"
        )
    test_rows: list[NormalizedRow] = []
    if test_name is not None:
        test_rows = _normalize(
            _head(raw[test_name], max_rows), schema, test_name, skipped, examples, row_format
        )

    train_duplicates = 0
    if dedup == "all":
        train, train_duplicates = unique_rows(train)
    train_ds = Dataset.from_list(train, features=row_format.features)
    test_split_source: TestSplitSource = "source"
    if test_rows:
        test_ds = Dataset.from_list(test_rows, features=row_format.features)
    else:
        test_split_source = "seeded-split"
        train_ds, test_ds = _seeded_split(train_ds, test_size, seed, name)
    counts = DedupCounts(dedup, train_duplicates)
    if dedup != "off":
        kept, test_duplicates, in_train = heldout_rows(test_ds.to_list(), train_ds.to_list())
        counts = DedupCounts(dedup, train_duplicates, test_duplicates, in_train)
        if not kept:
            raise DatasetSourceError(
                f"Dataset {name!r}: every held-out row is a duplicate or has a training prompt "
                f"({test_duplicates} duplicates, {in_train} prompts in train); add rows with distinct "
                "prompts, give a distinct test split, or set dedup='off' to keep them"
            )
        if len(kept) < len(test_ds):
            test_ds = Dataset.from_list(kept, features=row_format.features)
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
        skipped_examples=examples,
        row_format=row_format,
        dedup=counts,
    )


def _detect_schema(split: RawSplit, row_format: RowFormat) -> str:
    """The split's row schema. Parsed rows vote, each for the first schema its own keys fit, so one
    stray row of another schema (``prompt``/``completion`` among ``question``/``answer`` rows) is a
    skipped row rather than the schema every other row is judged by; ties go to the earlier schema."""
    if isinstance(split, Dataset):
        return row_format.detect(split.column_names)
    votes: Counter[str] = Counter()
    for keys in Counter(tuple(sorted(row)) for row in split.rows).items():
        with contextlib.suppress(SchemaError):
            votes[row_format.detect(keys[0])] += keys[1]
    if not votes:
        return row_format.detect(dict.fromkeys(key for row in split.rows for key in row))  # raises
    order = list(row_format.schemas)
    return max(votes, key=lambda name: (votes[name], -order.index(name)))


def _unread(split: RawSplit) -> int:
    return sum(split.skipped.values()) if isinstance(split, ParsedRows) else 0


def _normalize(
    split: RawSplit,
    schema: str,
    split_name: str,
    skipped: Counter[str],
    examples: list[str],
    row_format: RowFormat,
) -> list[NormalizedRow]:
    """The split's usable rows; lines that held no row and rows that do not fit ``schema`` are added to
    ``skipped`` (by reason) and the first of them to ``examples`` (by place)."""
    if isinstance(split, ParsedRows):
        skipped.update(split.skipped)
        examples += split.examples[: MAX_SKIPPED_EXAMPLES - len(examples)]
        result = row_format.normalize(split.rows, schema, split.where)
    else:
        result = row_format.normalize(split, schema, label=f"{split_name} row")
    skipped.update(result.skipped)
    examples += result.examples[: MAX_SKIPPED_EXAMPLES - len(examples)]
    return result.rows


def _pick_splits(
    raw: Mapping[str, RawSplit], split: str | None, name: str, row_format: RowFormat = CHAT
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


def _head(split: RawSplit, max_rows: int | None) -> RawSplit:
    if max_rows is None or len(split) <= max_rows:
        return split
    if isinstance(split, Dataset):
        return split.select(range(max_rows))
    return ParsedRows(split.rows[:max_rows], split.where[:max_rows], split.skipped, split.examples)


def _seeded_split(ds: Dataset, test_size: float | int, seed: int, name: str) -> tuple[Dataset, Dataset]:
    try:
        parts = ds.train_test_split(test_size=test_size, seed=seed)
    except ValueError as error:
        raise DatasetSourceError(
            f"Dataset {name!r} has no test split and {len(ds)} usable rows cannot be split with "
            f"test_size={test_size} ({' '.join(str(error).split())}); add rows, or give a test split "
            "(a test file beside the training file)"
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
