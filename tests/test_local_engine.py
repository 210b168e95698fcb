"""The local engine's training client and checkpoints, on the tiny random Llama."""

from __future__ import annotations

import gc
import json
import weakref
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
    supported = r"'cispo', 'cross_entropy', 'dro', 'gspo'"
    with pytest.raises(ValueError, match=rf"'no_such_loss' is not supported.*{supported}"):
        client.forward_backward(make_batch(tokenizer), "no_such_loss")
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


def test_state_without_optimizer_restores_weights_only(
    service: LocalServiceClient, tiny_model_dir: Path, tokenizer: Any
) -> None:
    data = make_batch(tokenizer)
    trained = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=1).result()
    train(trained, data, steps=3)
    saved = trained.save_state("s").result().path
    fresh = service.create_training_client_from_state(saved).result()
    assert fresh.session_id != trained.session_id
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
        service.create_training_client_from_state("tinker://run/weights/x").result()

    good = path_from_uri(client.save_state("good").result().path)
    with (good / "adapter.safetensors").open("r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    for create in (
        service.create_training_client_from_state,
        service.create_training_client_from_state_with_optimizer,
    ):
        with pytest.raises(CheckpointError, match="corrupt"):
            create(uri_for_path(good)).result()

    sampler = client.save_weights_for_sampler("s").result().path
    with pytest.raises(CheckpointError, match=r"kitchen_sampler\.json"):
        service.create_training_client_from_state(sampler).result()


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


# -- RL losses and custom losses: the local engine's specifics ---------------------------------------------


def rl_datum(tokenizer: Any, text: str, **inputs: list[float]) -> types.Datum:
    ids = tokenizer.encode(text)
    n = len(ids) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={
            "target_tokens": ids[1:],
            "logprobs": [-1.0] * n,
            "advantages": [1.0] * n,
            **inputs,
        },
    )


@pytest.mark.parametrize(
    ("loss", "config", "message"),
    [
        ("ppo", {"clip_low_threshold": 1.3}, r"0 <= clip_low_threshold <= clip_high_threshold, got 1.3, 1.2"),
        ("cispo", {"clip_low_threshold": -0.1}, "clip_low_threshold <= clip_high_threshold"),
        (
            "ppo",
            {"clip_high_threshold": "1.2"},
            r"loss_fn_config\['clip_high_threshold'\] must be a finite number",
        ),
        ("ppo", {"clip_high_threshold": float("inf")}, "must be a finite number"),
        ("dro", None, r"'dro' needs loss_fn_config\['beta'\] \(no default\)"),
        ("dro", {"beta": -1.0}, "beta must be >= 0"),
        ("importance_sampling", {"beta": 0.1}, r"unknown loss_fn_config keys \['beta'\]; accepts none"),
        ("cispo", {"clip": 0.2}, r"accepts \['clip_high_threshold', 'clip_low_threshold'\]"),
    ],
)
def test_bad_rl_loss_config_is_refused_at_submission(
    service: LocalServiceClient,
    tiny_model_dir: Path,
    tokenizer: Any,
    loss: str,
    config: dict[str, Any] | None,
    message: str,
) -> None:
    client = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=0).result()
    with pytest.raises(ValueError, match=message):
        client.forward_backward([rl_datum(tokenizer, TEXTS[0])], loss, config)


def test_bad_rl_inputs_are_refused_naming_the_datum(
    service: LocalServiceClient, tiny_model_dir: Path, tokenizer: Any
) -> None:
    client = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=0).result()
    good = rl_datum(tokenizer, TEXTS[0])
    no_advantages = types.Datum(
        model_input=good.model_input,
        loss_fn_inputs={k: v for k, v in good.loss_fn_inputs.items() if k != "advantages"},
    )
    with pytest.raises(ValueError, match=r"datum 1: .*missing \['advantages'\], unexpected \[\]"):
        client.forward_backward([good, no_advantages], "importance_sampling")
    n = good.model_input.length
    with pytest.raises(ValueError, match=r"datum 0: .*unexpected \['weights'\]"):
        client.forward_backward([rl_datum(tokenizer, TEXTS[0], weights=[1.0] * n)], "ppo")
    with pytest.raises(ValueError, match="datum 0: logprobs contains non-finite values"):
        client.forward_backward(
            [rl_datum(tokenizer, TEXTS[0], logprobs=[float("nan")] * n)], "dro", {"beta": 1}
        )


def grads(client: LocalTrainingClient) -> dict[str, torch.Tensor]:
    """The accumulated LoRA gradients (the engine's internals: the contract exposes no gradients)."""
    return {name: p.grad.clone() for name, p in client._params if p.grad is not None}


