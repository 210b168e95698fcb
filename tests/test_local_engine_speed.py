"""The local engine's speed paths compute what the plain computation does: the fused LoRA layer, logits
back-propagated only where the loss has a gradient, and one prefill shared by samples of one prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
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


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))],
)
@pytest.mark.parametrize("reserve", [None, 1], ids=["default-reserve", "cache-grows-every-step"])
def test_greedy_batch_gives_transformers_generate_tokens(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, reserve: int | None, device: str
) -> None:
    """One left-padded batch of prompts of different lengths whose rows stop at different steps (so
    finished rows leave the batch and its cache mid-generation): every row's greedy tokens are
    ``transformers.generate``'s for that prompt, cut at the row's ``max_tokens``, on each device. With a
    reserve of one position the reserved cache also grows at every step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from resources.local_engine import kv_cache
    from resources.local_engine.generation import RowParams, generate, stop_rule

    if reserve is not None:
        monkeypatch.setattr(kv_cache, "RESERVE_BLOCK", reserve)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).to(device).eval()
    texts = ["what is", "hello world the cat sat on mat", "1 + 2 =", "the", "you are a helpful assistant"]
    prompts = [tokenizer.encode(text) for text in texts]
    limits = [2, 9, 5, 12, 1]
    eos = frozenset({tokenizer.eos_token_id})
    rows = [
        RowParams(
            prompt=p, max_tokens=m, temperature=0.0, top_k=-1, top_p=1.0, stop=stop_rule(None, eos), seed=0
        )
        for p, m in zip(prompts, limits, strict=True)
    ]
    got = generate(model, tokenizer, rows, torch.device(device), tokenizer.pad_token_id)

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=max(limits),
            eos_token_id=sorted(eos),
            pad_token_id=tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1).cpu()
    for i, (limit, result) in enumerate(zip(limits, got, strict=True)):
        expected = out.sequences[i, width:].tolist()[:limit]
        if tokenizer.eos_token_id in expected:
            expected = expected[: expected.index(tokenizer.eos_token_id) + 1]
        assert result.tokens == expected
        assert result.stop_reason == ("stop" if expected[-1] == tokenizer.eos_token_id else "length")
        # The logprobs depend on every cached position even where a random model's argmax does not.
        want = logprobs[i, torch.arange(len(expected)), torch.tensor(expected)]
        torch.testing.assert_close(torch.tensor(result.logprobs), want, atol=1e-5, rtol=0)


def test_chosen_tokens_and_their_logprobs_per_row() -> None:
    """Greedy rows take the first maximum, sampled rows draw with their own generator exactly as one row
    alone would, and each logprob is the chosen token's entry of the full ``log_softmax``, bit for bit."""
    from resources.local_engine.generation import RowParams, StopRule, choose_tokens, sample_token

    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(3)) * 3
    logits[0, 7] = logits[0, 21] = 50.0  # a tie: the first one wins
    stop = StopRule(frozenset(), ())
    settings = [(0.0, -1, 1.0), (1.0, -1, 1.0), (0.0, -1, 1.0), (0.7, 5, 1.0), (1.3, -1, 0.6)]
    rows = [
        RowParams(prompt=[1], max_tokens=1, temperature=t, top_k=k, top_p=p, stop=stop, seed=i)
        for i, (t, k, p) in enumerate(settings)
    ]
    tokens, logprobs = choose_tokens(logits, rows, [torch.Generator().manual_seed(i) for i in range(5)])

    assert tokens[0] == 7 and tokens[2] == max(range(40), key=lambda v: (logits[2, v].item(), -v))
    for i in (1, 3, 4):
        assert tokens[i] == sample_token(logits[i], rows[i], torch.Generator().manual_seed(i))
    full = torch.log_softmax(logits, dim=-1)
    assert logprobs == [float(full[i, token]) for i, token in enumerate(tokens)]


def _by_hand(
    model: Any, inputs: list[list[int]], targets: list[list[int]], weights: list[list[float]]
) -> Any:
    """The loss, logprobs and LoRA gradients of each sequence run alone through the whole model."""
    model.zero_grad(set_to_none=True)
    total = torch.zeros(())
    logprobs = []
    for tokens, target, w in zip(inputs, targets, weights, strict=True):
        logits = model(input_ids=torch.tensor([tokens])).logits[0]
        lp = torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(target)[:, None])[:, 0]
        logprobs.append(lp.detach())
        total = total - (torch.tensor(w) * lp).sum()
    total.backward()
    return total.detach(), logprobs


