"""Sampling from the policy and training on its samples: the machinery RL and on-policy distillation share.

A *rollout* is one completion the policy sampled for a prompt, with the sampler's logprob of each token.
``action_datum`` turns it into the datum Tinker's policy-gradient losses (``importance_sampling``, ``ppo``,
``cispo``) take, as tinker-cookbook builds it: the prompt and the completion right-shifted, the sampler's
logprobs and a per-token advantage on the completion's tokens, 0 on the prompt's. RL gives every token of
a rollout its group-relative advantage; distillation gives each token its own (``-kl_coef * (student -
teacher)``). ``sample_train_kl`` reports how far the sampler's logprobs were from the trainer's
(tinker-cookbook's ``optim/kl_sample_train_v1``/``_v2`` and ``optim/entropy``). ``RolloutLog`` keeps what
was sampled, one Parquet file per step, so users can read the rollouts a run trained on.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tinker import types

from kitchen.contract import SamplingClient
from kitchen.manifests import RolloutsManifest


@dataclass(frozen=True)
class Rollout:
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    """The sampler's ``log p(token | prefix)`` for each sampled token."""
    stop_reason: str
    policy_version: int | None = None
    """The optimizer steps the sampling weights had (``Policy.version``)."""

    @property
    def length(self) -> int:
        return len(self.tokens)

    def staleness(self, step: int) -> int | None:
        """How many steps behind 0-based ``step`` its weights were (0: on-policy)."""
        return None if self.policy_version is None else step - self.policy_version


def sampling_seed(seed: int, step: int, index: int) -> int:
    """A reproducible seed per (run seed, step, prompt): a resumed run samples what the original would."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1, dtype=np.uint32)[0])


def sample_groups(
    policy: SamplingClient,
    prompts: Sequence[Sequence[int]],
    *,
    group_size: int,
    params: types.SamplingParams,
    seed: int,
    step: int,
    policy_version: int | None = None,
) -> list[list[Rollout]]:
    """``group_size`` completions for each prompt. Every request is submitted before any is awaited, so
    the local engine batches them and Tinker pipelines them."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    futures = [
        policy.sample(
            types.ModelInput.from_ints(list(prompt)),
            group_size,
            params.model_copy(update={"seed": sampling_seed(seed, step, index)}),
        )
        for index, prompt in enumerate(prompts)
    ]
    groups = []
    for prompt, future in zip(prompts, futures, strict=True):
        response = future.result()
        group = []
        for sequence in response.sequences:
            if sequence.logprobs is None:
                raise ValueError("the sampler returned no logprobs; policy-gradient losses need them")
            group.append(
                Rollout(
                    prompt=list(prompt),
                    tokens=list(sequence.tokens),
                    logprobs=[float(x) for x in sequence.logprobs],
                    stop_reason=str(sequence.stop_reason),
                    policy_version=policy_version,
                )
            )
        groups.append(group)
    return groups


def action_datum(rollout: Rollout, advantages: float | Sequence[float]) -> types.Datum:
    """The ``importance_sampling``/``ppo``/``cispo`` datum of one rollout.

    ``advantages`` is one value for every completion token or one per token. Prompt positions get
    advantage 0 and logprob 0, so they carry no gradient.
    """
    if not rollout.tokens:
        raise ValueError("a rollout with no completion tokens has nothing to train on")
    per_token = (
        [float(advantages)] * rollout.length
        if isinstance(advantages, int | float)
        else [float(a) for a in advantages]
    )
    if len(per_token) != rollout.length:
        raise ValueError(f"{len(per_token)} advantages for a completion of {rollout.length} tokens")
    tokens = rollout.prompt + rollout.tokens
    prompt_targets = len(rollout.prompt) - 1
    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[n]),
            "logprobs": types.TensorData(
                data=[0.0] * prompt_targets + rollout.logprobs, dtype="float32", shape=[n]
            ),
            "advantages": types.TensorData(
                data=[0.0] * prompt_targets + per_token, dtype="float32", shape=[n]
            ),
        },
    )


def action_slice(rollout: Rollout) -> slice:
    """Where a rollout's completion tokens sit in its datum's per-token arrays."""
    start = len(rollout.prompt) - 1
    return slice(start, start + rollout.length)


def sample_train_kl(rollouts: Sequence[Rollout], output: types.ForwardBackwardOutput) -> dict[str, float]:
    """tinker-cookbook's ``compute_kl_sample_train`` over the completion tokens: ``v1`` the mean of
    (sampled - trained) logprobs, ``v2`` half the mean square, and the sampler's entropy estimate."""
    diffs: list[float] = []
    sampled: list[float] = []
    for rollout, record in zip(rollouts, output.loss_fn_outputs, strict=True):
        trained = record["logprobs"].tolist()[action_slice(rollout)]
        diffs.extend(s - t for s, t in zip(rollout.logprobs, trained, strict=True))
        sampled.extend(rollout.logprobs)
    if not diffs:
        return {}
    values = np.asarray(diffs, dtype=np.float64)
    return {
        "optim/kl_sample_train_v1": float(values.mean()),
        "optim/kl_sample_train_v2": float(0.5 * (values**2).mean()),
        "optim/entropy": float(-np.mean(sampled)),
    }


_STEP_FILE = re.compile(r"step-(\d+)\.parquet")


class RolloutLog:
    """One Parquet file of rollout rows per training step (1-based, as ``metrics.jsonl`` numbers them)
    under ``directory``. A step's file is written whole and atomically, and a resumed run first drops the
    files after its checkpoint (``discard_after``), so the log always matches the steps the ledger
    recorded: a resumed run rewrites what it redoes, never appends to it."""

    def __init__(self, directory: Path, schema: pa.Schema) -> None:
        self.directory = Path(directory)
        self.schema = schema

    def path(self, step: int) -> Path:
        return self.directory / f"step-{step:06d}.parquet"

    def write(self, step: int, rows: Sequence[Mapping[str, Any]]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist([dict(r) for r in rows], schema=self.schema)
        path = self.path(step)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        return path

    def steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        found = (_STEP_FILE.fullmatch(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def discard_after(self, step: int) -> None:
        """Remove the files of steps after ``step`` (those a resumed run will redo)."""
        for later in self.steps():
            if later > step:
                self.path(later).unlink(missing_ok=True)

    def read(self, steps: Sequence[int] | None = None) -> pa.Table:
        chosen = self.steps() if steps is None else list(steps)
        tables = [pq.read_table(self.path(s), schema=self.schema) for s in chosen]
        return pa.concat_tables(tables) if tables else self.schema.empty_table()

    def manifest(self) -> RolloutsManifest:
        steps = self.steps()
        digest = hashlib.sha256()
        rows = 0
        for step in steps:
            path = self.path(step)
            digest.update(f"{path.name}\0".encode())
            digest.update(path.read_bytes())
            rows += pq.ParquetFile(path).metadata.num_rows
        return RolloutsManifest(
            path=str(self.directory),
            steps=len(steps),
            rows=rows,
            columns=list(self.schema.names),
            content_hash=digest.hexdigest(),
        )
