"""Preference rows -> paired datums: each side rendered through the chat template exactly as SFT renders a
conversation (``kitchen.data.datums``), weight 1 on the reply's tokens (its end-of-turn token included)
and 0 on the prompt's, so a datum's weighted log-probability sum is the reply's sequence log-probability.

Datums are stored interleaved, chosen then rejected (tinker-cookbook's layout), and a pair is dropped whole
(counted by reason) when either side cannot be rendered, so the two halves of a pair never come apart.
``pairs.json`` records which dataset row each kept pair came from, so evaluation can find its prompt and
answer.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tinker import types

from kitchen.atomic import atomic_directory
from kitchen.data.datums import TrainOn, datums_hash, read_datums, render_conversation, write_datums
from kitchen.hashing import hash_json
from kitchen.home import home_dir
from kitchen.workflows.dpo.manifests import ComparisonsManifest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TRAIN_ON: TrainOn = "last_assistant"


@dataclass
class Pairs:
    """One split's pairs: ``datums`` interleaved (chosen, rejected, ...), ``rows`` the source row of each."""

    datums: list[types.Datum] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.rows)

    def chosen(self) -> list[types.Datum]:
        return self.datums[0::2]

    def rejected(self) -> list[types.Datum]:
        return self.datums[1::2]


def sides(row: Mapping[str, Any]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The chosen and the rejected conversation of a normalised preference row."""
    prompt = [dict(m) for m in row["prompt"]]
    return (
        [*prompt, {"role": "assistant", "content": row["chosen"]}],
        [*prompt, {"role": "assistant", "content": row["rejected"]}],
    )


def render_pairs(
    rows: Iterable[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Pairs:
    pairs = Pairs()
    for index, row in enumerate(rows):
        results = [
            render_conversation(conversation, tokenizer, train_on=TRAIN_ON, max_length=max_length)
            for conversation in sides(row)
        ]
        reasons = [r.drop_reason for r in results if r.datum is None]
        if reasons:
            pairs.dropped[reasons[0] or "unknown"] += 1
            continue
        chosen, rejected = (r.datum for r in results)
        assert chosen is not None and rejected is not None
        if _same(chosen, rejected):
            pairs.dropped["identical_tokens"] += 1  # different text, same tokens: nothing to learn
            continue
        pairs.datums += [chosen, rejected]
        pairs.rows.append(index)
        pairs.truncated += any(r.truncated for r in results)
        for datum in (chosen, rejected):
            pairs.tokens += datum.model_input.length
            pairs.trained_tokens += int(np.count_nonzero(datum.loss_fn_inputs["weights"].to_numpy()))
    return pairs


def _same(a: types.Datum, b: types.Datum) -> bool:
    return a.model_input.to_ints() == b.model_input.to_ints() and (
        a.loss_fn_inputs["target_tokens"].tolist() == b.loss_fn_inputs["target_tokens"].tolist()
    )


def content_hash(train: Pairs, test: Pairs) -> str:
    return hash_json(
        {
            "train": datums_hash(train.datums),
            "test": datums_hash(test.datums),
            "rows": {"train": train.rows, "test": test.rows},
        }
    )


def _complete(directory: Path) -> bool:
    """Complete once ``pairs.json``, written last, is there (the directory is renamed into place whole)."""
    return (directory / "pairs.json").exists()


def save_comparisons(
    train: Pairs,
    test: Pairs,
    *,
    tokenizer_hash: str,
    max_length: int,
    out_dir: str | Path | None = None,
) -> ComparisonsManifest:
    """Write ``train.parquet``, ``test.parquet`` and ``pairs.json`` into a directory named by the content
    hash (and tokenizer), atomically; saving the same pairs again is a no-op."""
    root = Path(out_dir) if out_dir is not None else home_dir("datums")
    root.mkdir(parents=True, exist_ok=True)
    digest = content_hash(train, test)
    target = root / f"dpo-{digest[:16]}-{tokenizer_hash[:8]}"
    if not _complete(target):
        with atomic_directory(target, already_done=_complete) as staging:
            write_datums(staging / "train.parquet", train.datums)
            write_datums(staging / "test.parquet", test.datums)
            (staging / "pairs.json").write_text(json.dumps({"train": train.rows, "test": test.rows}))
    return ComparisonsManifest(
        train_path=str(target / "train.parquet"),
        test_path=str(target / "test.parquet"),
        pairs_path=str(target / "pairs.json"),
        content_hash=digest,
        tokenizer_hash=tokenizer_hash,
        num_pairs=len(train),
        num_test_pairs=len(test),
        num_tokens=train.tokens,
        trained_tokens=train.trained_tokens,
        max_length=max_length,
        train_on=TRAIN_ON,
        truncated_pairs=train.truncated + test.truncated,
        dropped_pairs=dict(sorted((train.dropped + test.dropped).items())),
    )


def read_pair_datums(path: str | Path) -> list[types.Datum]:
    """The interleaved datums of one split; an odd count means the file is not a comparisons file."""
    datums = read_datums(path)
    if len(datums) % 2:
        raise ValueError(f"{path}: {len(datums)} datums cannot be (chosen, rejected) pairs")
    return datums


def read_pair_rows(manifest: ComparisonsManifest, split: str) -> list[int]:
    return [int(i) for i in json.loads(Path(manifest.pairs_path).read_text())[split]]


def sequence_weights(datums: Sequence[types.Datum]) -> list[np.ndarray]:
    return [np.asarray(d.loss_fn_inputs["weights"].to_numpy(), dtype=np.float32) for d in datums]
