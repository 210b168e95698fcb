"""The training loop's own behaviour: schedules, batching, pipelining order, checkpoints, failures, resume,
and plans that sample from the policy they train."""

from __future__ import annotations

import functools
import json
import math
import operator
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from tinker import types

from kitchen.contract import ResultFuture, ServiceClient, TrainingClient
from kitchen.training.batching import EpochBatches
from kitchen.training.loop import Ledger, TrainingSpec, read_metrics, run_training
from kitchen.training.plan import PlanBase, Policy, StepBatch, weighted_nll_metrics
from kitchen.training.schedule import learning_rate_at, recommended_lora_lr
from kitchen.training.supervised import SupervisedPlan
from resources.futures import resolved
from resources.local_engine import LocalServiceClient


def _datums(n: int, length: int = 12) -> list[types.Datum]:
    out = []
    for i in range(n):
        tokens = [(7 * i + 3 * j) % 300 + 5 for j in range(length + 1)]
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [0.0] * 4 + [1.0] * (length - 4)},
            )
        )
    return out


def _spec(base: Path, **overrides: object) -> TrainingSpec:
    values: dict[str, object] = dict(
        base_model=str(base),
        lora_rank=4,
        learning_rate=1e-2,
        lr_schedule="linear",
        warmup_steps=0,
        save_every=2,
        seed=0,
    )
    values.update(overrides)
    return TrainingSpec(**values)  # type: ignore[arg-type]


def _sft(n: int, batch_size: int, epochs: int = 1, max_steps: int | None = None) -> SupervisedPlan:
    return SupervisedPlan.build(
        _datums(n), datums_hash="h", batch_size=batch_size, epochs=epochs, seed=0, max_steps=max_steps
    )


# -- schedules and batches -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("constant", [1.0, 1.0, 1.0, 1.0]),
        ("linear", [1.0, 0.75, 0.5, 0.25]),
        ("cosine", [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
    ],
)
def test_schedules(schedule: str, expected: list[float]) -> None:
    got = [learning_rate_at(s, total_steps=4, base_lr=1.0, schedule=schedule) for s in range(4)]  # type: ignore[arg-type]
    assert got == pytest.approx(expected)


def test_warmup_ramps_then_decays() -> None:
    got = [
        learning_rate_at(s, total_steps=6, base_lr=1.0, schedule="linear", warmup_steps=2) for s in range(6)
    ]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])


def test_schedule_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown lr schedule"):
        learning_rate_at(0, total_steps=2, base_lr=1.0, schedule="exponential")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outside"):
        learning_rate_at(2, total_steps=2, base_lr=1.0, schedule="linear")


def test_recommended_lr_follows_cookbook_rule() -> None:
    # tinker-cookbook quotes ~2.8e-4 for Llama-3.1-8B (hidden 4096).
    assert recommended_lora_lr(4096, "LlamaForCausalLM") == pytest.approx(2.856e-4, rel=1e-3)
    assert recommended_lora_lr(None, None) == 2e-4


def test_batches_are_seeded_full_per_epoch_and_capped() -> None:
    a = EpochBatches(10, batch_size=3, epochs=2, seed=1)
    assert a.total_steps == 6 and [a.epoch_of(s) for s in range(6)] == [0, 0, 0, 1, 1, 1]
    steps = [a.indices(s) for s in range(6)]
    assert all(len(x) == 3 for x in steps)
    assert len(set(functools.reduce(operator.iadd, steps[:3], []))) == 9  # an epoch never repeats an example
    assert steps == [EpochBatches(10, 3, 2, seed=1).indices(s) for s in range(6)]
    assert steps != [EpochBatches(10, 3, 2, seed=2).indices(s) for s in range(6)]
    assert EpochBatches(10, 3, 5, seed=0, max_steps=4).total_steps == 4
    with pytest.raises(ValueError, match="larger than the 10 training examples"):
        EpochBatches(10, batch_size=11, epochs=1, seed=0)


# -- the loop ---------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.epochs: list[tuple[int, int]] = []
        self.started: list[tuple[int, Any]] = []

    def on_start(self, total_steps: int, resumed_from: Any) -> None:
        self.started.append((total_steps, resumed_from))

    def on_step(self, metrics: Any, total_steps: int) -> None:
        self.steps.append(metrics.step)

    def on_checkpoint(self, checkpoint: Any) -> None:
        pass

    def on_epoch(self, epoch: int, step: int) -> None:
        self.epochs.append((epoch, step))


