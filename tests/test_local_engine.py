"""The local engine's training client and checkpoints, on the tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tinker import types

from kitchen.contract import SamplingClient, ServiceClient, TrainingClient
from resources.local_engine import LocalServiceClient, LocalTrainingClient, path_from_uri, uri_for_path
from resources.local_engine import checkpoints as checkpoints_module
from resources.local_engine.checkpoints import CheckpointError

TEXTS = [
    "what is the sum of 7 + 11 = 18",
    "hello world the cat sat on mat",
    "you are a helpful assistant please give only result",
]


@pytest.fixture
def service() -> LocalServiceClient:
    return LocalServiceClient()


@pytest.fixture
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def make_datum(tokenizer: Any, text: str, weights: list[float] | None = None) -> types.Datum:
    ids = tokenizer.encode(text)
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=ids[1:], dtype="int64"),
            "weights": types.TensorData(
                data=weights if weights is not None else [1.0] * (len(ids) - 1), dtype="float32"
            ),
        },
    )


def make_batch(tokenizer: Any) -> list[types.Datum]:
    return [make_datum(tokenizer, text) for text in TEXTS]


def adam(lr: float = 2e-2, **kwargs: float) -> types.AdamParams:
    return types.AdamParams(learning_rate=lr, **kwargs)


def train(client: TrainingClient, data: list[types.Datum], steps: int, lr: float = 2e-2) -> list[float]:
    """All steps are submitted before any result is awaited, as the pipelined training loop does."""
    futures = [
        (client.forward_backward(data, "cross_entropy"), client.optim_step(adam(lr))) for _ in range(steps)
    ]
    losses = []
    for fb, opt in futures:
        losses.append(fb.result().metrics["loss:sum"])
        assert opt.result().metrics is not None
    return losses


def adapter_tensors(client: TrainingClient, name: str = "probe") -> dict[str, torch.Tensor]:
    path = path_from_uri(client.save_state(name).result().path)
    return load_file(str(path / "adapter.safetensors"))


def assert_tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- contract and construction -------------------------------------------------------------------


def test_clients_satisfy_the_contract(service: LocalServiceClient, tiny_model_dir: Path) -> None:
    assert isinstance(service, ServiceClient)
    client = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=0).result()
    assert isinstance(client, TrainingClient)
    sampler = service.create_sampling_client(base_model=str(tiny_model_dir)).result()
    assert isinstance(sampler, SamplingClient)
    assert client.get_tokenizer().eos_token == "<|im_end|>"
    assert sampler.get_tokenizer() is client.get_tokenizer()


def test_root_defaults_to_kitchen_home(service: LocalServiceClient, kitchen_home: Path) -> None:
    assert service.root == kitchen_home.resolve() / "engine"


def test_bad_base_model_or_rank_is_refused(
    service: LocalServiceClient, tmp_path: Path, tiny_model_dir: Path
) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        service.create_lora_training_client(str(tmp_path / "nowhere")).result()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        service.create_lora_training_client(str(tmp_path / "empty")).result()
    with pytest.raises(ValueError, match="rank"):
        service.create_lora_training_client(str(tiny_model_dir), rank=0).result()


# -- forward / forward_backward / optim_step -----------------------------------------------------


def test_loss_falls_on_a_fixed_batch(
    service: LocalServiceClient, tiny_model_dir: Path, tokenizer: Any
) -> None:
    client = service.create_lora_training_client(str(tiny_model_dir), rank=8, seed=0).result()
    losses = train(client, make_batch(tokenizer), steps=20)
    # The tiny random model's frozen final norm and tied embeddings cap how far LoRA can move the logits,
    # so the fall is modest, but it is steady.
    assert losses[-1] < 0.95 * losses[0]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_reported_loss_is_weighted_nll_of_returned_logprobs(
    service: LocalServiceClient, tiny_model_dir: Path, tokenizer: Any
) -> None:
    client = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=0).result()
    data = [make_datum(tokenizer, text) for text in TEXTS[:2]]
    n = len(tokenizer.encode(TEXTS[2])) - 1
    data.append(make_datum(tokenizer, TEXTS[2], [0.0] * 3 + [0.25 * (i % 4) for i in range(n - 3)]))
    out = client.forward_backward(data, "cross_entropy").result()
    assert out.loss_fn_output_type == "ArrayRecord"
    assert len(out.loss_fn_outputs) == len(data)
    expected = 0.0
    for datum, record in zip(data, out.loss_fn_outputs, strict=True):
        logprobs = record["logprobs"].to_torch()
        assert record["logprobs"].dtype == "float32"
        assert logprobs.shape == (datum.model_input.length,)  # unpadded
        assert bool((logprobs <= 0).all())
        expected += float(-(datum.loss_fn_inputs["weights"].to_torch() * logprobs).sum())
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)


def test_forward_matches_forward_backward_and_leaves_no_gradient(
    service: LocalServiceClient, tiny_model_dir: Path, tokenizer: Any
) -> None:
    client = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=0).result()
    data = make_batch(tokenizer)
    fwd = client.forward(data, "cross_entropy")
    step_after_forward = client.optim_step(adam())
    fwd_bwd = client.forward_backward(data, "cross_entropy")
    assert step_after_forward.result().metrics == {"grad_norm": 0.0}
    assert fwd.result().metrics == fwd_bwd.result().metrics
    for a, b in zip(fwd.result().loss_fn_outputs, fwd_bwd.result().loss_fn_outputs, strict=True):
        assert torch.equal(a["logprobs"].to_torch(), b["logprobs"].to_torch())
    assert client.optim_step(adam()).result().metrics["grad_norm"] > 0  # type: ignore[index]


def test_zero_weights_give_zero_loss_and_zero_gradient(
    service: LocalServiceClient, tiny_model_dir: Path, tokenizer: Any
) -> None:
    client = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=0).result()
    data = [make_datum(tokenizer, text, [0.0] * (len(tokenizer.encode(text)) - 1)) for text in TEXTS]
    before = adapter_tensors(client, "before")
    out = client.forward_backward(data, "cross_entropy").result()
    assert out.metrics["loss:sum"] == 0.0
    assert client.optim_step(adam()).result().metrics == {"grad_norm": 0.0}
    assert_tensors_equal(before, adapter_tensors(client, "after"))


def test_micro_batches_give_the_same_loss_and_gradient(tiny_model_dir: Path, tokenizer: Any) -> None:
    data = make_batch(tokenizer)
    results = []
    for budget in (8192, 12):  # 12 tokens: every datum in a micro-batch of its own
        client = (
            LocalServiceClient(max_batch_tokens=budget)
            .create_lora_training_client(str(tiny_model_dir), rank=4, seed=0)
            .result()
        )
        loss = client.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
        norm = client.optim_step(adam()).result().metrics["grad_norm"]  # type: ignore[index]
        results.append((loss, norm))
    assert results[1] == pytest.approx(results[0], rel=1e-5)


def test_unknown_loss_fn_or_config_is_refused(
    service: LocalServiceClient, tiny_model_dir: Path, tokenizer: Any
) -> None:
    client = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=0).result()
    with pytest.raises(ValueError, match=r"importance_sampling.*cross_entropy"):
        client.forward_backward(make_batch(tokenizer), "importance_sampling")
    with pytest.raises(ValueError, match="clip"):
        client.forward_backward(make_batch(tokenizer), "cross_entropy", {"clip": 0.2})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: {**d, "weights": d["weights"].tolist()[:-1]}, "datum 1: weights has shape"),
        (lambda d: {"target_tokens": d["target_tokens"]}, r"datum 1: .*missing \['weights'\]"),
        (
            lambda d: {**d, "target_tokens": [10_000] * len(d["target_tokens"].tolist())},
            "datum 1: target_tokens",
        ),
    ],
    ids=["short-weights", "no-weights", "target-out-of-vocab"],
)
def test_bad_datum_is_refused_naming_its_index(
    service: LocalServiceClient, tiny_model_dir: Path, tokenizer: Any, edit: Any, message: str
) -> None:
    client = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=0).result()
    data = make_batch(tokenizer)
    data[1] = types.Datum(model_input=data[1].model_input, loss_fn_inputs=edit(data[1].loss_fn_inputs))
    with pytest.raises(ValueError, match=message):
        client.forward_backward(data, "cross_entropy")
    with pytest.raises(ValueError, match="no data"):
        client.forward([], "cross_entropy")


def test_optim_step_params_and_clipping(
    service: LocalServiceClient, tiny_model_dir: Path, tokenizer: Any
) -> None:
    data = make_batch(tokenizer)
    a = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=3).result()
    b = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=3).result()
    a.forward_backward(data, "cross_entropy")
    b.forward_backward(data, "cross_entropy")
    norm_a = a.optim_step(adam()).result().metrics["grad_norm"]  # type: ignore[index]
    norm_b = b.optim_step(adam_params=adam(grad_clip_norm=1e-3)).result().metrics["grad_norm"]  # type: ignore[index]
    assert norm_a == norm_b > 1e-3  # reported before clipping
    # Adam normalises the step size, so compare the second steps, where clipping shows in the moments.
    for client in (a, b):
        client.forward_backward(data, "cross_entropy")
        client.optim_step(adam())
    assert any(
        not torch.equal(x, y)
        for x, y in zip(adapter_tensors(a).values(), adapter_tensors(b).values(), strict=True)
    )
    with pytest.raises(ValueError, match="not both"):
        a.optim_step(adam(), adam_params=adam())
    with pytest.raises(ValueError, match="learning_rate"):
        a.optim_step(adam(lr=-1.0))


def test_same_seed_same_init_and_trajectory(
    service: LocalServiceClient, tiny_model_dir: Path, tokenizer: Any
) -> None:
    data = make_batch(tokenizer)
    a, b, c = (
        service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=s).result() for s in (7, 7, 8)
    )
    assert_tensors_equal(adapter_tensors(a), adapter_tensors(b))
    assert any(
        not torch.equal(x, y)
        for x, y in zip(adapter_tensors(a).values(), adapter_tensors(c).values(), strict=True)
    )
    pipelined = train(a, data, steps=3)
    awaited = []
    for _ in range(3):  # one call at a time: the order of execution, not of awaiting, decides the result
        awaited.append(b.forward_backward(data, "cross_entropy").result().metrics["loss:sum"])
        b.optim_step(adam()).result()
    assert pipelined == awaited
    assert_tensors_equal(adapter_tensors(a), adapter_tensors(b))


# -- checkpoints -----------------------------------------------------------------------------------


def test_resume_from_state_is_bit_for_bit(
    service: LocalServiceClient, tiny_model_dir: Path, tokenizer: Any
) -> None:
    data = make_batch(tokenizer)
    straight = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=11).result()
    straight_losses = train(straight, data, steps=4)

    first = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=11).result()
    losses = train(first, data, steps=2)
    saved = first.save_state("half").result().path
    resumed = service.create_training_client_from_state_with_optimizer(saved).result()
    assert isinstance(resumed, LocalTrainingClient)
    assert resumed.session_id != first.session_id
    losses += train(resumed, data, steps=2)

    assert losses == straight_losses
    assert_tensors_equal(adapter_tensors(resumed), adapter_tensors(straight))
    manifest = json.loads(
        (path_from_uri(resumed.save_state("end").result().path) / "kitchen_state.json").read_text()
    )
    assert manifest["step"] == 4


def test_load_state_restores_weights_but_not_optimizer(
    service: LocalServiceClient, tiny_model_dir: Path, tokenizer: Any
) -> None:
    data = make_batch(tokenizer)
    trained = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=1).result()
    train(trained, data, steps=3)
    saved = trained.save_state("s").result().path
    fresh = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=2).result()
    response = fresh.load_state(saved).result()
    assert response.path == saved
    assert_tensors_equal(adapter_tensors(fresh), adapter_tensors(trained))
    # Same weights, but fresh Adam moments: the next step moves differently than a true resume.
    resumed = service.create_training_client_from_state_with_optimizer(saved).result()
    train(fresh, data, steps=1)
    train(resumed, data, steps=1)
    assert any(
        not torch.equal(x, y)
        for x, y in zip(adapter_tensors(fresh).values(), adapter_tensors(resumed).values(), strict=True)
    )


def test_checkpoint_layout_and_atomic_overwrite(
    service: LocalServiceClient, tiny_model_dir: Path, tokenizer: Any
) -> None:
    client = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=0).result()
    uri = client.save_state("ckpt").result().path
    directory = path_from_uri(uri)
    assert uri.startswith("file:///") and uri == uri_for_path(directory)
    assert directory == service.root / client.session_id / "state" / "ckpt"
    assert sorted(p.name for p in directory.iterdir()) == [
        "adapter.safetensors",
        "kitchen_state.json",
        "optimizer.pt",
        "rng.pt",
    ]
    manifest = json.loads((directory / "kitchen_state.json").read_text())
    assert manifest["base_model"] == str(tiny_model_dir.resolve())
    assert (manifest["rank"], manifest["seed"], manifest["step"]) == (4, 0, 0)
    assert manifest["content_hash"] == manifest["files"]["adapter.safetensors"]

    train(client, make_batch(tokenizer), steps=1)
    assert client.save_state("ckpt").result().path == uri
    assert json.loads((directory / "kitchen_state.json").read_text())["step"] == 1
    assert [p.name for p in directory.parent.iterdir()] == ["ckpt"]  # no staging or retired leftovers

    sampler_uri = client.save_weights_for_sampler("final").result().path
    sampler_dir = path_from_uri(sampler_uri)
    assert sampler_dir == service.root / client.session_id / "sampler" / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "kitchen_sampler.json"} <= {
        p.name for p in sampler_dir.iterdir()
    }
    sampler_manifest = json.loads((sampler_dir / "kitchen_sampler.json").read_text())
    assert sampler_manifest["base_model"] == str(tiny_model_dir.resolve())
    assert sampler_manifest["step"] == 1
    with pytest.raises(ValueError, match="plain directory name"):
        client.save_state("../escape")


def test_failed_save_leaves_no_directory(
    service: LocalServiceClient, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=0).result()
    kept = path_from_uri(client.save_state("kept").result().path)
    kept_manifest = (kept / "kitchen_state.json").read_text()

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints_module, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        client.save_state("new").result()
    with pytest.raises(OSError, match="disk full"):
        client.save_state("kept").result()  # a failed overwrite keeps the old checkpoint
    state_dir = service.root / client.session_id / "state"
    assert [p.name for p in state_dir.iterdir()] == ["kept"]
    assert (kept / "kitchen_state.json").read_text() == kept_manifest


def test_missing_or_corrupt_checkpoint_is_refused(service: LocalServiceClient, tiny_model_dir: Path) -> None:
    client = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=0).result()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        service.create_training_client_from_state_with_optimizer(uri_for_path(service.root / "nope")).result()
    with pytest.raises(ValueError, match="file:// URIs"):
        client.load_state("tinker://run/weights/x")

    good = path_from_uri(client.save_state("good").result().path)
    with (good / "adapter.safetensors").open("r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="corrupt"):
        client.load_state_with_optimizer(uri_for_path(good)).result()
    with pytest.raises(CheckpointError, match="corrupt"):
        service.create_training_client_from_state_with_optimizer(uri_for_path(good)).result()

    sampler = client.save_weights_for_sampler("s").result().path
    with pytest.raises(CheckpointError, match=r"kitchen_sampler\.json"):
        client.load_state(sampler).result()
    other = service.create_lora_training_client(str(tiny_model_dir), rank=8, seed=0).result()
    with pytest.raises(CheckpointError, match="rank-4"):
        other.load_state(client.save_state("r4").result().path).result()


# -- sampler checkpoints and scoring ----------------------------------------------------------------


def test_trained_sampler_differs_from_base_and_agrees_with_forward(
    service: LocalServiceClient, tiny_model_dir: Path, tokenizer: Any
) -> None:
    data = make_batch(tokenizer)
    client = service.create_lora_training_client(str(tiny_model_dir), rank=8, seed=0).result()
    train(client, data, steps=8, lr=5e-2)
    sampler = client.create_sampling_client(client.save_weights_for_sampler("trained").result().path).result()
    base = service.create_sampling_client(base_model=str(tiny_model_dir)).result()

    forward = client.forward(data, "cross_entropy").result()
    for datum, record in zip(data, forward.loss_fn_outputs, strict=True):
        tokens = [*datum.model_input.to_ints(), int(datum.loss_fn_inputs["target_tokens"].tolist()[-1])]
        prompt = types.ModelInput.from_ints(tokens)
        trained_lp, base_lp = sampler.compute_logprobs(prompt), base.compute_logprobs(prompt)
        assert trained_lp.result()[0] is None
        trained = torch.tensor(trained_lp.result()[1:])
        torch.testing.assert_close(trained, record["logprobs"].to_torch(), atol=1e-4, rtol=1e-4)
        assert float(trained.sum()) > float(torch.tensor(base_lp.result()[1:]).sum()) + 1.0

    prompt = types.ModelInput.from_ints(tokenizer.encode("what is the sum of"))
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=0, stop=[])
    trained_seq = sampler.sample(prompt, 1, params).result().sequences[0]
    base_seq = base.sample(prompt, 1, params).result().sequences[0]
    assert (trained_seq.tokens, trained_seq.logprobs) != (base_seq.tokens, base_seq.logprobs)


def test_base_compute_logprobs_matches_untrained_forward(
    service: LocalServiceClient, tiny_model_dir: Path, tokenizer: Any
) -> None:
    """A fresh adapter's B is zero, so training's forward is exactly the base model's."""
    data = make_batch(tokenizer)
    client = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=0).result()
    base = service.create_sampling_client(base_model=str(tiny_model_dir)).result()
    forward = client.forward(data, "cross_entropy").result()
    futures = [
        base.compute_logprobs(
            types.ModelInput.from_ints(
                [*d.model_input.to_ints(), int(d.loss_fn_inputs["target_tokens"].tolist()[-1])]
            )
        )
        for d in data
    ]
    for future, record in zip(futures, forward.loss_fn_outputs, strict=True):
        torch.testing.assert_close(
            torch.tensor(future.result()[1:]), record["logprobs"].to_torch(), atol=1e-5, rtol=0
        )


def test_sampling_client_from_service_checks_its_arguments(
    service: LocalServiceClient, tiny_model_dir: Path
) -> None:
    with pytest.raises(ValueError, match="model_path or base_model"):
        service.create_sampling_client().result()
    client = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=0).result()
    with pytest.raises(CheckpointError, match=r"kitchen_state\.json"):
        service.create_sampling_client(model_path=client.save_state("state").result().path).result()
    sampler_path = client.save_weights_for_sampler("s").result().path
    assert isinstance(
        service.create_sampling_client(model_path=sampler_path, base_model=str(tiny_model_dir)).result(),
        SamplingClient,
    )
