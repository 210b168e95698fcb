"""What a sampling client on the current training weights costs: time to get one, memory to hold one.

    python bench/sampling_snapshot.py [--model tiny|packaged] [--rank 32] [--clients 4]

RL takes a sampler on the current weights every step. Three ways to get one are compared, each holding
``--clients`` samplers alive at once (as a loop with in-flight rollouts does):

- ``snapshot``: ``save_weights_and_get_sampling_client()``: the LoRA tensors cloned on the training
  client's queue, applied as an overlay to the shared base model;
- ``save + open``: ``save_weights_for_sampler`` then ``create_sampling_client(path)``: the adapter goes to
  disk (hashed, atomically renamed) and is read back as an overlay (how evaluation opens trained weights);
- ``save + merge (old)``: the path ``create_sampling_client(path)`` took before the overlay: a deep copy of
  the base model with the adapter merged in, reproduced here for comparison.

``ms`` is the median wall time of one call until the client is usable; ``MB/client`` is the growth of the
process's resident memory divided by the clients held (allocator noise dominates on the tiny model);
``adapter MB`` is the exact size of the tensors a client holds besides the shared base; ``score ms``
is one ``compute_logprobs`` of a 256-token sequence (what the unmerged overlay costs at run time).
``--model packaged`` is SmolLM2-135M-Instruct (dequantized into KITCHEN_HOME once, ~40 s).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinker import types

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resources.local_engine import LocalSamplingClient, LocalServiceClient, LocalTrainingClient, path_from_uri
from resources.local_engine.runtime import load_tokenizer, shared_base_model


def _rss_mb() -> float:
    """Resident memory after handing freed heap back to the OS, so that a delta counts what is held,
    not what the allocator kept from earlier work (the training step's activations)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _merged(client: LocalTrainingClient, service: LocalServiceClient, name: str) -> LocalSamplingClient:
    """The pre-overlay ``create_sampling_client(model_path)``: deep-copy the shared base, merge into it."""
    from peft import PeftModel

    path = client.save_weights_for_sampler(name).result().path
    runtime = service.runtime
    base = copy.deepcopy(shared_base_model(client.base_model, runtime.device, runtime.dtype))
    model = PeftModel.from_pretrained(base, str(path_from_uri(path))).merge_and_unload()
    model.eval()
    model.requires_grad_(False)
    return LocalSamplingClient(model, load_tokenizer(client.base_model), runtime, label=path)


def _measure(make: Callable[[int], Any], clients: int) -> tuple[float, float, float, Any]:
    """Median ms per call, resident MB per client held, adapter MB, and one client to score with."""
    before = _rss_mb()
    held, times = [], []
    for index in range(clients):
        start = time.perf_counter()
        held.append(make(index))
        times.append((time.perf_counter() - start) * 1e3)
    per_client = (_rss_mb() - before) / clients
    overlay = getattr(held[0], "_overlay", None)
    adapter_mb = overlay.nbytes / 2**20 if overlay is not None else float("nan")
    return statistics.median(times), per_client, adapter_mb, held[0]


def _score_ms(samplers: list[Any], tokens: list[int], rounds: int = 9) -> list[float]:
    """Median ``compute_logprobs`` time per sampler, the samplers taken in turn so that load from other
    processes falls on all of them alike."""
    prompt = types.ModelInput.from_ints(tokens)
    times: list[list[float]] = [[] for _ in samplers]
    for round_ in range(rounds + 1):
        for sampler, spent in zip(samplers, times, strict=True):
            start = time.perf_counter()
            sampler.compute_logprobs(prompt).result()
            if round_:  # the first round warms up
                spent.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(spent) for spent in times]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "packaged"], default="tiny")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kitchen-bench-snapshot-") as tmp:
        _run(args, Path(tmp))


def _run(args: argparse.Namespace, work: Path) -> None:
    if args.model == "tiny":
        from kitchen.models.tiny import build_tiny_model

        model_dir = str(build_tiny_model(work / "tiny"))
    else:
        from kitchen.models.base import resolve_base_model

        model_dir = resolve_base_model("SmolLM2-135M-Instruct").backend_model
    service = LocalServiceClient(root=work / "engine")
    client = service.create_lora_training_client(model_dir, rank=args.rank, seed=0).result()
    vocab = len(client.get_tokenizer())
    rng = random.Random(0)
    tokens = [rng.randrange(vocab) for _ in range(256)]
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[255]),
            "weights": types.TensorData(data=[1.0] * 255, dtype="float32", shape=[255]),
        },
    )
    client.forward_backward([datum], "cross_entropy")
    client.optim_step(types.AdamParams(learning_rate=1e-3)).result()  # a trained adapter: B is not zero

    start = time.perf_counter()
    base = service.create_sampling_client(base_model=model_dir).result()
    weights_mb = sum(p.numel() * p.element_size() for p in base._model.parameters()) / 2**20
    print(
        f"model {args.model} ({model_dir}), LoRA rank {args.rank}, {args.clients} clients held per row\n"
        f"shared base model: {weights_mb:.1f} MB of weights, loaded once per process "
        f"in {(time.perf_counter() - start) * 1e3:.0f} ms\n"
    )
    rows = [
        ("base model (no adapter)", lambda i: service.create_sampling_client(base_model=model_dir).result()),
        ("snapshot", lambda i: client.save_weights_and_get_sampling_client().result()),
        (
            "save + open",
            lambda i: client.create_sampling_client(
                client.save_weights_for_sampler(f"s{i}").result().path
            ).result(),
        ),
        ("save + merge (old)", lambda i: _merged(client, service, f"m{i}")),
    ]
    measured = [(label, *_measure(make, args.clients)) for label, make in rows]
    scores = _score_ms([row[-1] for row in measured], tokens)
    print(f"{'path':<26}{'ms':>9}{'MB/client':>11}{'adapter MB':>12}{'score ms':>10}")
    for (label, ms, per_client, adapter_mb, _), score in zip(measured, scores, strict=True):
        print(f"{label:<26}{ms:>9.1f}{per_client:>11.1f}{adapter_mb:>12.2f}{score:>10.1f}")
    del base


if __name__ == "__main__":
    main()
