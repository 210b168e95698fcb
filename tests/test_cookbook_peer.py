"""tinker-cookbook's own training loops, unmodified, on the local engine: a peer test suite.

Kitchen claims its engine honours the tinker SDK's client contract; code nobody here wrote is the
strongest check of that. tinker-cookbook (pinned in pyproject's ``cookbook`` extra, installed by ``make
test``) runs its supervised, RL and DPO loops here with ``tinker.ServiceClient`` replaced by the local
engine (``resources.local_engine.dropin.install``), on the tiny model, with the shortest settings. The
expectations come from the loops' own logs (``metrics.jsonl``, ``checkpoints.jsonl``) and, where a number
is checked, from a computation done here independently of the loop.

The renderer is the cookbook's ``qwen3_instruct``: the tiny model's chat template is ChatML, like
SmolLM2's (the cookbook's automatic renderer lookup does not know local paths).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chz
import pytest
import tinker
from tinker_cookbook.preference import train_dpo
from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl
from tinker_cookbook.recipes.math_rl.arithmetic_env import ArithmeticDatasetBuilder
from tinker_cookbook.rl import train as rl_train
from tinker_cookbook.supervised import train as sl_train
from tinker_cookbook.supervised.data import FromConversationFileBuilder
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig, SupervisedDataset

from resources.local_engine.dropin import install, main

RENDERER = "qwen3_instruct"


@pytest.fixture(scope="module")
def engine_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The local engine behind ``tinker.ServiceClient`` for this module, checkpoints under a temp root."""
    root = tmp_path_factory.mktemp("cookbook-engine")
    uninstall = install(root=root)
    yield root
    uninstall()


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _conversations(path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w") as out:
        for _ in range(count):
            a, b = rng.randrange(100), rng.randrange(100)
            messages = [
                {"role": "user", "content": f"What is {a} + {b}?"},
                {"role": "assistant", "content": str(a + b)},
            ]
            out.write(json.dumps({"messages": messages}) + "\n")
    return path


class _Crash(RuntimeError):
    """Stands for the process dying mid-run."""


class _CrashingDataset(SupervisedDataset):
    def __init__(self, inner: SupervisedDataset, crash_at: int) -> None:
        self.inner, self.crash_at = inner, crash_at

    def get_batch(self, index: int) -> list[tinker.Datum]:
        if index == self.crash_at:
            raise _Crash(f"simulated crash before batch {index}")
        return self.inner.get_batch(index)

    def set_epoch(self, seed: int = 0) -> None:
        self.inner.set_epoch(seed)

    def __len__(self) -> int:
        return len(self.inner)


@chz.chz
class _CrashingBuilder(FromConversationFileBuilder):
    """The cookbook's file builder whose dataset dies before batch ``crash_at`` (-1: never)."""

    crash_at: int = -1

    def __call__(self) -> tuple[SupervisedDataset, SupervisedDataset | None]:
        train, test = super().__call__()
        return (_CrashingDataset(train, self.crash_at) if self.crash_at >= 0 else train), test


def _sl_config(model: Path, data: Path, log_path: Path, **overrides: Any) -> sl_train.Config:
    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=str(model), renderer_name=RENDERER, max_length=64, batch_size=8
    )
    settings: dict[str, Any] = {
        "log_path": str(log_path),
        "model_name": str(model),
        "recipe_name": "kitchen_peer_test",
        "renderer_name": RENDERER,
        "dataset_builder": _CrashingBuilder(file_path=str(data), test_size=16, common_config=common),
        "learning_rate": 2e-3,
        "lora_rank": 8,
        "save_every": 2,
        "eval_every": 3,
        "max_steps": 7,
    }
    settings.update(overrides)
    return sl_train.Config(**settings)