def test_loop_records_every_step_and_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    recorder = Recorder()
    result = run_training(
        LocalServiceClient(root=tmp_path / "engine"),
        _spec(tiny_model_dir, max_in_flight=3),
        _sft(10, 4, epochs=2, max_steps=3),
        tmp_path / "run",
        key="k",
        observer=recorder,
    )
    assert recorder.steps == [1, 2, 3] and recorder.started == [(3, None)]
    assert recorder.epochs == [(0, 2), (1, 3)]
    assert [m.step for m in result.metrics] == [1, 2, 3]
    assert [(c.step, c.kind) for c in result.checkpoints] == [(2, "state"), (3, "state"), (3, "sampler")]
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    assert ledger["complete"] is True and ledger["key"] == "k"
    assert [m.step for m in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]


def test_sft_loss_is_nll_per_trained_token(tiny_model_dir: Path, tmp_path: Path) -> None:
    plan = _sft(4, 4)
    service = LocalServiceClient(root=tmp_path / "engine")
    result = run_training(service, _spec(tiny_model_dir, save_every=0), plan, tmp_path / "run", key="k")
    # Recompute step 1's loss independently: the weighted NLL of a fresh client on the same batch.
    fresh = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=0).result()
    batch = plan.prepare(0, None).datums
    out = fresh.forward(batch, "cross_entropy").result()
    nll = weight = 0.0
    for datum, record in zip(batch, out.loss_fn_outputs, strict=True):
        weights = datum.loss_fn_inputs["weights"].tolist()
        nll -= sum(w * lp for w, lp in zip(weights, record["logprobs"].tolist(), strict=True))
        weight += sum(weights)
    assert result.metrics[0].loss == pytest.approx(nll / weight, rel=1e-5)
    assert result.metrics[0].trained_tokens == 4 * 8


class FailingService:
    """Wraps the local engine so the ``fail_at``-th forward_backward fails: synchronously (a refused
    request) or, as a real backend's request would, through its *future*, after later steps were queued."""

    def __init__(self, service: LocalServiceClient, fail_at: int, mode: str) -> None:
        self.service, self.fail_at, self.mode, self.calls = service, fail_at, mode, 0

    def _wrap(self, client: Any) -> Any:
        outer = self

        class Client:
            def __getattr__(self, name: str) -> Any:
                return getattr(client, name)

            def forward_backward(self, data: Any, loss_fn: str, loss_fn_config: Any = None) -> Any:
                outer.calls += 1
                if outer.calls == outer.fail_at:
                    if outer.mode == "raise":
                        raise ConnectionError("transient")
                    future: Future[Any] = Future()
                    future.set_exception(ConnectionError("the request failed on the server"))
                    return future
                return client.forward_backward(data, loss_fn, loss_fn_config)

        return Client()

    def create_lora_training_client(self, *args: Any, **kwargs: Any) -> Any:
        return resolved(self._wrap(self.service.create_lora_training_client(*args, **kwargs).result()))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.service, name)


