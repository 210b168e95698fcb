"""The local engine on a CUDA device computes what it computes on the CPU.

The CPU path is checked against direct PyTorch computations elsewhere (tests/test_local_engine*.py); here
every built-in loss, a custom loss, checkpoints that cross devices, and sampling run on both devices from
the same seed and must agree: in float32 to rounding, in bfloat16 (the engine's CUDA default) to its
precision. Skipped without CUDA (CI has none); ``scripts/cuda_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tinker import types

from kitchen.contract import BUILTIN_LOSSES
from resources.local_engine import LocalServiceClient, path_from_uri
from resources.local_engine.vocab import MIN_ROWS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ADAM = types.AdamParams(learning_rate=2e-2)
CONFIGS: dict[str, dict[str, float] | None] = {"dro": {"beta": 0.5}}


def _rows(seed: int, count: int, length: int, prefix: int = 10) -> list[list[int]]:
    """Token rows of the tiny model's vocabulary that share their first ``prefix`` tokens (a system turn),
    so the shared-prefix decode runs."""
    rng = random.Random(seed)
    head = [rng.randrange(3, 400) for _ in range(prefix)]
    return [head + [rng.randrange(3, 400) for _ in range(length - prefix + i)] for i in range(count)]


def _datum(row: list[int], loss: str, seed: int) -> types.Datum:
    n = len(row) - 1
    rng = random.Random(seed)
    if loss == "cross_entropy":
        inputs: dict[str, Any] = {"weights": [0.0] * (n // 2) + [1.0] * (n - n // 2)}
    else:  # old logprobs near the model's (ratios about 1: both clipping branches are taken)
        inputs = {
            "logprobs": [-6.0 + rng.uniform(-0.3, 0.3) for _ in range(n)],
            "advantages": [rng.uniform(-1, 1) for _ in range(n)],
        }
    return types.Datum(
        model_input=types.ModelInput.from_ints(row[:-1]), loss_fn_inputs={"target_tokens": row[1:], **inputs}
    )


def _service(tmp_path: Path, device: str, dtype: str = "float32") -> LocalServiceClient:
    return LocalServiceClient(root=tmp_path / f"{device}-{dtype}", device=device, dtype=dtype)


def _trajectory(
    client: Any, data: list[types.Datum], loss: str, steps: int, adam: types.AdamParams = ADAM
) -> tuple[list[float], list[Any]]:
    losses, logprobs = [], []
    for _ in range(steps):
        out = client.forward_backward(data, loss, CONFIGS.get(loss)).result()
        client.optim_step(adam).result()
        losses.append(out.metrics["loss:sum"])
        logprobs = [o["logprobs"].to_torch() for o in out.loss_fn_outputs]
    return losses, logprobs


def _adapter(client: Any, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(path_from_uri(client.save_state(name).result().path) / "adapter.safetensors"))


@pytest.mark.parametrize("loss", BUILTIN_LOSSES)
def test_every_builtin_loss_trains_as_on_the_cpu_in_float32(
    tmp_path: Path, tiny_model_dir: Path, loss: str
) -> None:
    """Three steps of each loss from the same seed: the same losses, logprobs and adapter weights."""
    data = [_datum(row, loss, i) for i, row in enumerate(_rows(0, 3, 24))]
    results = {}
    for device in ("cpu", "cuda"):
        client = _service(tmp_path, device).create_lora_training_client(str(tiny_model_dir), rank=4, seed=3)
        trained = client.result()
        results[device] = (*_trajectory(trained, data, loss, steps=3), _adapter(trained, "end"))
    (cpu_losses, cpu_logprobs, cpu_adapter), (losses, logprobs, adapter) = results["cpu"], results["cuda"]
    assert losses == pytest.approx(cpu_losses, rel=1e-4, abs=1e-5)
    for got, want in zip(logprobs, cpu_logprobs, strict=True):
        assert got.device.type == "cpu"  # outputs come back to the host, as the service's do
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert adapter.keys() == cpu_adapter.keys()
    for name, tensor in adapter.items():
        assert tensor.device.type == "cpu" and tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, cpu_adapter[name], atol=1e-4, rtol=1e-3)


def test_long_batches_on_cuda_match_the_cpus_sliced_vocabulary(tmp_path: Path, tiny_model_dir: Path) -> None:
    """More graded positions than ``MIN_ROWS``: the CPU walks the vocabulary in slices, CUDA takes the
    whole logits (slices are for a CPU's cache); the two agree."""
    rows = _rows(1, 4, MIN_ROWS // 4 + 20, prefix=0)
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(row[:-1]),
            loss_fn_inputs={"target_tokens": row[1:], "weights": [1.0] * (len(row) - 1)},
        )
        for row in rows
    ]
    assert sum(len(row) - 1 for row in rows) >= MIN_ROWS
    outs = {}
    for device in ("cpu", "cuda"):
        client = _service(tmp_path, device).create_lora_training_client(str(tiny_model_dir), rank=4, seed=5)
        outs[device] = _trajectory(client.result(), data, "cross_entropy", steps=2)
    assert outs["cuda"][0] == pytest.approx(outs["cpu"][0], rel=1e-4)
    for got, want in zip(outs["cuda"][1], outs["cpu"][1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_custom_losses_get_host_tensors_and_give_the_cpus_result(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """A loss written for the Tinker service (host tensors, the datum's inputs via ``to_torch()``) runs
    unchanged against the engine on CUDA."""

    def pairwise(
        data: list[types.Datum], logprobs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        assert all(lp.device.type == "cpu" for lp in logprobs)
        chosen, rejected = (
            (d.loss_fn_inputs["weights"].to_torch() * lp).sum() for d, lp in zip(data, logprobs, strict=True)
        )
        return -torch.nn.functional.logsigmoid(0.1 * (chosen - rejected)), {}

    data = [_datum(row, "cross_entropy", 0) for row in _rows(2, 2, 20)]
    results = {}
    for device in ("cpu", "cuda"):
        client = _service(tmp_path, device).create_lora_training_client(str(tiny_model_dir), rank=4, seed=7)
        trained = client.result()
        out = trained.forward_backward_custom(data, pairwise).result()
        trained.optim_step(ADAM).result()
        results[device] = out.metrics["loss:sum"], _adapter(trained, "step")
    assert results["cuda"][0] == pytest.approx(results["cpu"][0], rel=1e-5)
    for name, tensor in results["cuda"][1].items():
        torch.testing.assert_close(tensor, results["cpu"][1][name], atol=1e-5, rtol=1e-4)


def test_state_saved_on_one_device_resumes_on_the_other(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Train on the GPU, resume on the CPU (and back): the next step's loss is the one an unbroken run
    gets, optimizer moments included."""
    data = [_datum(row, "cross_entropy", 0) for row in _rows(3, 3, 20)]
    cpu, cuda = _service(tmp_path, "cpu"), _service(tmp_path, "cuda")
    straight = cpu.create_lora_training_client(str(tiny_model_dir), rank=4, seed=11).result()
    want, _ = _trajectory(straight, data, "cross_entropy", steps=4)

    first = cuda.create_lora_training_client(str(tiny_model_dir), rank=4, seed=11).result()
    got, _ = _trajectory(first, data, "cross_entropy", steps=2)
    on_cpu = cpu.create_training_client_from_state_with_optimizer(first.save_state("half").result().path)
    resumed = on_cpu.result()
    got += _trajectory(resumed, data, "cross_entropy", steps=1)[0]
    back = cuda.create_training_client_from_state_with_optimizer(resumed.save_state("three").result().path)
    got += _trajectory(back.result(), data, "cross_entropy", steps=1)[0]
    assert got == pytest.approx(want, rel=1e-4)


def test_trained_weights_sample_the_cpus_greedy_tokens_and_logprobs(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """One batch of prompts of different lengths through the KV-cache loop on each device."""
    data = [_datum(row, "cross_entropy", 0) for row in _rows(4, 3, 20)]
    trained = (
        _service(tmp_path, "cpu").create_lora_training_client(str(tiny_model_dir), rank=4, seed=2).result()
    )
    _trajectory(trained, data, "cross_entropy", steps=3)
    weights = trained.save_weights_for_sampler("w").result().path
    params = types.SamplingParams(max_tokens=12, temperature=0.0, stop=[])
    prompts = [row[: 5 + 3 * i] for i, row in enumerate(_rows(5, 4, 20))]
    samples = {}
    for device in ("cpu", "cuda"):
        sampler = _service(tmp_path, device).create_sampling_client(model_path=weights).result()
        futures = [sampler.sample(types.ModelInput.from_ints(p), 1, params) for p in prompts]
        samples[device] = [f.result().sequences[0] for f in futures]
    for got, want in zip(samples["cuda"], samples["cpu"], strict=True):
        assert got.tokens == want.tokens
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-4, rtol=0)


def test_bfloat16_is_the_cuda_default_and_tracks_float32(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A bfloat16 base under float32 LoRA weights (as PEFT keeps them): each step's loss within bfloat16's
    rounding of the CPU's float32 trajectory (a bfloat16 run that stopped learning would leave it), and a
    snapshot's samples score as sampled."""
    patterns = ([7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18], [19, 20])
    data = [
        _datum(head + list(p) * 5, "cross_entropy", 0)
        for head, p in zip(_rows(6, 4, 10), patterns, strict=True)
    ]
    # A learning rate low enough for a smooth descent: at a high one the trajectory is chaotic, and any
    # rounding difference grows from step to step.
    adam = types.AdamParams(learning_rate=5e-3)
    reference = _service(tmp_path, "cpu").create_lora_training_client(str(tiny_model_dir), rank=16, seed=1)
    want, _ = _trajectory(reference.result(), data, "cross_entropy", steps=12, adam=adam)
    assert sum(want[-4:]) < 0.95 * sum(want[:4])

    service = LocalServiceClient(root=tmp_path / "auto", device="cuda")
    assert service.runtime.dtype == torch.bfloat16
    client = service.create_lora_training_client(str(tiny_model_dir), rank=16, seed=1).result()
    trainable = [p for _, p in client._params]
    assert trainable and all(p.dtype == torch.float32 and p.device.type == "cuda" for p in trainable)
    frozen = [p for p in client.peft_model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    losses, _ = _trajectory(client, data, "cross_entropy", steps=12, adam=adam)
    assert losses[0] == pytest.approx(want[0], rel=1e-2)
    assert losses == pytest.approx(want, rel=5e-2)
    assert sum(losses[-4:]) < 0.95 * sum(losses[:4])

    sampler = client.save_weights_and_get_sampling_client("bf16").result()
    prompt = data[0].model_input.to_ints()[:12]
    params = types.SamplingParams(max_tokens=10, temperature=0.0, stop=[])
    sequence = sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences[0]
    scored = sampler.compute_logprobs(types.ModelInput.from_ints([*prompt, *sequence.tokens])).result()
    assert sequence.logprobs is not None
    # The cached decode and the full forward round differently in bfloat16; a wrong cache is off by nats.
    assert max(abs(a - b) for a, b in zip(sequence.logprobs, scored[len(prompt) :], strict=True)) < 0.1
