"""Kitchen's sampler against ``transformers``' ``generate``: same model, prompts, lengths, greedy.

    python bench/sampling_vs_generate.py [--max-new-tokens 64] [--batch 32] [--repeats 2] [--threads N]
                                         [--device cpu] [--dtype float32] [--base DIR]

On a GPU: ``--device cuda`` (``--dtype bfloat16`` is the engine's CUDA default; greedy outputs can then
part from ``generate``'s where two tokens tie after rounding). ``--base DIR``: any local checkpoint
instead of the packaged model.

Every contender generates greedily (temperature 0) from the same prompts with the same model (the packaged
SmolLM2-135M-Instruct, fp32, one torch thread setting), at most ``--max-new-tokens`` new tokens per row, and
stops a row at its first EOS (the engine's EOS ids: the tokenizer's and the generation config's). The
prompts are realistic chat prompts rendered with the model's chat template as distillation and evaluation
render them: held-out ``kitchen/arithmetic`` questions (short answers: a row stops after a few tokens) and
a few open questions that run to the token limit (``--long``), so a batch mixes short and long rows, as RL
groups and evaluation batches do.

Contenders, each at batch 1 (one prompt at a time, every prompt) and batch ``--batch`` (all prompts at once):
- ``transformers generate``: ``model.generate(input_ids, attention_mask, do_sample=False, max_new_tokens,
  eos_token_id, pad_token_id)`` on a left-padded batch; its default KV cache (``DynamicCache``);
- ``Kitchen sampler``: ``LocalServiceClient().create_sampling_client(base_model=...)``, the public client:
  every ``sample`` call is submitted before any is awaited, so the worker batches them;
- ``Kitchen generate()``: ``resources.local_engine.generation.generate`` called directly on the same rows
  (the engine's loop without the client: the difference to the row above is the client's overhead).

``tokens/s`` counts the tokens actually generated, up to and including each row's EOS (the same count for
every contender when their outputs agree), over the wall time of the whole call (prefill included); the
best of ``--repeats`` runs after one warm-up run of each contender (excluded). ``vs generate`` is the
ratio of tokens/s to ``transformers generate`` at the same batch size. ``same as generate`` counts the
rows whose tokens equal ``generate``'s exactly; the first differing position of any mismatch is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import targets
import torch
from tinker import types

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Open questions whose replies run past the token limit: the long rows of a mixed batch.
LONG_PROMPTS = (
    "Explain in a few paragraphs why the sky is blue.",
    "Write a short story about a robot who learns to cook.",
    "What are the main differences between Python and JavaScript?",
    "Give me five tips for staying focused while working from home.",
    "Describe how a bill becomes a law in the United States.",
    "Summarise the plot of Romeo and Juliet.",
    "How do vaccines train the immune system?",
    "Write a haiku about autumn, then explain its imagery.",
)

Outputs = list[list[int]]


@dataclass
class Run:
    name: str
    batch: int
    seconds: float
    cpu_seconds: float
    """CPU time of the whole process (all threads): less sensitive than wall time to other load."""
    outputs: Outputs


def prompts(tokenizer: Any, count: int, long: int) -> list[list[int]]:
    """``count`` chat prompts: ``long`` open questions, the rest held-out arithmetic questions."""
    from kitchen.data.builtin import builtin_dataset
    from kitchen.workflows.distillation.prompts import render_prompt

    if not 0 <= long <= min(count, len(LONG_PROMPTS)):
        raise SystemExit(f"--long must be between 0 and {min(count, len(LONG_PROMPTS))}")
    test = builtin_dataset("kitchen/arithmetic")["test"]
    chats = [row["messages"][:-1] for row in test.select(range(count - long))]
    system = chats[0][0]
    chats += [[system, {"role": "user", "content": text}] for text in LONG_PROMPTS[:long]]
    # Interleaved, so each batch of a smaller --batch mixes short and long rows too.
    order = sorted(range(count), key=lambda i: (i * long) % count)
    return [render_prompt(chats[i], tokenizer) for i in order]


def until_eos(tokens: Sequence[int], eos: frozenset[int]) -> list[int]:
    """The generated tokens up to and including the first EOS (all of them if none)."""
    out: list[int] = []
    for token in tokens:
        out.append(int(token))
        if token in eos:
            break
    return out


def run_generate(model: Any, rows: list[list[int]], max_new: int, eos: frozenset[int], pad: int) -> Outputs:
    """``transformers``' ``generate`` on one left-padded batch, on the model's device."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            do_sample=False,
            max_new_tokens=max_new,
            eos_token_id=sorted(eos),
            pad_token_id=pad,
        )
    return [until_eos(seq[width:].tolist(), eos) for seq in out]


def run_sampler(client: Any, rows: list[list[int]], max_new: int) -> Outputs:
    """Every request submitted before any is awaited, as evaluation and RL submit them."""
    params = types.SamplingParams(max_tokens=max_new, temperature=0.0)
    futures = [client.sample(types.ModelInput.from_ints(row), 1, params) for row in rows]
    return [list(f.result().sequences[0].tokens) for f in futures]