def test_a_shared_prefix_is_decoded_once_with_the_same_loss_logprobs_and_gradients(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: Any
) -> None:
    """Rows that share their first tokens (a system turn, a DPO pair's prompt) run the prefix once; the
    result is each row run alone, whether the targets agree inside the prefix or not, and whether a row
    weights a prefix position (one row does here) or not."""
    from resources.local_engine import scoring

    calls: list[int] = []
    original = scoring._decode_with_shared_prefix

    def spy(decoder: Any, inputs: Any, prefix: int, device: Any) -> Any:
        calls.append(prefix)
        return original(decoder, inputs, prefix, device)

    monkeypatch.setattr(scoring, "_decode_with_shared_prefix", spy)
    client = _client(tmp_path, tiny_model_dir)
    model = client.peft_model
    _randomise_lora_b(model)
    prefix = [5, 9, 13, 2, 7, 11, 3, 8, 4, 6]
    inputs = [[*prefix, 1, 12, 14], [*prefix, 15], [*prefix, 1, 10, 2, 3, 9]]
    shifted = [[*row[1:], 7] for row in inputs]
    own_targets = [row[:] for row in shifted]
    own_targets[1][2] = 17  # the targets part ways inside the prefix
    for targets in (shifted, own_targets):
        weights = [[0.0] * (len(row) - 2) + [1.0, 0.5] for row in inputs]
        weights[2][4] = 2.0  # a weighted position inside the prefix, in one row only
        data = [
            types.Datum(
                model_input=types.ModelInput.from_ints(row),
                loss_fn_inputs={"target_tokens": target, "weights": w},
            )
            for row, target, w in zip(inputs, targets, weights, strict=True)
        ]
        calls.clear()
        out = client.forward_backward(data, "cross_entropy").result()
        assert calls == [len(prefix)]
        params = [p for _, p in client._params]
        got = [p.grad.clone() for p in params]
        total, logprobs = _by_hand(model, inputs, targets, weights)
        torch.testing.assert_close(torch.tensor(out.metrics["loss:sum"]), total, atol=1e-5, rtol=1e-5)
        for output, want in zip(out.loss_fn_outputs, logprobs, strict=True):
            torch.testing.assert_close(output["logprobs"].to_torch(), want, atol=1e-5, rtol=1e-5)
        # Rounding differs (the prefix runs at batch 1): each tensor's gradient agrees to 1e-5 of its norm.
        for g, p in zip(got, params, strict=True):
            assert p.grad is not None and float(p.grad.norm()) > 0
            assert float((g - p.grad).norm()) <= 1e-5 * float(p.grad.norm())
        model.zero_grad(set_to_none=True)


def test_only_a_prefix_long_enough_and_leaving_every_row_a_token_is_shared() -> None:
    from resources.local_engine.scoring import MIN_SHARED_PREFIX, shared_prefix

    long = list(range(1, MIN_SHARED_PREFIX + 3))
    assert shared_prefix([long, [*long[:-1], 0]]) == len(long) - 1
    assert shared_prefix([long, long]) == len(long) - 1  # identical rows still decode their last token
    assert shared_prefix([long, long[:MIN_SHARED_PREFIX]]) == 0  # the shorter row would have nothing left
    assert shared_prefix([long, long[: MIN_SHARED_PREFIX + 1]]) == MIN_SHARED_PREFIX
    assert shared_prefix([long]) == 0
    assert shared_prefix([long, [0, *long[1:]]]) == 0


def test_the_vocabulary_walked_in_slices_gives_cross_entropys_values_and_gradients(monkeypatch: Any) -> None:
    """Long batches score the vocabulary a slice at a time (the last slice shorter here): the same
    logprobs and input gradients as ``F.cross_entropy`` on the whole logits, with and without a graph."""
    import torch.nn.functional as F

    from resources.local_engine import vocab

    monkeypatch.setattr(vocab, "SLICE_FLOATS", 40 * 300)  # 40 rows: slices of 300 over a vocabulary of 1000
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=generator)
    weight = torch.randn(1000, 16, generator=generator)
    targets = torch.randint(0, 1000, (40,), generator=generator)
    upstream = torch.randn(40, generator=generator)

    want_input = hidden.clone().requires_grad_(True)
    want = -F.cross_entropy(want_input @ weight.T, targets, reduction="none")
    (want * upstream).sum().backward()
    got_input = hidden.clone().requires_grad_(True)
    got = vocab.target_logprobs(got_input, weight, targets)
    (got * upstream).sum().backward()

    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got_input.grad is not None and want_input.grad is not None
    torch.testing.assert_close(got_input.grad, want_input.grad, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(vocab.target_logprobs(hidden, weight, targets), got.detach())

    head = torch.nn.Linear(16, 1000, bias=False).requires_grad_(False)
    assert vocab.eligible(head, torch.zeros(vocab.MIN_ROWS, 16))
    assert not vocab.eligible(head, torch.zeros(vocab.MIN_ROWS - 1, 16))
    assert not vocab.eligible(head.requires_grad_(True), torch.zeros(vocab.MIN_ROWS, 16))
