"""tinker-cookbook's supervised, RL and DPO loops, unmodified, offline on Kitchen's local engine.

Prints the numbers the README's "running tinker-cookbook recipes offline" section reports. Needs the
``cookbook`` extra (``make test`` installs it). Logs go under ``--out`` (default
``$KITCHEN_HOME/cookbook-offline``; a rerun starts them afresh, as the cookbook would otherwise resume),
checkpoints under ``$KITCHEN_HOME/engine``.

    python scripts/cookbook_offline.py                        # the packaged SmolLM2-135M-Instruct
    python scripts/cookbook_offline.py --model ./my-hf-model --only sft --sft-steps 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

from kitchen.home import home_dir
from kitchen.models.base import resolve_base_model
from resources.local_engine.dropin import install

RENDERER = "qwen3_instruct"  # the cookbook's ChatML renderer (SmolLM2's template is ChatML)


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _sum(a: int, b: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": str(a + b)}]


def supervised(model: str, out: Path, steps: int) -> str:
    from tinker_cookbook.supervised import train
    from tinker_cookbook.supervised.data import FromConversationFileBuilder
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    rng = random.Random(0)
    data = out / "sft.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": _sum(rng.randrange(100), rng.randrange(100))}) + "\n"
            for _ in range(8 * steps + 64)
        )
    )
    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=model, renderer_name=RENDERER, max_length=128, batch_size=8
    )
    config = train.Config(
        log_path=str(out / "sft"),
        model_name=model,
        recipe_name="kitchen_cookbook_offline",
        renderer_name=RENDERER,
        dataset_builder=FromConversationFileBuilder(file_path=str(data), test_size=64, common_config=common),
        learning_rate=5e-4,
        lora_rank=32,
        save_every=10,
        eval_every=10,
        max_steps=steps,
    )
    started = time.perf_counter()
    asyncio.run(train.main(config))
    elapsed = time.perf_counter() - started
    evals = [(r["step"], r["test/nll"]) for r in _rows(out / "sft" / "metrics.jsonl") if "test/nll" in r]
    print(f"supervised.train: {steps} steps in {elapsed:.0f} s; held-out NLL by step {evals}")
    return str(_rows(out / "sft" / "checkpoints.jsonl")[-1]["state_path"])


def rl(model: str, out: Path, steps: int, start: str | None) -> None:
    from tinker_cookbook.recipes.math_rl.arithmetic_env import ArithmeticDatasetBuilder
    from tinker_cookbook.rl import train

    config = train.Config(
        learning_rate=1e-4,
        dataset_builder=ArithmeticDatasetBuilder(
            batch_size=8,
            model_name_for_tokenizer=model,
            renderer_name=RENDERER,
            n_batches=steps,
            group_size=4,
        ),
        model_name=model,
        recipe_name="kitchen_cookbook_offline",
        max_tokens=8,
        log_path=str(out / "rl"),
        load_checkpoint_path=start,
        renderer_name=RENDERER,
        loss_fn="importance_sampling",
        lora_rank=32,
        eval_every=0,
        save_every=10,
        num_groups_to_log=0,
    )
    started = time.perf_counter()
    asyncio.run(train.main(config))
    elapsed = time.perf_counter() - started
    rows = [r for r in _rows(out / "rl" / "metrics.jsonl") if "env/all/reward/total" in r]
    rewards = [round(r["env/all/reward/total"], 3) for r in rows]
    correct = [round(r.get("env/all/correct", math.nan), 3) for r in rows]
    kl = max(abs(r["optim/kl_sample_train_v1"]) for r in rows)
    print(
        f"rl.train (arithmetic, importance_sampling): {steps} steps in {elapsed:.0f} s; reward by step "
        f"{rewards}; correct {correct}; max |sampler-vs-trainer KL v1| {kl:.2e}"
    )


def dpo(model: str, out: Path, steps: int) -> None:
    from tinker_cookbook.preference import train_dpo
    from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
    from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    rng = random.Random(1)
    pairs = out / "pairs.jsonl"
    lines = []
    for _ in range(8 * steps):
        a, b = rng.randrange(100), rng.randrange(100)
        right, wrong = (
            _sum(a, b),
            [{"role": "assistant", "content": str(a + b + rng.choice([-10, -1, 1, 10]))}],
        )
        comparison = {"prompt_conversation": right[:1], "completion_A": right[1:], "completion_B": wrong}
        lines.append(json.dumps({"comparison": comparison, "label": "A"}) + "\n")
    pairs.write_text("".join(lines))
    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=model, renderer_name=RENDERER, max_length=128, batch_size=8
    )
    config = train_dpo.Config(
        log_path=str(out / "dpo"),
        model_name=model,
        recipe_name="kitchen_cookbook_offline",
        renderer_name=RENDERER,
        dataset_builder=DPODatasetBuilderFromComparisons(
            comparison_builder=ComparisonBuilderFromJsonl(train_path=str(pairs)), common_config=common
        ),
        learning_rate=1e-5,
        lora_rank=32,
        save_every=0,
        eval_every=0,
        max_steps=steps,
    )
    started = time.perf_counter()
    train_dpo.main(config)
    elapsed = time.perf_counter() - started
    rows = [r for r in _rows(out / "dpo" / "metrics.jsonl") if "dpo_loss" in r]
    losses = [round(r["dpo_loss"], 4) for r in rows]
    accuracy = [round(r["accuracy"], 3) for r in rows]
    print(
        f"preference.train_dpo: {steps} steps in {elapsed:.0f} s; step-0 loss {rows[0]['dpo_loss']:.6f} "
        f"(ln 2 = {math.log(2):.6f}); loss by step {losses}; accuracy {accuracy}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="packaged name, directory or Hub id")
    parser.add_argument("--out", type=Path, default=None, help="default: $KITCHEN_HOME/cookbook-offline")
    parser.add_argument("--sft-steps", type=int, default=40)
    parser.add_argument("--rl-steps", type=int, default=10)
    parser.add_argument("--dpo-steps", type=int, default=8)
    parser.add_argument("--only", choices=["sft", "rl", "dpo"], action="append")
    args = parser.parse_args()
    model = resolve_base_model(args.model).backend_model  # the cookbook's tokenizer lookup needs a path
    out: Path = args.out or home_dir("cookbook-offline")
    only = set(args.only or ["sft", "rl", "dpo"])
    for loop in only:
        shutil.rmtree(out / loop, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    args.out = out
    install()
    start = supervised(model, args.out, args.sft_steps) if "sft" in only else None
    if "rl" in only:
        rl(model, args.out, args.rl_steps, start)
    if "dpo" in only:
        dpo(model, args.out, args.dpo_steps)


if __name__ == "__main__":
    main()
