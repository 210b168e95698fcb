"""Chat rows -> ``tinker.types.Datum``: the tokens the model sees, the tokens it predicts, and their weights.

Conversations are rendered through the tokenizer's own chat template (so training matches what the
model sees at inference, default system prompt included). Each assistant message's span is found
by rendering prefixes of the conversation with and without the generation prompt: the span starts
after ``<|im_start|>assistant\\n`` and ends with the end-of-turn token (``<|im_end|>``), which is
trained so the model learns to stop; the header and the newline after it are not (tinker-cookbook's
convention). Tokens are then right-shifted: ``model_input = tokens[:-1]``, ``target_tokens =
tokens[1:]``, ``weights = mask[1:]``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tinker import types

from kitchen.atomic import atomic_directory
from kitchen.hashing import hash_json
from kitchen.home import home_dir
from kitchen.manifests import DatumsManifest

if TYPE_CHECKING:
    from datasets import DatasetDict
    from transformers import PreTrainedTokenizerBase

TrainOn = Literal["last_assistant", "all_assistant", "all"]
TRAIN_ON_CHOICES: tuple[TrainOn, ...] = ("last_assistant", "all_assistant", "all")

DATUM_SCHEMA = pa.schema(
    [
        ("input_tokens", pa.list_(pa.int32())),
        ("target_tokens", pa.list_(pa.int64())),
        ("weights", pa.list_(pa.float32())),
    ]
)


class TemplateError(ValueError):
    """The chat template does not render a conversation as a prefix-extension of its parts."""


@dataclass(frozen=True)
class RenderResult:
    """One row's datum, or why it was dropped. ``num_tokens`` counts the full rendering."""

    datum: types.Datum | None
    drop_reason: str | None = None
    truncated: bool = False
    num_tokens: int = 0


# -- rendering ------------------------------------------------------------------------------------


def _chat_text(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]], gen: bool) -> str:
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=gen
    )
    if not isinstance(text, str):
        raise TemplateError(f"apply_chat_template returned {type(text).__name__}, expected text")
    return text


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # The chat template already writes any BOS/special tokens; transformers tokenizes it the same way.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return ids