def test_interrupted_run_resumes_from_last_checkpoint_and_matches(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    spec = _spec(tiny_model_dir)
    straight = run_training(
        LocalServiceClient(root=tmp_path / "a"), spec, _sft(12, 2), tmp_path / "run-a", key="k"
    )
    service = LocalServiceClient(root=tmp_path / "b")
    with pytest.raises(ConnectionError):
        run_training(FailingService(service, 5, "raise"), spec, _sft(12, 2), tmp_path / "run-b", key="k")  # type: ignore[arg-type]
    ledger = Ledger.open(tmp_path / "run-b", "k")
    assert not ledger.complete and ledger.latest_state() is not None
    assert ledger.latest_state().step == 4  # type: ignore[union-attr]

    recorder = Recorder()
    resumed = run_training(service, spec, _sft(12, 2), tmp_path / "run-b", key="k", observer=recorder)
    assert resumed.resumed_from is not None and resumed.resumed_from.path.endswith("step-000004")
    assert recorder.started[0][1] is not None and recorder.started[0][1].step == 4  # observers are told
    assert [m.step for m in resumed.metrics] == [1, 2, 3, 4, 5, 6]
    assert [m.loss for m in resumed.metrics] == [m.loss for m in straight.metrics]


def test_a_failed_future_stops_the_ledger_before_later_checkpoints(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Step 3's request fails *through its future* while steps 4-6 (and the step-4 checkpoint) are in
    flight and succeed: nothing after step 2 may enter the ledger or metrics.jsonl, so the retry trains
    batch 3 instead of resuming past it."""
    spec = _spec(tiny_model_dir, save_every=1, max_in_flight=4)
    straight = run_training(
        LocalServiceClient(root=tmp_path / "a"), spec, _sft(12, 2), tmp_path / "run-a", key="k"
    )
    service = LocalServiceClient(root=tmp_path / "b")
    with pytest.raises(ConnectionError, match="failed on the server"):
        run_training(FailingService(service, 3, "future"), spec, _sft(12, 2), tmp_path / "run-b", key="k")  # type: ignore[arg-type]
    ledger = Ledger.open(tmp_path / "run-b", "k")
    assert [c.step for c in ledger.checkpoints] == [1, 2]
    assert [m.step for m in read_metrics(tmp_path / "run-b" / "metrics.jsonl")] == [1, 2]
    resumed = run_training(service, spec, _sft(12, 2), tmp_path / "run-b", key="k")
    assert resumed.resumed_from is not None and resumed.resumed_from.step == 2
    assert [m.loss for m in resumed.metrics] == [m.loss for m in straight.metrics]


def test_changed_inputs_do_not_resume(tiny_model_dir: Path, tmp_path: Path) -> None:
    service = LocalServiceClient(root=tmp_path / "e")
    run_training(service, _spec(tiny_model_dir, save_every=1), _sft(4, 2), tmp_path / "run", key="old")
    ledger_path = tmp_path / "run" / "ledger.json"
    data = json.loads(ledger_path.read_text())
    data["complete"] = False
    ledger_path.write_text(json.dumps(data))
    result = run_training(
        service, _spec(tiny_model_dir, save_every=1), _sft(4, 2), tmp_path / "run", key="new"
    )
    assert result.resumed_from is None


# -- a plan that samples from the policy every step ----------------------------------------------------------

PROMPT = [11, 22, 33, 44, 55]
PROBE = [7, 70, 170, 270, 17, 117, 217]


@dataclass
class SamplingPlan(PlanBase):
    """On-policy toy RL: sample a completion from the current weights, train on it (cross_entropy).

    Records, per step, the policy version it sampled from and the policy's logprobs on a fixed probe, so
    the test can compare them with the weights an independent sequential replay had at that point.
    """

    seen: dict[int, tuple[int, list[float]]] = field(default_factory=dict)
    plan_state: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> Mapping[str, Any]:
        return {"toy": "sampling"}

    def prepare(self, step: int, policy: Policy | None) -> StepBatch:
        assert policy is not None
        probe = policy.client.compute_logprobs(types.ModelInput.from_ints(PROBE)).result()
        self.seen[step] = (policy.version, [float(x) for x in probe[1:]])
        datum = sampled_datum(policy.client, step)
        self.plan_state = {"last_prepared": step}
        return StepBatch(epoch=0, datums=[datum], policy_version=policy.version)

    def submit(self, client: TrainingClient, batch: StepBatch) -> ResultFuture[types.ForwardBackwardOutput]:
        return client.forward_backward(batch.datums, "cross_entropy")

    def metrics(self, batch: StepBatch, output: types.ForwardBackwardOutput) -> dict[str, float]:
        return weighted_nll_metrics(batch, output)

    def state(self) -> dict[str, Any]:
        return dict(self.plan_state)

    def begin(self, run_dir: Path, step: int, state: Mapping[str, Any]) -> None:
        super().begin(run_dir, step, state)
        self.begun_with = (step, dict(state))


def sampled_datum(sampler: Any, step: int) -> types.Datum:
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=1000 + step, stop=[])
    completion = sampler.sample(types.ModelInput.from_ints(PROMPT), 1, params).result().sequences[0].tokens
    tokens = PROMPT + list(completion)
    weights = [0.0] * (len(PROMPT) - 1) + [1.0] * len(completion)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


def _replay(service: ServiceClient, spec: TrainingSpec, steps: int) -> list[list[float]]:
    """The same training, written out sequentially by hand: the probe's logprobs *before* each step."""
    client = service.create_lora_training_client(
        spec.base_model, rank=spec.lora_rank, seed=spec.seed
    ).result()
    probes = []
    for step in range(steps):
        out = client.forward([_probe_datum()], "cross_entropy").result()
        probes.append([float(x) for x in out.loss_fn_outputs[0]["logprobs"].tolist()])
        sampler = client.save_weights_for_sampler(f"replay-{step}").result().path
        datum = sampled_datum(client.create_sampling_client(sampler).result(), step)
        lr = learning_rate_at(step, total_steps=steps, base_lr=spec.learning_rate, schedule=spec.lr_schedule)
        client.forward_backward([datum], "cross_entropy").result()
        client.optim_step(spec.adam(lr)).result()
    return probes


def _probe_datum() -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(PROBE[:-1]),
        loss_fn_inputs={"target_tokens": PROBE[1:], "weights": [1.0] * (len(PROBE) - 1)},
    )


def test_an_on_policy_plan_samples_the_weights_after_the_previous_step_and_resumes(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    spec = _spec(tiny_model_dir, learning_rate=5e-2, save_every=2, max_in_flight=8)
    service = LocalServiceClient(root=tmp_path / "engine")
    expected = _replay(service, spec, 6)

    interrupted = SamplingPlan(6, max_staleness=0)
    with pytest.raises(ConnectionError):
        run_training(FailingService(service, 4, "future"), spec, interrupted, tmp_path / "run", key="k")  # type: ignore[arg-type]
    plan = SamplingPlan(6, max_staleness=0)
    result = run_training(service, spec, plan, tmp_path / "run", key="k")

    assert result.resumed_from is not None and result.resumed_from.step == 2
    assert plan.begun_with == (2, {"last_prepared": 1})  # the plan state recorded with the checkpoint
    assert sorted(plan.seen) == [2, 3, 4, 5]
    for step, (version, probe) in {**interrupted.seen, **plan.seen}.items():
        assert version == step  # step N samples from the weights after N steps, never staler
        assert probe == pytest.approx(expected[step], abs=1e-5)
    assert [m.policy_version for m in result.metrics] == [0, 1, 2, 3, 4, 5]


def test_a_stale_plan_refreshes_its_policy_only_when_too_stale(tiny_model_dir: Path, tmp_path: Path) -> None:
    plan = SamplingPlan(5, max_staleness=2)
    run_training(
        LocalServiceClient(root=tmp_path / "engine"), _spec(tiny_model_dir), plan, tmp_path / "run", key="k"
    )
    assert [plan.seen[s][0] for s in range(5)] == [0, 0, 0, 3, 3]


def test_plan_metrics_must_report_loss(tiny_model_dir: Path, tmp_path: Path) -> None:
    class NoLoss(SupervisedPlan):
        def metrics(self, batch: StepBatch, output: types.ForwardBackwardOutput) -> dict[str, float]:
            return {"something": 1.0}

    plan = NoLoss.build(_datums(4), datums_hash="h", batch_size=2, epochs=1, seed=0, max_steps=None)
    with pytest.raises(ValueError, match="must report 'loss'"):
        run_training(
            LocalServiceClient(root=tmp_path / "e"), _spec(tiny_model_dir), plan, tmp_path / "run", key="k"
        )


def test_weights_after_resume_equal_an_uninterrupted_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Every LoRA tensor of the final adapter, resumed vs straight (the kill -9 guarantee's core)."""
    from safetensors.torch import load_file

    spec = _spec(tiny_model_dir, save_every=1)
    a = run_training(LocalServiceClient(root=tmp_path / "a"), spec, _sft(12, 2), tmp_path / "ra", key="k")
    service = LocalServiceClient(root=tmp_path / "b")
    with pytest.raises(ConnectionError):
        run_training(FailingService(service, 4, "raise"), spec, _sft(12, 2), tmp_path / "rb", key="k")  # type: ignore[arg-type]
    b = run_training(service, spec, _sft(12, 2), tmp_path / "rb", key="k")

    def tensors(uri: str) -> dict[str, torch.Tensor]:
        return load_file(str(Path(uri.removeprefix("file://")) / "adapter_model.safetensors"))

    ta, tb = tensors(a.sampler_path), tensors(b.sampler_path)
    assert ta.keys() == tb.keys()
    assert max(float((ta[k] - tb[k]).abs().max()) for k in ta) <= 1e-6
