"""The local engine, TRL's ``SFTTrainer`` and a plain PEFT loop, side by side in one process.

    python bench/vs_trl.py [--steps 8] [--warmup 2] [--long-steps 3] [--threads N] [--lr 2e-4] [--skip-trl]
                           [--device cpu] [--dtype float32] [--base DIR] [--long-shape 8x256]
                           [--max-batch-tokens 8192]

Needs the ``bench`` extra (``pip install -e '.[bench]'``: TRL); ``--skip-trl`` runs without it.

On a GPU: ``--device cuda --dtype bfloat16`` (the engine's CUDA default: a bfloat16 base under float32
LoRA weights, which PEFT keeps too); the peak is then the bfloat16 rate of an 8192^3 product on that
device. ``--base DIR`` benchmarks any local Hugging Face checkpoint instead of the packaged model (a user's
own 1B to 8B model, or one initialised at random from a config where the package is absent).

Every contender trains the same thing: the packaged SmolLM2-135M-Instruct with LoRA rank 32 (alpha 32) on
every linear layer but the unembedding, initialised under the same seed (so all start from identical
weights), fp32, the same torch threads, AdamW (betas 0.9/0.999, eps 1e-8, no weight decay, constant
learning rate, gradient norm clipped to 1.0: TRL's defaults but for its learning rate and schedule) on the
same batches in the same order, and the same objective: the mean NLL over the batch's loss-carrying tokens
(TRL's completion-only loss; the engine gets ``cross_entropy`` with weights ``1/N``). Their final losses
must then agree up to float rounding, which is the check that speed was not bought with another
computation.

Two workloads:
- ``default``: batches of 16 of the built-in ``kitchen/arithmetic`` datums exactly as ``kitchen run
  supervised`` builds them (chat template, loss on the assistant turn, the plan's seeded order);
- ``long``: 8 x 256 random tokens, every position weighted.

Tokens/s counts every token of every sequence (prompt and completion: the datum's input plus its last
target) over the timed steps' wall time (warm-up steps excluded); so for a workload the ratio of two
contenders' tokens/s is the inverse ratio of their times. The share of peak is ``4 * params * tokens/s``
(forward and input-gradient matmuls; LoRA needs no base weight gradients) over the fp32 matmul rate of a
2048^3 product measured in the same process before each workload (best of several): the share of the
machine's useful-work ceiling. A contender that skips work (logits only where the loss needs them) can in
principle exceed 100%.

TRL runs with its defaults (gradient checkpointing on) except precision (fp32: bf16 autocast has no fast
path on most CPUs and would change the loss) and the settings above; a second TRL row turns gradient
checkpointing off, its fastest configuration here.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import targets
import torch
from tinker import types

RANK = 32
ALPHA = 32
BETAS = (0.9, 0.999)
EPS = 1e-8
CLIP = 1.0
SEED = 0


@dataclass(frozen=True)
class Sequence_:
    """One training sequence: all its tokens, and which of them are predicted with loss."""

    tokens: list[int]
    """prompt + completion: the datum's model input plus its last target token."""
    loss_mask: list[bool]
    """``loss_mask[i]``: token ``i`` is predicted (from tokens ``< i``) and carries loss."""

    @classmethod
    def from_datum(cls, datum: types.Datum) -> Sequence_:
        inputs = [int(t) for t in datum.model_input.to_ints()]
        targets = datum.loss_fn_inputs["target_tokens"].tolist()
        weights = datum.loss_fn_inputs["weights"].tolist()
        if inputs[1:] != [int(t) for t in targets[:-1]]:
            raise ValueError("the bench needs next-token datums (targets = inputs shifted by one)")
        return cls(tokens=[*inputs, int(targets[-1])], loss_mask=[False] + [w > 0 for w in weights])


@dataclass
class Result:
    name: str
    step_seconds: list[float]
    losses: list[float]


Batches = list[list[Sequence_]]


# -- workloads ------------------------------------------------------------------------------------


def arithmetic_batches(base_dir: Path, batch: int, steps: int) -> Batches:
    """The first ``steps`` batches ``kitchen run supervised`` trains on, built as it builds them."""
    from kitchen.data import build_datums
    from kitchen.training.batching import EpochBatches
    from kitchen.workflows.supervised.config import SupervisedConfig
    from resources.local_engine.runtime import load_tokenizer

    config = SupervisedConfig()
    built = build_datums(
        config.load().dataset,
        load_tokenizer(base_dir),
        train_on=config.train_on,
        max_length=config.max_length,
    )
    order = EpochBatches(len(built.train), batch, epochs=1, seed=config.seed, max_steps=steps)
    return [[Sequence_.from_datum(built.train[i]) for i in order.indices(s)] for s in range(steps)]


def random_batches(vocab: int, batch: int, length: int, steps: int) -> Batches:
    rng = random.Random(SEED)
    return [
        [
            Sequence_(
                tokens=[rng.randrange(vocab) for _ in range(length + 1)], loss_mask=[False] + [True] * length
            )
            for _ in range(batch)
        ]
        for _ in range(steps)
    ]