@pytest.fixture(scope="module")
def supervised_run(engine_root: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``supervised.train`` end to end; its log directory."""
    work = tmp_path_factory.mktemp("sft")
    data = _conversations(work / "train.jsonl", 96, seed=0)
    asyncio.run(sl_train.main(_sl_config(tiny_model_dir, data, work / "log")))
    return work / "log"


def test_supervised_train_lowers_held_out_nll(supervised_run: Path) -> None:
    evals = [
        (row["step"], row["test/nll"]) for row in _rows(supervised_run / "metrics.jsonl") if "test/nll" in row
    ]
    assert [step for step, _ in evals] == [0, 3, 6]
    first, last = evals[0][1], evals[-1][1]
    assert math.isfinite(first) and last < first - 0.1, evals
    final = _rows(supervised_run / "checkpoints.jsonl")[-1]
    assert final["name"] == "final" and final["state_path"].startswith("file://")


def test_rl_train_on_arithmetic_samples_what_it_trains(
    supervised_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """``rl.train`` (sync, ``importance_sampling``) on the cookbook's arithmetic environment, starting from
    the supervised run's weights so sampler and trainer both carry a non-zero LoRA: the KL between the
    logprobs the sampler reported and those the trainer recomputes stays under 1e-3 at every step."""
    start = _rows(supervised_run / "checkpoints.jsonl")[-1]["state_path"]
    config = rl_train.Config(
        learning_rate=1e-3,
        dataset_builder=ArithmeticDatasetBuilder(
            batch_size=2,
            model_name_for_tokenizer=str(tiny_model_dir),
            renderer_name=RENDERER,
            n_batches=3,
            group_size=4,
        ),
        model_name=str(tiny_model_dir),
        recipe_name="kitchen_peer_test",
        max_tokens=8,
        log_path=str(tmp_path / "rl"),
        load_checkpoint_path=start,
        renderer_name=RENDERER,
        loss_fn="importance_sampling",
        lora_rank=8,
        eval_every=0,
        save_every=2,
        num_groups_to_log=0,
    )
    asyncio.run(rl_train.main(config))
    steps = [row for row in _rows(tmp_path / "rl" / "metrics.jsonl") if "optim/kl_sample_train_v1" in row]
    assert [row["step"] for row in steps] == [0, 1, 2]
    for row in steps:
        assert abs(row["optim/kl_sample_train_v1"]) < 1e-3, row
        assert row["optim/kl_sample_train_v2"] < 1e-3, row
        assert -0.1 <= row["env/all/reward/total"] <= 1.0
    assert _rows(tmp_path / "rl" / "checkpoints.jsonl")[-1]["name"] == "final"


def test_dpo_starts_at_ln2(engine_root: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """``preference.train_dpo``: at step 0 the policy is its own reference, so every pair's margin is 0
    and the loss is -log(sigmoid(0)) = ln 2."""
    rng = random.Random(1)
    pairs = tmp_path / "pairs.jsonl"
    with pairs.open("w") as out:
        for _ in range(12):
            a, b = rng.randrange(100), rng.randrange(100)
            comparison = {
                "prompt_conversation": [{"role": "user", "content": f"What is {a} + {b}?"}],
                "completion_A": [{"role": "assistant", "content": str(a + b)}],
                "completion_B": [{"role": "assistant", "content": str(a + b + 1)}],
            }
            out.write(json.dumps({"comparison": comparison, "label": "A"}) + "\n")
    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=str(tiny_model_dir), renderer_name=RENDERER, max_length=64, batch_size=4
    )
    config = train_dpo.Config(
        log_path=str(tmp_path / "dpo"),
        model_name=str(tiny_model_dir),
        recipe_name="kitchen_peer_test",
        renderer_name=RENDERER,
        dataset_builder=DPODatasetBuilderFromComparisons(
            comparison_builder=ComparisonBuilderFromJsonl(train_path=str(pairs)), common_config=common
        ),
        learning_rate=1e-3,
        lora_rank=8,
        save_every=0,
        eval_every=0,
        max_steps=2,
    )
    train_dpo.main(config)
    rows = [row for row in _rows(tmp_path / "dpo" / "metrics.jsonl") if "dpo_loss" in row]
    assert [row["step"] for row in rows] == [0, 1]
    assert rows[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[0]["accuracy"] == 0.0


def test_supervised_train_resumes_from_a_mid_run_checkpoint(
    engine_root: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A run that dies before batch 4 has written checkpoint 000002; rerun, ``supervised.train`` resumes
    from it (weights and optimizer, ``create_training_client_from_state_with_optimizer``). The resumed
    step's training NLL is recomputed here from that checkpoint's weights and the same batch.

    (The cookbook saves a checkpoint after the steps it submitted ahead, so ``000002`` holds four optimizer
    steps while naming batch 2, and the resumed run trains batches 2 and 3 again: its behaviour on the
    service too, as requests on one client run in order. The check below holds either way.)"""
    data = _conversations(tmp_path / "train.jsonl", 96, seed=2)
    log = tmp_path / "log"
    crashing = _sl_config(tiny_model_dir, data, log, max_steps=6, eval_every=0)
    crashing = chz.replace(crashing, dataset_builder=chz.replace(crashing.dataset_builder, crash_at=4))
    with pytest.raises(_Crash):
        asyncio.run(sl_train.main(crashing))
    (checkpoint,) = _rows(log / "checkpoints.jsonl")
    assert checkpoint["name"] == "000002" and checkpoint["batch"] == 2

    asyncio.run(sl_train.main(_sl_config(tiny_model_dir, data, log, max_steps=6, eval_every=0)))
    rows = _rows(log / "metrics.jsonl")
    assert [row["step"] for row in rows if "train_mean_nll" in row] == [0, 1, 2, 3, 4, 5]
    resumed = next(row for row in rows if row["step"] == 2)
    assert [row["name"] for row in _rows(log / "checkpoints.jsonl")][-1] == "final"

    # Independently: batch 2's weighted NLL under the checkpoint's weights.
    dataset, _ = _sl_config(tiny_model_dir, data, log).dataset_builder()
    dataset.set_epoch(seed=0)
    batch = dataset.get_batch(2)
    service = tinker.ServiceClient()
    client = service.create_training_client_from_state(checkpoint["state_path"]).result()
    output = client.forward(batch, "cross_entropy").result()
    weighted = sum(
        -lp * w
        for out, datum in zip(output.loss_fn_outputs, batch, strict=True)
        for lp, w in zip(out["logprobs"].tolist(), datum.loss_fn_inputs["weights"].tolist(), strict=True)
    )
    total = sum(sum(datum.loss_fn_inputs["weights"].tolist()) for datum in batch)
    assert resumed["train_mean_nll"] == pytest.approx(weighted / total, rel=1e-5)


def test_math_rl_recipe_runs_unedited_with_its_default_stable_reinforce(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The math_rl recipe from its command line, through ``python -m resources.local_engine.dropin``
    (called in-process): its default loss, ``stable_reinforce``, needs samplers made with
    ``record_stability_info=True`` and provenance on every datum, which the engine checks."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    log = tmp_path / "math_rl"
    argv = [f"model_name={tiny_model_dir}", f"renderer_name={RENDERER}", f"log_path={log}"]
    argv += ["groups_per_batch=2", "group_size=4", "max_steps=2", "max_tokens=5"]
    assert main(["-m", "tinker_cookbook.recipes.math_rl.train", *argv]) == 0
    assert json.loads((log / "config.json").read_text())["loss_fn"] == "stable_reinforce"
    steps = [row for row in _rows(log / "metrics.jsonl") if "optim/kl_sample_train_v1" in row]
    assert [row["step"] for row in steps] == [0, 1]
    assert all(abs(row["optim/kl_sample_train_v1"]) < 1e-3 for row in steps)