def test_custom_cross_entropy_gives_the_builtin_gradients_and_step(
    service: LocalServiceClient, tiny_model_dir: Path, tokenizer: Any
) -> None:
    data = make_batch(tokenizer)
    builtin, custom = (
        service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=5).result() for _ in range(2)
    )
    train(builtin, data, steps=1)  # B != 0, so gradients reach every LoRA matrix
    train(custom, data, steps=1)

    def cross_entropy(
        data: list[types.Datum], logprobs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        terms = [
            -(d.loss_fn_inputs["weights"].to_torch() * lp).sum() for d, lp in zip(data, logprobs, strict=True)
        ]
        return torch.stack(terms).sum(), {}

    expected = builtin.forward_backward(data, "cross_entropy").result()
    got = custom.forward_backward_custom(data, cross_entropy).result()
    assert got.metrics["loss:sum"] == pytest.approx(expected.metrics["loss:sum"], rel=1e-6)
    assert got.metrics["surrogate_loss:sum"] == pytest.approx(expected.metrics["loss:sum"], rel=1e-6)
    want, have = grads(builtin), grads(custom)
    assert want.keys() == have.keys() and len(want) == len(builtin._params)
    for name in want:
        torch.testing.assert_close(have[name], want[name], atol=1e-5, rtol=0)
    builtin.optim_step(adam()).result()
    custom.optim_step(adam()).result()
    for name, tensor in adapter_tensors(builtin).items():
        torch.testing.assert_close(adapter_tensors(custom)[name], tensor, atol=1e-5, rtol=0)


def test_custom_dpo_loss_gives_the_gradients_of_a_direct_pytorch_computation(
    service: LocalServiceClient, tiny_model_dir: Path, tokenizer: Any
) -> None:
    """Two datums coupled through one loss: the engine's gradient is the one autograd computes directly."""
    beta, ref_chosen, ref_rejected = 0.7, -40.0, -35.0
    data = [make_datum(tokenizer, TEXTS[0]), make_datum(tokenizer, TEXTS[1])]

    def dpo(data: list[types.Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = (
            (d.loss_fn_inputs["weights"].to_torch() * lp).sum() for d, lp in zip(data, logprobs, strict=True)
        )
        margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
        return -torch.nn.functional.logsigmoid(margin), {"accuracy:sum": float(margin.detach() > 0)}

    engine, direct = (
        service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=9).result() for _ in range(2)
    )
    train(engine, data, steps=1)
    train(direct, data, steps=1)
    output = engine.forward_backward_custom(data, dpo).result()
    assert set(output.metrics) == {"accuracy:sum", "loss:sum", "surrogate_loss:sum"}

    model = direct._model
    model.zero_grad(set_to_none=True)
    sequence_logprobs = []
    for datum in data:
        logits = model(input_ids=torch.tensor([datum.model_input.to_ints()])).logits[0].float()
        targets = datum.loss_fn_inputs["target_tokens"].to_torch().long()
        token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
        sequence_logprobs.append((datum.loss_fn_inputs["weights"].to_torch() * token_logprobs).sum())
    margin = beta * ((sequence_logprobs[0] - ref_chosen) - (sequence_logprobs[1] - ref_rejected))
    loss = -torch.nn.functional.logsigmoid(margin)
    loss.backward()
    assert output.metrics["loss:sum"] == pytest.approx(float(loss.detach()), rel=1e-5)
    want, have = grads(direct), grads(engine)
    assert want.keys() == have.keys() and want
    for name in want:
        torch.testing.assert_close(have[name], want[name], atol=1e-5, rtol=1e-4)


def test_bad_custom_losses_fail_with_one_clear_error(
    service: LocalServiceClient, tiny_model_dir: Path, tokenizer: Any
) -> None:
    client = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=0).result()
    data = make_batch(tokenizer)
    no_targets = types.Datum(model_input=data[0].model_input, loss_fn_inputs={"weights": [1.0]})
    with pytest.raises(
        ValueError, match=r"datum 1: forward_backward_custom needs loss_fn_inputs\['target_tokens'\]"
    ):
        client.forward_backward_custom([data[0], no_targets], lambda d, lp: (lp[0].sum(), {}))
    with pytest.raises(TypeError, match="must be callable"):
        client.forward_backward_custom(data, "cross_entropy")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"scalar tensor computed from the logprobs, got Tensor of shape \[2\]"
    ):
        client.forward_backward_custom(
            data, lambda d, lp: (torch.stack([lp[0].sum(), lp[1].sum()]), {})
        ).result()
    with pytest.raises(ValueError, match="the loss gave datum 2's logprobs no gradient"):
        client.forward_backward_custom(data, lambda d, lp: (lp[0].sum() + lp[1].sum(), {})).result()
    with pytest.raises(ValueError, match="datum 0's logprobs a non-finite gradient"):
        client.forward_backward_custom(
            data, lambda d, lp: (sum(x.sum() for x in lp) * float("inf"), {})
        ).result()
    # Nothing was accumulated by the failed calls.
    assert client.optim_step(adam()).result().metrics == {"grad_norm": 0.0}