# -- the contenders -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where and in what precision every contender runs."""

    device: torch.device
    dtype: torch.dtype

    def sync(self) -> None:
        """Wait for queued device work, so a step's clock stops when its work is done."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def run_engine(base_dir: Path, batches: Batches, lr: float, target: Target, max_batch_tokens: int) -> Result:
    """The local engine through its public client, as the training loop drives it."""
    from resources.local_engine import LocalServiceClient

    with tempfile.TemporaryDirectory() as root:
        service = LocalServiceClient(
            root=Path(root),
            device=str(target.device),
            dtype=str(target.dtype).removeprefix("torch."),
            max_batch_tokens=max_batch_tokens,
        )
        client = service.create_lora_training_client(str(base_dir), rank=RANK, seed=SEED).result()
        adam = types.AdamParams(
            learning_rate=lr, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=0.0, grad_clip_norm=CLIP
        )
        times, losses = [], []
        for batch in batches:
            data = [_datum(seq, 1.0 / sum(sum(s.loss_mask) for s in batch)) for seq in batch]
            start = time.perf_counter()
            fb = client.forward_backward(data, "cross_entropy")
            step = client.optim_step(adam)
            out = fb.result()
            step.result()
            target.sync()
            times.append(time.perf_counter() - start)
            losses.append(float(out.metrics["loss:sum"]))
    return Result("Kitchen local engine", times, losses)


def _datum(seq: Sequence_, weight: float) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(seq.tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": seq.tokens[1:],
            "weights": [weight if m else 0.0 for m in seq.loss_mask[1:]],
        },
    )


def _peft_model(base_dir: Path, target: Target) -> Any:
    """The engine's LoRA: same layers, rank, alpha, and initialisation seed (PEFT keeps the adapters in
    float32 over a bfloat16 base, as the engine does)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=target.dtype)
    model.to(target.device)
    config = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        peft_model = get_peft_model(model, config)
    peft_model.train()
    return peft_model


def _padded(batch: Sequence[Sequence_], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s.tokens) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, seq in enumerate(batch):
        n = len(seq.tokens)
        ids[row, :n] = torch.tensor(seq.tokens)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(
            [t if m else -100 for t, m in zip(seq.tokens, seq.loss_mask, strict=True)]
        )
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run_peft(base_dir: Path, batches: Batches, lr: float, pad_id: int, target: Target) -> Result:
    """What one writes by hand: a padded batch with an attention mask, the model's own loss, AdamW over the
    LoRA parameters."""
    model = _peft_model(base_dir, target)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)
    times, losses = [], []
    for batch in batches:
        start = time.perf_counter()
        inputs = {key: value.to(target.device) for key, value in _padded(batch, pad_id).items()}
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        target.sync()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    return Result("plain PEFT loop", times, losses)


def run_trl(
    base_dir: Path, batches: Batches, lr: float, tokenizer: Any, gradient_checkpointing: bool, target: Target
) -> Result:
    """``SFTTrainer`` on the same pre-tokenised rows (``input_ids``/``labels``), in order."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [seq for batch in batches for seq in batch]
    dataset = Dataset.from_dict(
        {
            "input_ids": [s.tokens for s in rows],
            "labels": [[t if m else -100 for t, m in zip(s.tokens, s.loss_mask, strict=True)] for s in rows],
        }
    )
    ends: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends.append(time.perf_counter())

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=len(batches[0]),
            max_steps=len(batches),
            learning_rate=lr,
            lr_scheduler_type="constant",
            adam_beta1=BETAS[0],
            adam_beta2=BETAS[1],
            adam_epsilon=EPS,
            max_grad_norm=CLIP,
            train_sampling_strategy="sequential",
            bf16=target.dtype == torch.bfloat16,
            gradient_checkpointing=gradient_checkpointing,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=target.device.type == "cpu",
            seed=SEED,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = SFTTrainer(
            model=_peft_model(base_dir, target),
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[Clock()],
        )
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
    times = [b - a for a, b in zip([start, *ends[:-1]], ends, strict=True)]
    name = "TRL SFTTrainer" + ("" if gradient_checkpointing else ", no grad. ckpt")
    return Result(name, times, losses)


# -- measurement ----------------------------------------------------------------------------------


def count_parameters(base_dir: Path) -> int:
    """The checkpoint's parameter count, from its config alone (the model is built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base_dir)))
    return sum(p.numel() for p in model.parameters())