def render_weighted_tokens(
    messages: Sequence[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase, train_on: TrainOn
) -> tuple[list[int], list[float]]:
    """The whole conversation's tokens and a 0/1 mask over them (before shifting or truncation)."""
    if train_on not in TRAIN_ON_CHOICES:
        raise ValueError(f"train_on must be one of {TRAIN_ON_CHOICES}, got {train_on!r}")
    full = _chat_text(tokenizer, messages, gen=False)
    if train_on == "all":
        tokens = _encode(tokenizer, full)
        return tokens, [1.0] * len(tokens)

    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        assistant = assistant[-1:] if assistant and assistant[-1] == len(messages) - 1 else []
    char_spans = []
    for i in assistant:
        start_text = _chat_text(tokenizer, messages[:i], gen=True)
        end_text = _chat_text(tokenizer, messages[: i + 1], gen=False)
        if not (full.startswith(start_text) and full.startswith(end_text)):
            raise TemplateError("chat template is not prefix-preserving for this conversation")
        char_spans.append((len(start_text), len(end_text)))
    tokens, token_spans = _token_spans(tokenizer, full, char_spans)
    special = _special_ids(tokenizer)
    mask = [0.0] * len(tokens)
    for a, b in token_spans:
        # Keep up to and including the span's last special token (the end of turn): the newline
        # the template writes after it belongs to the turn separator, not to what the model says.
        ends = [k for k in range(a, b) if tokens[k] in special]
        for k in range(a, ends[-1] + 1 if ends else b):
            mask[k] = 1.0
    return tokens, mask


def _token_spans(
    tokenizer: PreTrainedTokenizerBase, text: str, char_spans: list[tuple[int, int]]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Map character spans of ``text`` to token index spans."""
    if tokenizer.is_fast:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        tokens = list(encoded["input_ids"])
        offsets = encoded["offset_mapping"]
        spans = []
        for start, end in char_spans:
            # a token belongs to the span if it starts inside it or straddles its start
            inside = [j for j, (s, e) in enumerate(offsets) if s < end and (s >= start or e > start)]
            spans.append((inside[0], inside[-1] + 1) if inside else (0, 0))
        return tokens, spans
    tokens = _encode(tokenizer, text)
    spans = []
    for start, end in char_spans:
        bounds = []
        for cut in (start, end):
            prefix = _encode(tokenizer, text[:cut])
            if tokens[: len(prefix)] != prefix:
                raise TemplateError("tokenization of a conversation prefix is not a token prefix")
            bounds.append(len(prefix))
        spans.append((bounds[0], bounds[1]))
    return tokens, spans


def datum_from_tokens(tokens: Sequence[int], weights: Sequence[float]) -> types.Datum:
    """Right-shift into a ``Datum``: input ``tokens[:-1]``, targets ``tokens[1:]``, ``weights[1:]``."""
    if len(tokens) != len(weights) or len(tokens) < 2:
        raise ValueError(f"need >= 2 tokens and as many weights (got {len(tokens)}, {len(weights)})")
    targets = [int(t) for t in tokens[1:]]
    shifted = [float(w) for w in weights[1:]]
    return types.Datum(
        model_input=types.ModelInput.from_ints([int(t) for t in tokens[:-1]]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=targets, dtype="int64", shape=[len(targets)]),
            "weights": types.TensorData(data=shifted, dtype="float32", shape=[len(shifted)]),
        },
    )


def render_conversation(
    messages: Sequence[Mapping[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    train_on: TrainOn,
    max_length: int,
) -> RenderResult:
    """One conversation as a datum of at most ``max_length`` tokens (input plus the final target),
    or a drop reason: the template failed, nothing was trainable, or truncation cut off every
    trained token."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    try:
        tokens, mask = render_weighted_tokens(messages, tokenizer, train_on)
    except TemplateError:
        return RenderResult(None, "template_not_prefix_preserving")
    except Exception:  # jinja errors: templates may reject roles or orders they do not support
        return RenderResult(None, "template_error")
    truncated = len(tokens) > max_length
    kept_tokens, kept_mask = tokens[:max_length], mask[:max_length]
    if len(kept_tokens) < 2 or not any(kept_mask[1:]):
        reason = "truncated_away" if truncated and any(mask[1:]) else "no_trained_tokens"
        return RenderResult(None, reason, truncated, len(tokens))
    return RenderResult(datum_from_tokens(kept_tokens, kept_mask), None, truncated, len(tokens))


@dataclass(frozen=True)
class PromptAndAnswer:
    prompt_tokens: list[int]
    answer: str
    prompt_messages: list[dict[str, str]]


def prompt_and_answer(row: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> PromptAndAnswer:
    """The generation prompt (conversation before the last assistant turn, plus the assistant
    header) and the reference: the row's ``answer`` if it has one, else the last assistant text."""
    messages = [dict(m) for m in row["messages"]]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("row has no assistant message to take a reference answer from")
    prompt_messages = messages[:last]
    answer = row.get("answer") or messages[last]["content"]
    return PromptAndAnswer(generation_prompt(prompt_messages, tokenizer), str(answer), prompt_messages)


def generation_prompt(messages: Sequence[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens a model continues to answer ``messages``: the conversation through the tokenizer's chat
    template plus the assistant header, rendered exactly as training and evaluation render it."""
    return _encode(tokenizer, _chat_text(tokenizer, messages, gen=True))


# -- whole datasets -------------------------------------------------------------------------------


def length_bins(max_length: int) -> list[int]:
    """Upper bin edges: powers of two from 16, closed by ``max_length``."""
    edges, edge = [], 16
    while edge < max_length:
        edges.append(edge)
        edge *= 2
    return [*edges, max_length]


@dataclass
class SplitStats:
    rows: int = 0
    datums: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    length_histogram: dict[str, int] = field(default_factory=dict)
    max_tokens: int = 0

    @property
    def mean_tokens(self) -> float:
        return self.tokens / self.datums if self.datums else 0.0


@dataclass
class BuiltDatums:
    train: list[types.Datum]
    test: list[types.Datum]
    train_stats: SplitStats
    test_stats: SplitStats
    train_on: TrainOn
    max_length: int

    def content_hash(self) -> str:
        return hash_json({"train": datums_hash(self.train), "test": datums_hash(self.test)})

    def manifest(self, train_path: str | Path, test_path: str | Path, tokenizer_hash: str) -> DatumsManifest:
        dropped = Counter(self.train_stats.dropped) + Counter(self.test_stats.dropped)
        return DatumsManifest(
            train_path=str(train_path),
            test_path=str(test_path),
            content_hash=self.content_hash(),
            tokenizer_hash=tokenizer_hash,
            num_datums=len(self.train),
            num_test_datums=len(self.test),
            num_tokens=self.train_stats.tokens,
            trained_tokens=self.train_stats.trained_tokens,
            max_length=self.max_length,
            train_on=self.train_on,
            truncated_rows=self.train_stats.truncated + self.test_stats.truncated,
            dropped_rows=dict(sorted(dropped.items())),
        )


def _build_split(
    rows: Any, tokenizer: PreTrainedTokenizerBase, train_on: TrainOn, max_length: int
) -> tuple[list[types.Datum], SplitStats]:
    edges = length_bins(max_length)
    histogram = Counter[int]()
    dropped = Counter[str]()
    stats = SplitStats()
    out: list[types.Datum] = []
    for row in rows:
        stats.rows += 1
        result = render_conversation(row["messages"], tokenizer, train_on=train_on, max_length=max_length)
        if result.datum is None:
            dropped[result.drop_reason or "unknown"] += 1
            continue
        out.append(result.datum)
        length = result.datum.model_input.length
        stats.datums += 1
        stats.tokens += length
        stats.trained_tokens += int(np.count_nonzero(result.datum.loss_fn_inputs["weights"].to_numpy()))
        stats.truncated += result.truncated
        stats.max_tokens = max(stats.max_tokens, length)
        histogram[next(e for e in edges if length <= e)] += 1
    lows = [1, *(e + 1 for e in edges[:-1])]
    stats.length_histogram = {f"{lo}-{hi}": histogram[hi] for lo, hi in zip(lows, edges, strict=True)}
    stats.dropped = dict(sorted(dropped.items()))
    return out, stats


def build_datums(
    dataset_dict: DatasetDict | Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    train_on: TrainOn = "last_assistant",
    max_length: int = 512,
) -> BuiltDatums:
    """Render both splits of a normalised dataset; stats count tokens, truncation and drops by reason."""
    train, train_stats = _build_split(dataset_dict["train"], tokenizer, train_on, max_length)
    if not train:
        raise ValueError(f"No training datums: every row was dropped ({train_stats.dropped})")
    test, test_stats = _build_split(dataset_dict["test"], tokenizer, train_on, max_length)
    return BuiltDatums(train, test, train_stats, test_stats, train_on, max_length)


# -- storage and hashing --------------------------------------------------------------------------


def _arrays(datum: types.Datum) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    inputs = np.asarray(datum.model_input.to_ints(), dtype="<i4")
    targets = np.asarray(datum.loss_fn_inputs["target_tokens"].to_numpy(), dtype="<i8")
    weights = np.asarray(datum.loss_fn_inputs["weights"].to_numpy(), dtype="<f4")
    if not len(inputs) == len(targets) == len(weights):
        raise ValueError(f"datum lengths differ: {len(inputs)}, {len(targets)}, {len(weights)}")
    return inputs, targets, weights


def datum_to_dict(datum: types.Datum) -> dict[str, list[Any]]:
    """Plain lists, for comparing datums: ``Datum ==`` compares ``TensorData`` by identity, not value."""
    inputs, targets, weights = _arrays(datum)
    return {"input_tokens": inputs.tolist(), "target_tokens": targets.tolist(), "weights": weights.tolist()}


def datums_hash(datums: Sequence[types.Datum]) -> str:
    """sha256 over every datum's exact token and weight bytes (stable across processes)."""
    digest = hashlib.sha256()
    for datum in datums:
        for array in _arrays(datum):
            digest.update(len(array).to_bytes(8, "little"))
            digest.update(array.tobytes())
    return digest.hexdigest()


def write_datums(path: str | Path, datums: Sequence[types.Datum]) -> Path:
    """Write datums as Parquet atomically (temporary sibling, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
    for datum in datums:
        for column, array in zip(columns, _arrays(datum), strict=True):
            column.append(array)
    table = pa.Table.from_arrays(
        [pa.array(col, type=f.type) for col, f in zip(columns, DATUM_SCHEMA, strict=True)],
        schema=DATUM_SCHEMA,
    )
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_datums(path: str | Path) -> list[types.Datum]:
    """Read what ``write_datums`` wrote: the same tokens and weights, bit for bit."""
    table = pq.read_table(path, schema=DATUM_SCHEMA)
    inputs, targets, weights = (table.column(name).to_pylist() for name in DATUM_SCHEMA.names)
    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(i),
            loss_fn_inputs={
                "target_tokens": types.TensorData(data=t, dtype="int64", shape=[len(t)]),
                "weights": types.TensorData(data=w, dtype="float32", shape=[len(w)]),
            },
        )
        for i, t, w in zip(inputs, targets, weights, strict=True)
    ]


def _complete(directory: Path) -> bool:
    """A datums directory is complete once its last file is there (it is renamed into place whole)."""
    return (directory / "test.parquet").exists()


def save_datums(built: BuiltDatums, tokenizer_hash: str, out_dir: str | Path | None = None) -> DatumsManifest:
    """Write ``train.parquet`` and ``test.parquet`` into a directory named by the content hash
    (and tokenizer), atomically, and return the manifest. Saving the same datums again is a no-op."""
    root = Path(out_dir) if out_dir is not None else home_dir("datums")
    root.mkdir(parents=True, exist_ok=True)
    digest = built.content_hash()
    target = root / f"{digest[:16]}-{tokenizer_hash[:8]}"
    if not _complete(target):
        with atomic_directory(target, already_done=_complete) as staging:
            write_datums(staging / "train.parquet", built.train)
            write_datums(staging / "test.parquet", built.test)
    return built.manifest(target / "train.parquet", target / "test.parquet", tokenizer_hash)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of what decides token ids: the vocabulary/merges, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab: Any = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return hash_json(
        {
            "vocab": vocab,
            "special": sorted(_special_ids(tokenizer)),
            "chat_template": tokenizer.chat_template,
        }
    )