# -- snapshots and adapter samplers: one shared base model ---------------------------------------------------


def test_snapshots_and_adapter_samplers_share_the_base_and_hold_only_the_adapter(
    service: LocalServiceClient, tiny_model_dir: Path, tokenizer: Any
) -> None:
    from resources.local_engine.runtime import shared_base_model

    client = service.create_lora_training_client(str(tiny_model_dir), rank=8, seed=0).result()
    data = make_batch(tokenizer)
    train(client, data, steps=3, lr=5e-2)
    snapshot = client.save_weights_and_get_sampling_client("after-3").result()
    saved = client.create_sampling_client(client.save_weights_for_sampler("after-3").result().path).result()
    base = shared_base_model(tiny_model_dir.resolve(), service.runtime.device, service.runtime.dtype)
    lora_bytes = sum(p.numel() * p.element_size() for _, p in client._params)
    for sampler in (snapshot, saved):
        assert sampler._model is base
        assert sampler._overlay is not None and sampler._overlay.nbytes == lora_bytes
    assert snapshot.label.endswith("/snapshot/after-3")

    forward = client.forward(data, "cross_entropy").result()
    for datum, record in zip(data, forward.loss_fn_outputs, strict=True):
        tokens = [*datum.model_input.to_ints(), int(datum.loss_fn_inputs["target_tokens"].tolist()[-1])]
        prompt = types.ModelInput.from_ints(tokens)
        from_snapshot = snapshot.compute_logprobs(prompt).result()
        # The same weights in the same kernels: the saved adapter and the snapshot agree exactly.
        assert saved.compute_logprobs(prompt).result() == from_snapshot
        torch.testing.assert_close(
            torch.tensor(from_snapshot[1:]), record["logprobs"].to_torch(), atol=1e-5, rtol=0
        )
    with pytest.raises(ValueError, match="plain directory name"):
        client.save_weights_and_get_sampling_client("../x")

    # An RL loop takes a snapshot per step: one it drops frees its adapter copy.
    copied = weakref.ref(next(iter(snapshot._overlay.layers.values())).a)
    del snapshot
    gc.collect()
    assert copied() is None


def test_training_runs_on_the_shared_base_weights_and_never_changes_them(
    service: LocalServiceClient, tiny_model_dir: Path, tokenizer: Any
) -> None:
    """One copy of the base weights per process: a training client's frozen weights are the samplers'
    tensors (same storage), its own modules are separate (train mode, LoRA layers), and training with
    a base sampler open leaves the base's outputs exactly as they were."""
    from resources.local_engine.runtime import shared_base_model

    base_sampler = service.create_sampling_client(base_model=str(tiny_model_dir)).result()
    prompt = types.ModelInput.from_ints(tokenizer.encode(TEXTS[0]))
    before = base_sampler.compute_logprobs(prompt).result()
    base = shared_base_model(tiny_model_dir.resolve(), service.runtime.device, service.runtime.dtype)
    base_storage = {name: p.data_ptr() for name, p in base.named_parameters()}
    snapshot = {name: p.detach().clone() for name, p in base.named_parameters()}

    create = service.create_lora_training_client
    clients = [create(str(tiny_model_dir), rank=8, seed=seed).result() for seed in (0, 1)]
    for client in clients:
        frozen = {
            name.removeprefix("base_model.model.").replace(".base_layer", ""): p
            for name, p in client.peft_model.named_parameters()
            if not p.requires_grad
        }
        assert frozen and set(frozen) <= set(base_storage)
        assert all(p.data_ptr() == base_storage[name] for name, p in frozen.items())
        assert client.peft_model.training and not base.training
        train(client, make_batch(tokenizer), steps=3, lr=5e-2)

    for name, p in base.named_parameters():
        assert torch.equal(p, snapshot[name]), name
    assert base_sampler.compute_logprobs(prompt).result() == before
    trained = clients[0].save_weights_and_get_sampling_client().result()
    assert trained.compute_logprobs(prompt).result() != before