def matmul_gflops(target: Target, repeats: int = 5) -> float:
    """The best rate of a square matmul in the target's dtype on its device (this process's threads on a
    CPU): what the hardware gives now. 2048^3 on a CPU, 8192^3 on a GPU (large enough to fill it)."""
    size = 2048 if target.device.type == "cpu" else 8192
    a, b = (torch.randn(size, size, device=target.device, dtype=target.dtype) for _ in range(2))
    torch.mm(a, b)
    target.sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        target.sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def run_workload(
    title: str,
    batches: Batches,
    warmup: int,
    contenders: Sequence[tuple[str, Callable[[Batches], Result]]],
    params: int,
    target: Target,
) -> None:
    peak = matmul_gflops(target)
    tokens = [sum(len(s.tokens) for s in batch) for batch in batches]
    timed_tokens = sum(tokens[warmup:])
    results = []
    for _, run in contenders:
        result = run(batches)
        if len(result.step_seconds) != len(batches):
            raise RuntimeError(
                f"{result.name}: timed {len(result.step_seconds)} steps, expected {len(batches)}"
            )
        results.append(result)
    peak = max(peak, matmul_gflops(target))
    shapes = sorted({(len(b), max(len(s.tokens) for s in b)) for b in batches})
    trained = sum(sum(s.loss_mask) for b in batches for s in b) / sum(tokens)
    print(
        f"\n## {title}: {len(batches) - warmup} timed steps after {warmup} warm-up, "
        f"{len(batches[0])} sequences per step, "
        f"{sum(tokens) / sum(len(b) for b in batches):.1f} tokens per sequence on average "
        f"(longest {max(w for _, w in shapes)}), {trained:.0%} of tokens carry loss"
    )
    size = 2048 if target.device.type == "cpu" else 8192
    precision = str(target.dtype).removeprefix("torch.")
    print(f"{precision} matmul peak ({size}^3, best of 5, before and after): {peak:.0f} GFLOPS")
    baseline = next((r for r in results if r.name == "TRL SFTTrainer"), None)
    columns = ("tokens/s", 9), ("s/step", 7), ("vs TRL", 7), ("% of peak", 9), ("final loss", 10)
    header = f"| {'contender':<30} | " + " | ".join(f"{name:>{width}}" for name, width in columns) + " |"
    print(header)
    print("|" + "|".join("-" * (len(part)) for part in header.split("|")[1:-1]) + "|")
    for result in results:
        seconds = sum(result.step_seconds[warmup:])
        tps = timed_tokens / seconds
        share = 4 * params * tps / (peak * 1e9)
        versus = f"{sum(baseline.step_seconds[warmup:]) / seconds:.2f}x" if baseline else "-"
        print(
            f"| {result.name:<30} | {tps:>9.1f} | {statistics.median(result.step_seconds[warmup:]):>7.2f} | "
            f"{versus:>7} | {share:>9.0%} | {result.losses[-1]:>10.4f} |"
        )
    print("losses per step:")
    for result in results:
        print(f"  {result.name:<30} " + " ".join(f"{loss:.4f}" for loss in result.losses))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8, help="timed steps of the default workload")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps (not timed) before them")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--long-steps", type=int, default=3, help="timed steps of 8 x 256 (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--skip-trl", action="store_true", help="run without TRL (the bench extra)")
    parser.add_argument("--only", default=None, help="comma-separated contenders: engine,peft,trl,trl-nockpt")
    targets.add_arguments(parser)
    parser.add_argument("--long-shape", default="8x256", help="sequences x tokens of the long workload")
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=8192,
        help="the engine's micro-batch budget (its default: 8192)",
    )
    args = parser.parse_args()
    try:
        long_rows, long_length = (int(v) for v in args.long_shape.lower().split("x"))
    except ValueError:
        parser.error(f"--long-shape must look like 8x256, got {args.long_shape!r}")
    device = targets.device(parser, args)
    target = Target(device, getattr(torch, args.dtype))

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.skip_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit("TRL is not installed: pip install -e '.[bench]' (or pass --skip-trl)") from None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from resources.local_engine.runtime import load_tokenizer

    base_dir, name = targets.base_model(parser, args)
    params = count_parameters(base_dir)
    tokenizer = load_tokenizer(base_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    print(
        f"# {name} ({params / 1e6:.1f}M params), LoRA rank {RANK} all linear layers, {args.dtype}, "
        f"{targets.hardware(device)}, load average {targets.load_average()} at start, "
        f"torch {torch.__version__}"
    )

    contenders: list[tuple[str, Callable[[Batches], Result]]] = [
        ("engine", lambda b: run_engine(base_dir, b, args.lr, target, args.max_batch_tokens)),
        ("peft", lambda b: run_peft(base_dir, b, args.lr, pad_id, target)),
    ]
    if not args.skip_trl:
        contenders += [
            ("trl", lambda b: run_trl(base_dir, b, args.lr, tokenizer, True, target)),
            ("trl-nockpt", lambda b: run_trl(base_dir, b, args.lr, tokenizer, False, target)),
        ]
    if args.only:
        wanted = set(args.only.split(","))
        contenders = [c for c in contenders if c[0] in wanted]

    total = args.warmup + args.steps
    run_workload(
        "default workload (kitchen/arithmetic, as `kitchen run supervised` batches it)",
        arithmetic_batches(base_dir, args.batch, total),
        args.warmup,
        contenders,
        params,
        target,
    )
    if args.long_steps > 0:
        run_workload(
            f"long fully-weighted sequences ({long_rows} x {long_length} random tokens)",
            random_batches(len(tokenizer), long_rows, long_length, 1 + args.long_steps),
            1,
            contenders,
            params,
            target,
        )
    print(f"\nload average at end: {targets.load_average()}")


if __name__ == "__main__":
    main()
