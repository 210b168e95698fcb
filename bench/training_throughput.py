"""Training throughput of the local engine: tokens/s and seconds per step for a few batch shapes.

    python bench/training_throughput.py [--model M] [--steps 3] [--shapes 8x64,16x64,8x256]

Prints a table. Each shape runs one warm-up step, then ``--steps`` timed forward_backward + optim_step
pairs on random tokens with every target weighted (the cost of SFT at that shape).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from tinker import types

from kitchen.models.base import DEFAULT_MODEL, resolve_base_model
from resources.local_engine import LocalServiceClient


def _batch(vocab: int, batch: int, length: int, rng: random.Random) -> list[types.Datum]:
    data = []
    for _ in range(batch):
        tokens = [rng.randrange(vocab) for _ in range(length + 1)]
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length},
            )
        )
    return data


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--shapes", default="8x64,16x64,8x256")
    args = parser.parse_args()

    base = resolve_base_model(args.model)
    service = LocalServiceClient()
    client = service.create_lora_training_client(base.backend_model, rank=args.rank, seed=0).result()
    vocab = len(client.get_tokenizer())
    rng = random.Random(0)
    adam = types.AdamParams(learning_rate=1e-4)
    rows = []
    for shape in args.shapes.split(","):
        batch, length = (int(x) for x in shape.split("x"))
        data = _batch(vocab, batch, length, rng)
        client.forward_backward(data, "cross_entropy").result()
        client.optim_step(adam).result()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            client.forward_backward(data, "cross_entropy").result()
            client.optim_step(adam).result()
            times.append(time.perf_counter() - start)
        step = statistics.median(times)
        rows.append((shape, batch * length, step, batch * length / step))

    print(
        f"model {args.model} ({base.num_parameters or '?'} params), LoRA rank {args.rank}, "
        f"{args.steps} timed steps per shape (median)"
    )
    print(f"{'batch x len':>12} {'tokens':>8} {'s/step':>8} {'tokens/s':>9}")
    for shape, tokens, step, tps in rows:
        print(f"{shape:>12} {tokens:>8} {step:>8.2f} {tps:>9.1f}")


if __name__ == "__main__":
    main()