def test_samplers_on_different_weights_run_side_by_side(
    service: LocalServiceClient, tiny_model_dir: Path, tokenizer: Any
) -> None:
    """The overlay is per thread: a base sampler and a snapshot sampler working at once on the one shared
    model each get their own weights."""
    client = service.create_lora_training_client(str(tiny_model_dir), rank=8, seed=0).result()
    train(client, make_batch(tokenizer), steps=3, lr=5e-2)
    samplers = [
        service.create_sampling_client(base_model=str(tiny_model_dir)).result(),
        client.save_weights_and_get_sampling_client().result(),
    ]
    params = types.SamplingParams(max_tokens=12, temperature=1.0, seed=2, stop=[])
    prompts = [types.ModelInput.from_ints(tokenizer.encode(text)) for text in TEXTS]
    alone = [[s.sample(p, 2, params).result() for p in prompts] for s in samplers]
    together = [[s.sample(p, 2, params) for p in prompts] for s in samplers]  # both workers busy at once
    for want, have in zip(alone, together, strict=True):
        for response, future in zip(want, have, strict=True):
            assert [q.tokens for q in future.result().sequences] == [q.tokens for q in response.sequences]
    assert [q.tokens for q in alone[0][0].sequences] != [q.tokens for q in alone[1][0].sequences]


def test_adapters_the_overlay_cannot_reproduce_are_refused(
    service: LocalServiceClient, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import shutil

    from resources.local_engine.overlay import load_adapter

    client = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=0).result()
    saved = path_from_uri(client.save_weights_for_sampler("s").result().path)
    assert len(load_adapter(saved, torch.device("cpu")).layers) == len(client._params) // 2
    dora = tmp_path / "dora"
    shutil.copytree(saved, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match=r"settings \['use_dora'\] are not supported for sampling"):
        load_adapter(dora, torch.device("cpu"))


def test_overlay_mirrors_peft_under_a_bfloat16_base(
    tiny_model_dir: Path, tmp_path: Path, tokenizer: Any
) -> None:
    """PEFT keeps adapters in float32 over a bfloat16 base (CUDA's default); the overlay computes the same."""
    service = LocalServiceClient(root=tmp_path, dtype="bfloat16")
    client = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=0).result()
    data = make_batch(tokenizer)
    train(client, data, steps=3, lr=5e-2)
    snapshot = client.save_weights_and_get_sampling_client().result()
    saved = client.create_sampling_client(client.save_weights_for_sampler("bf16").result().path).result()
    base = service.create_sampling_client(base_model=str(tiny_model_dir)).result()
    for sampler in (snapshot, saved):
        assert sampler._overlay is not None
        assert {layer.a.dtype for layer in sampler._overlay.layers.values()} == {torch.float32}
    forward = client.forward(data, "cross_entropy").result()
    for datum, record in zip(data, forward.loss_fn_outputs, strict=True):
        tokens = [*datum.model_input.to_ints(), int(datum.loss_fn_inputs["target_tokens"].tolist()[-1])]
        trained = record["logprobs"].to_torch()
        scores = [
            torch.tensor(s.compute_logprobs(types.ModelInput.from_ints(tokens)).result()[1:])
            for s in (snapshot, saved, base)
        ]
        # bfloat16 rounding differs between batch shapes; the untrained base is 10x further off.
        assert float((scores[0] - trained).abs().mean()) <= 1e-2
        assert float((scores[1] - trained).abs().mean()) <= 1e-2
        assert float((scores[2] - trained).abs().mean()) > 5e-2


def test_the_dagster_resource_passes_its_engine_settings_through(tmp_path: Path) -> None:
    """A GPU user sets precision and the micro-batch budget on the resource, as in Dagster config."""
    from resources.training import LocalBackend

    runtime = (
        LocalBackend(device="cpu", dtype="bfloat16", max_batch_tokens=1024, root=str(tmp_path))
        .service_client()
        .runtime
    )
    assert (runtime.dtype, runtime.max_batch_tokens, runtime.device.type) == (torch.bfloat16, 1024, "cpu")
    assert LocalBackend(root=str(tmp_path)).service_client().runtime.max_batch_tokens == 8192
    with pytest.raises(ValueError, match="max_batch_tokens must be >= 1"):
        LocalBackend(max_batch_tokens=0, root=str(tmp_path)).service_client()
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        LocalBackend(dtype="fp8", root=str(tmp_path)).service_client()
