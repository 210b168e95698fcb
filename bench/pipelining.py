"""How much request latency the training loop's pipelining hides.

    python bench/pipelining.py [--latency-ms 200] [--steps 24] [--batch 4] [--length 32] [--in-flight 1,2,4,8]

The local engine is wrapped so that every request takes ``latency`` longer, as a remote service does:
half on the way to the engine, half on the way back, and the engine still runs requests one at a time
in submission order. Three ways to drive the same steps are timed:

- ``no latency``: the real loop on the bare engine, deepest pipeline (compute only);
- ``sequential``: each request awaited before the next is sent (``2 x latency`` per step on top);
- ``pipelined mN``: the real loop (``kitchen.training.loop.run_training``) with ``max_in_flight=N``.

``hidden`` is the share of the sequential run's injected latency that a mode no longer pays:
``1 - (mode - no latency) / (sequential - no latency)``. With compute ``c`` per step and latency ``L``,
``max_in_flight >= 1 + L / c`` keeps the engine busy, so everything is hidden.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import itertools
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from tinker import types

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kitchen.contract import (
    CustomLossFn,
    ResultFuture,
    SamplingClient,
    ServiceClient,
    SessionStatus,
    TrainingClient,
)
from kitchen.training.loop import TrainingSpec, run_training
from kitchen.training.supervised import SupervisedPlan
from resources.futures import resolved

T = TypeVar("T")


class _Wire:
    """Delivers calls after a delay, in the order they were made, and their results after another."""

    def __init__(self, one_way_s: float) -> None:
        self.one_way_s = one_way_s
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        threading.Thread(target=self._run, name="latency-wire", daemon=True).start()

    def _at(self, when: float, action: Callable[[], None]) -> None:
        with self._wake:
            heapq.heappush(self._queue, (when, next(self._order), action))
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue or self._queue[0][0] > time.perf_counter():
                    self._wake.wait(None if not self._queue else self._queue[0][0] - time.perf_counter())
                _, _, action = heapq.heappop(self._queue)
            action()

    def send(self, call: Callable[[], ResultFuture[T]]) -> Future[T]:
        outer: Future[T] = Future()

        def deliver() -> None:
            try:
                inner = call()
            except Exception as err:
                self._at(time.perf_counter() + self.one_way_s, functools.partial(outer.set_exception, err))
                return
            threading.Thread(target=self._await, args=(inner, outer), daemon=True).start()

        self._at(time.perf_counter() + self.one_way_s, deliver)
        return outer

    def _await(self, inner: ResultFuture[T], outer: Future[T]) -> None:
        try:
            value = inner.result()
        except Exception as err:
            self._at(time.perf_counter() + self.one_way_s, functools.partial(outer.set_exception, err))
            return
        self._at(time.perf_counter() + self.one_way_s, functools.partial(outer.set_result, value))


class LatencyTrainingClient:
    """A training client whose every request spends ``latency`` on the wire (contract-compatible)."""

    def __init__(self, inner: TrainingClient, wire: _Wire) -> None:
        self._inner, self._wire = inner, wire

    def forward(
        self, data: list[types.Datum], loss_fn: str, loss_fn_config: Mapping[str, float | str] | None = None
    ) -> Future[types.ForwardBackwardOutput]:
        return self._wire.send(lambda: self._inner.forward(data, loss_fn, loss_fn_config))

    def forward_backward(
        self, data: list[types.Datum], loss_fn: str, loss_fn_config: Mapping[str, float | str] | None = None
    ) -> Future[types.ForwardBackwardOutput]:
        return self._wire.send(lambda: self._inner.forward_backward(data, loss_fn, loss_fn_config))

    def forward_backward_custom(
        self, data: list[types.Datum], loss_fn: CustomLossFn
    ) -> Future[types.ForwardBackwardOutput]:
        return self._wire.send(lambda: self._inner.forward_backward_custom(data, loss_fn))

    def optim_step(
        self, optim_params: types.AdamParams | None = None, *, adam_params: types.AdamParams | None = None
    ) -> Future[types.OptimStepResponse]:
        return self._wire.send(lambda: self._inner.optim_step(optim_params, adam_params=adam_params))

    def save_state(self, name: str) -> Future[types.SaveWeightsResponse]:
        return self._wire.send(lambda: self._inner.save_state(name))

    def save_weights_for_sampler(self, name: str) -> Future[types.SaveWeightsForSamplerResponse]:
        return self._wire.send(lambda: self._inner.save_weights_for_sampler(name))

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> Future[SamplingClient]:
        return self._wire.send(lambda: self._inner.save_weights_and_get_sampling_client(name))

    def create_sampling_client(self, model_path: str) -> Any:
        time.sleep(2 * self._wire.one_way_s)
        return self._inner.create_sampling_client(model_path)

    def get_tokenizer(self) -> Any:
        return self._inner.get_tokenizer()


class LatencyService:
    """A service client whose clients inject ``latency_s`` per request; creation costs one round trip."""

    def __init__(self, inner: ServiceClient, latency_s: float) -> None:
        self._inner, self._wire = inner, _Wire(latency_s / 2)

    def _round_trip(self) -> None:
        time.sleep(2 * self._wire.one_way_s)

    def create_lora_training_client(
        self, base_model: str, rank: int = 32, seed: int | None = None
    ) -> Future[LatencyTrainingClient]:
        self._round_trip()
        return resolved(
            LatencyTrainingClient(
                self._inner.create_lora_training_client(base_model, rank, seed).result(), self._wire
            )
        )

    def create_training_client_from_state(self, path: str) -> Future[LatencyTrainingClient]:
        self._round_trip()
        return resolved(
            LatencyTrainingClient(self._inner.create_training_client_from_state(path).result(), self._wire)
        )

    def create_training_client_from_state_with_optimizer(self, path: str) -> Future[LatencyTrainingClient]:
        self._round_trip()
        return resolved(
            LatencyTrainingClient(
                self._inner.create_training_client_from_state_with_optimizer(path).result(), self._wire
            )
        )

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None) -> Any:
        self._round_trip()
        return self._inner.create_sampling_client(model_path=model_path, base_model=base_model)

    def close(self, status: SessionStatus = "success", detail: str | None = None) -> None:
        self._round_trip()
        self._inner.close(status, detail)


def _datums(vocab: int, count: int, length: int) -> list[types.Datum]:
    rng = random.Random(0)
    datums = []
    for _ in range(count):
        tokens = [rng.randrange(vocab) for _ in range(length + 1)]
        datums.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[length]),
                    "weights": types.TensorData(data=[1.0] * length, dtype="float32", shape=[length]),
                },
            )
        )
    return datums


def _plan(datums: list[types.Datum], batch: int, steps: int) -> SupervisedPlan:
    """The supervised plan over the random datums: ``steps`` steps of ``batch``."""
    return SupervisedPlan.build(
        datums, datums_hash="bench", batch_size=batch, epochs=1, seed=0, max_steps=steps
    )


def _spec(base_model: str, in_flight: int) -> TrainingSpec:
    return TrainingSpec(
        base_model=base_model,
        lora_rank=8,
        learning_rate=1e-4,
        lr_schedule="constant",
        warmup_steps=0,
        save_every=0,
        seed=0,
        max_in_flight=in_flight,
    )


def _time_loop(
    service: ServiceClient, base_model: str, plan: SupervisedPlan, in_flight: int, work: Path
) -> float:
    """Seconds per step of the real loop, excluding client creation and the final saves."""
    run_dir = Path(tempfile.mkdtemp(dir=work))
    result = run_training(
        service, _spec(base_model, in_flight), plan, run_dir, key=run_dir.name, resume=False
    )
    return result.metrics[-1].elapsed_seconds / plan.total_steps


def _time_sequential(service: ServiceClient, base_model: str, plan: SupervisedPlan) -> float:
    """Seconds per step when every request is awaited before the next one is sent."""
    client = service.create_lora_training_client(base_model, rank=8, seed=0).result()
    adam = types.AdamParams(learning_rate=1e-4)
    started = time.perf_counter()
    for step in range(plan.total_steps):
        client.forward_backward(plan.prepare(step, None).datums, "cross_entropy").result()
        client.optim_step(adam).result()
    return (time.perf_counter() - started) / plan.total_steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latency-ms", type=float, default=200.0, help="injected per request (round trip)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps a shared CPU quiet)")
    parser.add_argument("--in-flight", default="1,2,4,8", help="max_in_flight values to time")
    parser.add_argument("--model", default=None, help="local HF model dir (default: tiny random)")
    args = parser.parse_args()

    from kitchen.models.tiny import build_tiny_model
    from resources.local_engine import LocalServiceClient

    work = Path(tempfile.mkdtemp(prefix="kitchen-bench-"))
    model = args.model or str(build_tiny_model(work / "tiny"))
    engine = LocalServiceClient(root=work / "engine", num_threads=args.threads)
    vocab = len(engine.create_lora_training_client(model, rank=8, seed=0).result().get_tokenizer())
    datums = _datums(vocab, args.steps * args.batch, args.length)
    plan = _plan(datums, args.batch, args.steps)
    latency = args.latency_ms / 1000
    slow = LatencyService(engine, latency)

    in_flight = [int(x) for x in args.in_flight.split(",")]
    _time_loop(engine, model, _plan(datums, args.batch, 2), 1, work)  # warm-up: first-call costs stay out
    # Compute alone, with the engine never idle (the deepest pipeline), so "hidden" measures latency only.
    rows: list[tuple[str, float]] = [("no latency", _time_loop(engine, model, plan, max(in_flight), work))]
    rows.append(("sequential", _time_sequential(slow, model, plan)))
    for n in in_flight:
        rows.append((f"pipelined m{n}", _time_loop(slow, model, plan, n, work)))

    base, sequential = rows[0][1], rows[1][1]
    injected = sequential - base
    shape = f"{args.steps} steps of {args.batch}x{args.length} tokens"
    print(f"{args.latency_ms:g} ms injected per request, {shape}, compute {base * 1000:.0f} ms/step")
    print(f"{'mode':>14} {'ms/step':>8} {'vs sequential':>14} {'latency hidden':>15}")
    for name, seconds in rows:
        hidden = "" if name == "no latency" else f"{100 * (1 - (seconds - base) / injected):.0f}%"
        print(f"{name:>14} {seconds * 1000:>8.0f} {seconds / sequential:>14.2f} {hidden:>15}")
    best_name, best = min(rows[2:], key=lambda r: r[1])
    print(
        f"ratio pipelined/sequential: {best / sequential:.2f} ({best_name}); "
        f"latency hidden: {100 * (1 - (best - base) / injected):.0f}%"
    )


if __name__ == "__main__":
    main()
