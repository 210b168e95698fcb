"""The local engine's speed paths compute what the plain computation does: the fused LoRA layer, logits
back-propagated only where the loss has a gradient, and one prefill shared by samples of one prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tinker import types

from resources.local_engine import LocalServiceClient


def _client(tmp_path: Path, tiny_model_dir: Path) -> Any:
    return (
        LocalServiceClient(root=tmp_path)
        .create_lora_training_client(str(tiny_model_dir), rank=4, seed=0)
        .result()
    )


def _randomise_lora_b(model: Any) -> None:
    """PEFT starts B at zero, which would hide a wrong up-projection."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def test_fused_lora_layer_matches_peft_forward_and_gradients(tmp_path: Path, tiny_model_dir: Path) -> None:
    from peft.tuners.lora import Linear as LoraLinear

    model = _client(tmp_path, tiny_model_dir).peft_model
    _randomise_lora_b(model)
    layers = [m for m in model.modules() if type(m) is LoraLinear]
    assert layers and all("forward" in vars(m) for m in layers)
    for layer in layers:
        x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        fused = layer(x)
        peft = LoraLinear.forward(layer, x)  # PEFT's own code: the expectation
        assert torch.equal(fused, peft)
        grad = torch.randn(fused.shape, generator=torch.Generator().manual_seed(3))
        for got, want in zip(
            torch.autograd.grad(fused, params, grad), torch.autograd.grad(peft, params, grad), strict=True
        ):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_sparse_weights_give_the_full_logits_gradient(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Most tokens unweighted (SFT's prompt): the engine projects them onto the vocabulary without a graph;
    its loss, logprobs and gradients equal the whole model's logits differentiated by hand."""
    client = _client(tmp_path, tiny_model_dir)
    model = client.peft_model
    _randomise_lora_b(model)
    rows = [[5, 9, 13, 2, 7, 11, 3], [4, 8, 1, 6]]
    weights = [[0, 0, 0, 0, 1.0, 0.5], [0, 0, 2.0]]
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(row[:-1]),
            loss_fn_inputs={"target_tokens": row[1:], "weights": w},
        )
        for row, w in zip(rows, weights, strict=True)
    ]
    out = client.forward_backward(data, "cross_entropy").result()
    params = [p for _, p in client._params]
    got = [p.grad.clone() for p in params]

    model.zero_grad(set_to_none=True)
    total = torch.zeros(())
    expected_logprobs = []
    for row, w in zip(rows, weights, strict=True):
        logits = model(input_ids=torch.tensor([row[:-1]])).logits[0]
        lp = torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(row[1:])[:, None])[:, 0]
        expected_logprobs.append(lp.detach())
        total = total - (torch.tensor(w) * lp).sum()
    total.backward()
    torch.testing.assert_close(torch.tensor(out.metrics["loss:sum"]), total.detach(), atol=1e-5, rtol=1e-5)
    for output, want in zip(out.loss_fn_outputs, expected_logprobs, strict=True):
        torch.testing.assert_close(output["logprobs"].to_torch(), want, atol=1e-5, rtol=1e-5)
    for g, p in zip(got, params, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)


def test_samples_of_one_prompt_share_a_prefill_and_keep_their_own_tokens(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Two prompts, three seeded samples each (a request's samples are one batch): every sample's logprobs
    equal the model's scoring of its prompt + tokens (a wrong shared cache would not), and samples of one
    prompt differ."""
    sampler = (
        LocalServiceClient(root=tmp_path).create_sampling_client(base_model=str(tiny_model_dir)).result()
    )
    tokenizer = sampler.get_tokenizer()
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=7, stop=[])
    prompts = [tokenizer.encode(text) for text in ("the cat sat on", "1 + 2 =")]
    futures = [sampler.sample(types.ModelInput.from_ints(p), 3, params) for p in prompts]
    responses = [f.result() for f in futures]
    assert sum(sampler.batch_sizes) == 6 and min(sampler.batch_sizes) >= 3
    for prompt, response in zip(prompts, responses, strict=True):
        assert len({tuple(s.tokens) for s in response.sequences}) > 1
        for seq in response.sequences:
            scored = sampler.compute_logprobs(types.ModelInput.from_ints([*prompt, *seq.tokens])).result()
            torch.testing.assert_close(
                torch.tensor(seq.logprobs), torch.tensor(scored[len(prompt) :]), atol=1e-5, rtol=0
            )
