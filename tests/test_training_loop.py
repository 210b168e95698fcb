"""The training loop's own behaviour: schedules, batching, pipelining order, checkpoints and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tinker import types

from kitchen.training.batching import make_batches
from kitchen.training.loop import Batch, Ledger, TrainingSpec, run_training
from kitchen.training.schedule import learning_rate_at, recommended_lora_lr
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


def _spec(base: Path, steps: int, **overrides: object) -> TrainingSpec:
    values: dict[str, object] = dict(
        base_model=str(base),
        lora_rank=4,
        learning_rate=1e-2,
        lr_schedule="linear",
        warmup_steps=0,
        total_steps=steps,
        save_every=2,
        seed=0,
    )
    values.update(overrides)
    return TrainingSpec(**values)  # type: ignore[arg-type]


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


def test_batches_are_seeded_full_and_capped() -> None:
    datums = _datums(10)
    a = make_batches(datums, batch_size=3, epochs=2, seed=1)
    b = make_batches(datums, batch_size=3, epochs=2, seed=1)
    assert [len(x.datums) for x in a] == [3] * 6 and [x.epoch for x in a] == [0, 0, 0, 1, 1, 1]
    assert [[id(d) for d in x.datums] for x in a] == [[id(d) for d in x.datums] for x in b]
    c = make_batches(datums, batch_size=3, epochs=2, seed=2)
    assert [[id(d) for d in x.datums] for x in a] != [[id(d) for d in x.datums] for x in c]
    assert len(make_batches(datums, batch_size=3, epochs=5, seed=0, max_steps=4)) == 4
    with pytest.raises(ValueError, match="larger than the 10 training datums"):
        make_batches(datums, batch_size=11, epochs=1, seed=0)


def test_loop_records_every_step_and_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    batches = [Batch(epoch=0, datums=_datums(4))] * 5
    seen: list[int] = []

    class Recorder:
        def on_step(self, metrics, total_steps):  # type: ignore[no-untyped-def]
            seen.append(metrics.step)

        def on_checkpoint(self, checkpoint):  # type: ignore[no-untyped-def]
            pass

        def on_epoch(self, epoch, step):  # type: ignore[no-untyped-def]
            pass

    result = run_training(
        LocalServiceClient(root=tmp_path / "engine"),
        _spec(tiny_model_dir, 5, max_in_flight=3),
        batches,
        tmp_path / "run",
        key="k",
        observer=Recorder(),
    )
    assert seen == [1, 2, 3, 4, 5]
    assert [m.step for m in result.metrics] == [1, 2, 3, 4, 5]
    assert result.metrics[-1].loss < result.metrics[0].loss
    assert [(c.step, c.kind) for c in result.checkpoints] == [
        (2, "state"),
        (4, "state"),
        (5, "state"),
        (5, "sampler"),
    ]
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    assert ledger["complete"] is True and ledger["key"] == "k"


def test_interrupted_run_resumes_from_last_checkpoint_and_matches(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    batches = [Batch(epoch=0, datums=_datums(4)[i : i + 2]) for i in range(0, 4, 2)] * 3  # 6 steps
    spec = _spec(tiny_model_dir, 6)
    straight = run_training(
        LocalServiceClient(root=tmp_path / "a"), spec, batches, tmp_path / "run-a", key="k"
    )

    class FailAt5:
        """Wraps a training client so step 5's forward_backward raises, as a dropped connection would."""

        def __init__(self, service: LocalServiceClient) -> None:
            self.service, self.calls = service, 0

        def _wrap(self, client):  # type: ignore[no-untyped-def]
            outer = self

            class Client:
                def __getattr__(self, name):  # type: ignore[no-untyped-def]
                    return getattr(client, name)

                def forward_backward(self, data, loss_fn, loss_fn_config=None):  # type: ignore[no-untyped-def]
                    outer.calls += 1
                    if outer.calls == 5:
                        raise ConnectionError("transient")
                    return client.forward_backward(data, loss_fn)

            return Client()

        def create_lora_training_client(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return resolved(self._wrap(self.service.create_lora_training_client(*args, **kwargs).result()))

        def create_training_client_from_state_with_optimizer(self, path):  # type: ignore[no-untyped-def]
            return self.service.create_training_client_from_state_with_optimizer(path)

        def create_sampling_client(self, model_path=None, base_model=None):  # type: ignore[no-untyped-def]
            return self.service.create_sampling_client(model_path=model_path, base_model=base_model)

    service = LocalServiceClient(root=tmp_path / "b")
    with pytest.raises(ConnectionError):
        run_training(FailAt5(service), spec, batches, tmp_path / "run-b", key="k")  # type: ignore[arg-type]
    ledger = Ledger.open(tmp_path / "run-b", "k")
    assert not ledger.complete and ledger.latest_state() is not None
    assert ledger.latest_state().step == 4  # type: ignore[union-attr]

    resumed = run_training(service, spec, batches, tmp_path / "run-b", key="k")
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("step-000004")
    assert [m.step for m in resumed.metrics] == [1, 2, 3, 4, 5, 6]
    assert [m.loss for m in resumed.metrics] == [m.loss for m in straight.metrics]


def test_changed_inputs_do_not_resume(tiny_model_dir: Path, tmp_path: Path) -> None:
    batches = [Batch(epoch=0, datums=_datums(2))] * 2
    service = LocalServiceClient(root=tmp_path / "e")
    run_training(service, _spec(tiny_model_dir, 2, save_every=1), batches, tmp_path / "run", key="old")
    ledger_path = tmp_path / "run" / "ledger.json"
    data = json.loads(ledger_path.read_text())
    data["complete"] = False
    ledger_path.write_text(json.dumps(data))
    result = run_training(
        service, _spec(tiny_model_dir, 2, save_every=1), batches, tmp_path / "run", key="new"
    )
    assert result.resumed_from is None