def run_engine_generate(client: Any, rows: list[list[int]], max_new: int) -> Outputs:
    """The engine's generation loop, called directly with the rows the client would build."""
    from resources.local_engine.generation import RowParams, generate, stop_rule

    params = [
        RowParams(
            prompt=row,
            max_tokens=max_new,
            temperature=0.0,
            top_k=-1,
            top_p=1.0,
            stop=stop_rule(None, client._eos_ids),
            seed=0,
        )
        for row in rows
    ]
    model, runtime = client._model, client._runtime
    results = generate(model, client.get_tokenizer(), params, runtime.device, client._pad_id)
    return [r.tokens for r in results]


def timed(
    contenders: Sequence[tuple[str, Callable[[list[list[int]]], Outputs]]],
    rows: list[list[int]],
    batch: int,
    repeats: int,
) -> list[Run]:
    """Each contender's best wall time over ``repeats`` passes of ``rows`` in chunks of ``batch``, after a
    warm-up pass on the first chunk (excluded). The passes are interleaved (every contender once, then
    again), so a change in the machine's load falls on all of them alike."""
    chunks = [rows[i : i + batch] for i in range(0, len(rows), batch)]
    runs = [Run(name, batch, float("inf"), float("inf"), []) for name, _ in contenders]
    for _, call in contenders:
        call(chunks[0])
    for _ in range(repeats):
        for run, (_, call) in zip(runs, contenders, strict=True):
            start, cpu = time.perf_counter(), time.process_time()
            run.outputs = [tokens for chunk in chunks for tokens in call(chunk)]
            run.seconds = min(run.seconds, time.perf_counter() - start)
            run.cpu_seconds = min(run.cpu_seconds, time.process_time() - cpu)
    return runs


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="prompts, and rows of the batched runs")
    parser.add_argument("--long", type=int, default=4, help="open questions among the prompts (long rows)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each contender (best taken)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--skip-batch-1", action="store_true", help="time only the batched runs")
    targets.add_arguments(parser)
    args = parser.parse_args()
    device = targets.device(parser, args)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from resources.local_engine import LocalServiceClient
    from resources.local_engine.runtime import load_model

    base_dir, name = targets.base_model(parser, args)
    with tempfile.TemporaryDirectory() as root:
        client = LocalServiceClient(
            root=Path(root), device=args.device, dtype=args.dtype
        ).create_sampling_client(base_model=str(base_dir))
        sampler = client.result()
        tokenizer = sampler.get_tokenizer()
        eos, pad = sampler._eos_ids, sampler._pad_id
        model = load_model(base_dir, getattr(torch, args.dtype))
        model.to(device).eval()
        rows = prompts(tokenizer, args.batch, args.long)
        lengths = sorted(len(r) for r in rows)
        print(
            f"# {name}, {args.dtype}, {targets.hardware(device)}, "
            f"greedy, max_new_tokens {args.max_new_tokens}, {len(rows)} prompts of {lengths[0]} to "
            f"{lengths[-1]} tokens ({args.long} open questions), load average {targets.load_average()} "
            f"at start, torch {torch.__version__}"
        )
        max_new = args.max_new_tokens
        contenders: list[tuple[str, Callable[[list[list[int]]], Outputs]]] = [
            ("transformers generate", lambda r: run_generate(model, r, max_new, eos, pad)),
            ("Kitchen sampler", lambda r: run_sampler(sampler, r, max_new)),
            ("Kitchen generate()", lambda r: run_engine_generate(sampler, r, max_new)),
        ]
        batches = [args.batch] if args.skip_batch_1 else [1, args.batch]
        runs = [run for b in batches for run in timed(contenders, rows, b, args.repeats)]

    columns = ("batch", 5), ("tokens", 6), ("wall s", 6), ("cpu s", 6), ("tokens/s", 8), ("vs generate", 11)
    header = f"| {'contender':<22} | " + " | ".join(f"{n:>{w}}" for n, w in columns) + " | same as generate |"
    print(header)
    print("|" + "|".join("-" * len(part) for part in header.split("|")[1:-1]) + "|")
    mismatches = []
    for run in runs:
        reference = next(r for r in runs if r.batch == run.batch and r.name == "transformers generate")
        tokens = sum(len(t) for t in run.outputs)
        tps = tokens / run.seconds
        ratio = tps / (sum(len(t) for t in reference.outputs) / reference.seconds)
        same = sum(a == b for a, b in zip(run.outputs, reference.outputs, strict=True))
        cells = (
            run.batch,
            tokens,
            f"{run.seconds:.2f}",
            f"{run.cpu_seconds:.1f}",
            f"{tps:.1f}",
            f"{ratio:.2f}x",
        )
        print(
            f"| {run.name:<22} | "
            + " | ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, columns, strict=True))
            + f" | {same:>7} of {len(run.outputs):<5} |"
        )
        for row, (a, b) in enumerate(zip(run.outputs, reference.outputs, strict=True)):
            if a != b:
                mismatches.append(
                    f"  {run.name} batch {run.batch}, prompt {row}: first differs at token "
                    f"{first_difference(a, b)} (lengths {len(a)} vs {len(b)})"
                )
    lengths_out = sorted(len(t) for t in runs[0].outputs)
    print(
        f"generated tokens per row: {lengths_out[0]} to {lengths_out[-1]}, "
        f"{sum(n == max_new for n in lengths_out)} of {len(lengths_out)} rows reach the limit"
    )
    if mismatches:
        print("mismatches against transformers generate:")
        print("\n".join(mismatches))


if __name__ == "__main__":
    main()
