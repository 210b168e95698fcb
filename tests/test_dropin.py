"""The local engine as a drop-in for the tinker SDK: its constructor, futures, keywords, REST client,
``gspo`` and ``stable_reinforce``, LoRA layer choice, and ``install`` / the ``python -m`` runner.

tinker-cookbook's loops exercise all of it together (``test_cookbook_peer.py``); these pin each piece
with expectations computed here. Raw token ids (valid in the tiny model's vocabulary) keep them fast.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import warnings
from pathlib import Path

import pytest
import tinker
import torch
from tinker import types

from resources.local_engine.checkpoints import STATE_MANIFEST, read_state_info
from resources.local_engine.dropin import RestClient, ServiceClient, install, installed, main
from resources.local_engine.training import LocalTrainingClient

RANK = 4


@pytest.fixture
def service(tiny_model_dir: Path, tmp_path: Path) -> ServiceClient:
    return ServiceClient(root=tmp_path / "engine", num_threads=1)


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 300) for _ in range(n)]


def _sl_datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def _rl_datum(prompt: list[int], sampled: list[int], q: list[float], advantage: float, **extra: list[float]):
    """The cookbook's RL datum shape: prompt then sampled tokens, shifted by one; A on the sampled part."""
    tokens = prompt + sampled
    ob = len(prompt) - 1
    inputs = {
        "target_tokens": tokens[1:],
        "logprobs": [0.0] * ob + q,
        "advantages": [0.0] * ob + [advantage] * len(sampled),
        **extra,
    }
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def _logprobs(client: LocalTrainingClient, data: list[types.Datum]) -> list[float]:
    """Every datum's target logprobs, concatenated."""
    outputs = client.forward(data, "cross_entropy").result().loss_fn_outputs
    return [lp for output in outputs for lp in output["logprobs"].tolist()]


# -- the constructor, futures and close ----------------------------------------------------------------------


def test_sdk_constructor_context_manager_and_awaitable_futures(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.warns(FutureWarning, match="no_such_option"):
        ServiceClient(base_url="http://unused", no_such_option=1, root=tmp_path)

    async def run() -> tuple[float, float, list[float | None]]:
        with ServiceClient(
            {"recipe": "test"}, base_url="http://unused", display_name="d", root=tmp_path, num_threads=1
        ) as service:
            client = await service.create_lora_training_client(str(tiny_model_dir), rank=RANK, seed=0)
            fb = client.forward_backward([_sl_datum(_tokens(9, 1))], "cross_entropy")
            optim = client.optim_step(types.AdamParams(learning_rate=1e-3))
            assert isinstance(fb, tinker.APIFuture)
            loss = (await fb).metrics["loss:sum"]
            await asyncio.create_task(optim.coroutine())
            sampler = await client.save_weights_and_get_sampling_client()
            scored = await sampler.compute_logprobs(types.ModelInput.from_ints(_tokens(5, 2))).result_async(5)
            again = (await client.forward([_sl_datum(_tokens(9, 1))], "cross_entropy")).metrics["loss:sum"]
        return loss, again, scored

    loss, again, scored = asyncio.run(run())
    assert again < loss and scored[0] is None and len(scored) == 5


def test_close_ends_the_session(service: ServiceClient, tiny_model_dir: Path) -> None:
    client = service.create_lora_training_client(str(tiny_model_dir), rank=RANK, seed=0).result()
    closed = service.close("success", "done")
    assert isinstance(closed, tinker.APIFuture) and closed.result() is None
    with pytest.raises(RuntimeError, match="closed"):
        service.create_lora_training_client(str(tiny_model_dir), rank=RANK)
    with pytest.raises(RuntimeError, match="closed"), service:
        pass
    assert client.forward([_sl_datum(_tokens(9, 3))], "cross_entropy").result().metrics["loss:sum"] > 0


def test_base_model_names_resolve_and_bad_ones_fail_at_result(service: ServiceClient) -> None:
    future = service.create_lora_training_client("./no/such/model-dir", rank=RANK)
    with pytest.raises(ValueError, match="no such file or directory"):
        future.result()
    with pytest.raises(ValueError, match="model_path or base_model"):
        service.create_sampling_client()


def test_engine_settings_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kitchen_home: Path
) -> None:
    assert ServiceClient().settings.root == kitchen_home / "engine"
    monkeypatch.setenv("KITCHEN_ENGINE_DEVICE", "cpu")
    monkeypatch.setenv("KITCHEN_ENGINE_THREADS", "1")
    settings = ServiceClient().settings
    assert (settings.device, settings.num_threads) == ("cpu", 1)
    assert ServiceClient(num_threads=2, root=tmp_path).settings.num_threads == 2
    monkeypatch.setenv("KITCHEN_ENGINE_THREADS", "many")
    with pytest.raises(ValueError, match="KITCHEN_ENGINE_THREADS"):
        ServiceClient()


# -- the SDK's keywords --------------------------------------------------------------------------------------


def test_sdk_keywords_are_accepted_and_checked(service: ServiceClient, tiny_model_dir: Path) -> None:
    client = service.create_lora_training_client(
        str(tiny_model_dir), rank=RANK, seed=0, user_metadata={"k": "v"}, optimizer=None
    ).result()
    assert client.save_state("a", ttl_seconds=7200, overwrite=True, user_metadata={"x": "y"}).result().path
    assert client.save_weights_for_sampler("a", ttl_seconds=None).result().path
    with pytest.raises(ValueError, match="ttl_seconds"):
        client.save_state("b", ttl_seconds=60)
    sampler = client.save_weights_and_get_sampling_client(
        retry_config=None, record_stability_info=True
    ).result()
    with pytest.raises(ValueError, match="inflight"):
        client.save_weights_and_get_sampling_client(kind="inflight")
    with pytest.raises(ValueError, match="topk_sample_logprobs"):
        sampler.sample(
            types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2), topk_sample_logprobs=2
        )
    info = client.get_info()
    assert info.lora_rank == RANK and info.model_data.model_name == str(tiny_model_dir)


def test_prompt_logprobs_last_n_scores_only_the_tail(service: ServiceClient, tiny_model_dir: Path) -> None:
    sampler = service.create_sampling_client(base_model=str(tiny_model_dir)).result()
    prompt = types.ModelInput.from_ints(_tokens(10, 4))
    full = sampler.compute_logprobs(prompt).result()
    tail = sampler.compute_logprobs(prompt, prompt_logprobs_last_n=3).result()
    assert tail[:7] == [None] * 7 and tail[7:] == pytest.approx(full[7:], abs=1e-6)
    with pytest.raises(ValueError, match="prompt_logprobs_last_n"):
        sampler.compute_logprobs(prompt, prompt_logprobs_last_n=10)


# -- LoRA layers ---------------------------------------------------------------------------------------------


def _adapted(client: LocalTrainingClient) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {
        name.rsplit(".", 1)[-1] for name, m in client.peft_model.named_modules() if isinstance(m, LoraLayer)
    }


def test_train_unembed_adapts_the_unembedding_and_survives_checkpoints(
    service: ServiceClient, tiny_model_dir: Path
) -> None:
    default = service.create_lora_training_client(str(tiny_model_dir), rank=RANK, seed=0).result()
    assert "lm_head" in _adapted(default)  # the SDK's default: train_unembed=True
    attention_only = service.create_lora_training_client(
        str(tiny_model_dir), rank=RANK, seed=0, train_mlp=False, train_unembed=False
    ).result()
    assert _adapted(attention_only) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    with pytest.raises(ValueError, match="nothing would be trained"):
        service.create_lora_training_client(
            str(tiny_model_dir), train_mlp=False, train_attn=False, train_unembed=False
        ).result()

    data = [_sl_datum(_tokens(9, 5))]
    default.forward_backward(data, "cross_entropy")
    default.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    state = default.save_state("unembed").result().path
    info = read_state_info(Path(state.removeprefix("file://")))
    assert (info.train_attn, info.train_mlp, info.train_unembed) == (True, True, True)
    resumed = service.create_training_client_from_state_with_optimizer(state).result()
    assert _adapted(resumed) == _adapted(default)
    assert _logprobs(resumed, data) == pytest.approx(_logprobs(default, data), abs=1e-6)
    # The sampler's overlay covers the unembedding too: sampled-path logprobs equal the trainer's.
    sampler = default.create_sampling_client(
        default.save_weights_for_sampler("unembed").result().path
    ).result()
    tokens = _tokens(9, 5)
    scored = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()[1:]
    assert scored == pytest.approx(_logprobs(default, data), abs=1e-5)


def test_checkpoints_from_before_layer_choice_load_as_attention_and_mlp(
    service: ServiceClient, tiny_model_dir: Path
) -> None:
    client = service.engine.create_lora_training_client(str(tiny_model_dir), rank=RANK, seed=0).result()
    path = Path(client.save_state("old").result().path.removeprefix("file://"))
    manifest = json.loads((path / STATE_MANIFEST).read_text())
    for key in ("train_attn", "train_mlp", "train_unembed"):
        manifest.pop(key)
    (path / STATE_MANIFEST).write_text(json.dumps(manifest))
    info = read_state_info(path)
    assert (info.train_attn, info.train_mlp, info.train_unembed) == (True, True, False)
    assert "lm_head" not in _adapted(service.create_training_client_from_state(f"file://{path}").result())


# -- gspo and stable_reinforce ------------------------------------------------------------------------------


def _gspo_by_hand(datum: types.Datum, lps: list[float], low: float, high: float) -> float:
    q = datum.loss_fn_inputs["logprobs"].tolist()
    a = datum.loss_fn_inputs["advantages"].tolist()
    mask = datum.loss_fn_inputs["sequence_ratio_mask"].tolist()
    marked = [lp - qq for lp, qq, m in zip(lps, q, mask, strict=True) if m]
    s = math.exp(sum(marked) / len(marked))
    return -sum(min(s * adv, min(max(s, low), high) * adv) for adv in a)


def _gspo_custom(low: float, high: float):
    """The documented GSPO-token objective written with torch, for ``forward_backward_custom``."""

    def loss(data: list[types.Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        total = torch.zeros(())
        for datum, lp in zip(data, logprobs, strict=True):
            q = datum.loss_fn_inputs["logprobs"].to_torch()
            a = datum.loss_fn_inputs["advantages"].to_torch()
            mask = datum.loss_fn_inputs["sequence_ratio_mask"].to_torch() > 0
            value = torch.exp((lp.detach() - q)[mask].mean())
            ratio = value * torch.exp(lp - lp.detach())
            total = total - torch.minimum(ratio * a, torch.clamp(ratio, low, high) * a).sum()
        return total, {}

    return loss


def test_gspo_matches_its_documented_formula_in_value_and_gradient(
    service: ServiceClient, tiny_model_dir: Path
) -> None:
    prompt, sampled = _tokens(5, 6), _tokens(6, 7)
    make = lambda: service.create_lora_training_client(str(tiny_model_dir), rank=RANK, seed=0).result()  # noqa: E731
    builtin, custom = make(), make()
    current = _logprobs(builtin, [_sl_datum(prompt + sampled)])
    data = []
    for shift, advantage in ((0.3, 1.0), (-0.4, -0.5), (0.02, 2.0)):  # ratios e^-0.3, e^0.4, ~1: clip binds
        q = [lp + shift for lp in current[len(prompt) - 1 :]]
        mask = [0.0] * (len(prompt) - 1) + [1.0] * len(sampled)
        data.append(_rl_datum(prompt, sampled, q, advantage, sequence_ratio_mask=mask))
    out = builtin.forward_backward(data, "gspo").result()
    expected = sum(_gspo_by_hand(d, current, 0.8, 1.2) for d in data)
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
    custom.forward_backward_custom(data, _gspo_custom(0.8, 1.2)).result()
    for client in (builtin, custom):
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after = _logprobs(builtin, [_sl_datum(prompt + sampled)])
    assert after != pytest.approx(current, abs=1e-4)  # it trained
    assert after == pytest.approx(_logprobs(custom, [_sl_datum(prompt + sampled)]), abs=1e-5)

    empty = _rl_datum(prompt, sampled, q, 1.0, sequence_ratio_mask=[0.0] * len(mask))
    with pytest.raises(ValueError, match="datum 0: sequence_ratio_mask marks no token"):
        builtin.forward_backward([empty], "gspo")


def test_stable_reinforce_needs_recorded_provenance_and_trains_like_importance_sampling(
    service: ServiceClient, tiny_model_dir: Path
) -> None:
    make = lambda: service.create_lora_training_client(str(tiny_model_dir), rank=RANK, seed=0).result()  # noqa: E731
    stable, reference = make(), make()
    prompt = _tokens(6, 8)
    params = types.SamplingParams(max_tokens=5, temperature=1.0, seed=3)

    def sample(record: bool) -> types.SampledSequence:
        sampler = stable.save_weights_and_get_sampling_client(record_stability_info=record).result()
        return sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences[0]

    seq = sample(record=True)
    plain = _rl_datum(prompt, seq.tokens, list(seq.logprobs or []), 1.0)

    def with_provenance(datum: types.Datum, sequence_id: str) -> types.Datum:  # as the cookbook's rl_loop
        return datum.with_provenance(
            model_input=[
                types.PromptProvenanceSpan(sequence_id=sequence_id, length=len(prompt)),
                types.SampledProvenanceSpan(sequence_id=sequence_id, length=len(seq.tokens) - 1),
            ],
            loss_fn_inputs=[
                types.PromptProvenanceSpan(sequence_id=sequence_id, offset=1, length=len(prompt) - 1),
                types.SampledProvenanceSpan(sequence_id=sequence_id, length=len(seq.tokens)),
            ],
        )

    with pytest.raises(ValueError, match="datum 0: loss 'stable_reinforce' needs provenance"):
        stable.forward_backward([plain], "stable_reinforce")
    unrecorded = sample(record=False)
    with pytest.raises(ValueError, match="record_stability_info=True"):
        stable.forward_backward([with_provenance(plain, unrecorded.sequence_id)], "stable_reinforce")
    other = _rl_datum(prompt, [t + 1 for t in seq.tokens], list(seq.logprobs or []), 1.0)
    with pytest.raises(ValueError, match="are not the tokens sampled"):
        stable.forward_backward([with_provenance(other, seq.sequence_id)], "stable_reinforce")

    got = stable.forward_backward([with_provenance(plain, seq.sequence_id)], "stable_reinforce").result()
    expected = reference.forward_backward([plain], "importance_sampling").result()
    assert got.metrics["loss:sum"] == pytest.approx(expected.metrics["loss:sum"], rel=1e-6)
    for client in (stable, reference):
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    check = [_sl_datum(prompt + seq.tokens)]
    assert _logprobs(stable, check) == pytest.approx(_logprobs(reference, check), abs=1e-6)


# -- the REST client -----------------------------------------------------------------------------------------


def test_rest_client_answers_for_local_checkpoints(service: ServiceClient, tiny_model_dir: Path) -> None:
    client = service.create_lora_training_client(
        str(tiny_model_dir), rank=RANK, seed=0, user_metadata={"renderer_name": "qwen3_instruct"}
    ).result()
    state = client.save_state("s1").result().path
    sampler = client.save_weights_for_sampler("w1").result().path
    rest = service.create_rest_client()
    run = rest.get_training_run_by_tinker_path(state).result()
    assert run.training_run_id == client.session_id and run.user_metadata == {
        "renderer_name": "qwen3_instruct"
    }
    assert (run.base_model, run.lora_rank, run.is_lora) == (str(tiny_model_dir), RANK, True)
    assert run.last_checkpoint is not None and run.last_checkpoint.tinker_path == state
    assert (
        run.last_sampler_checkpoint is not None
        and run.last_sampler_checkpoint.checkpoint_id == "sampler_weights/w1"
    )
    assert asyncio.run(rest.get_training_run(client.session_id).result_async()) == run
    listed = rest.list_checkpoints(client.session_id).result().checkpoints
    assert sorted(c.checkpoint_id for c in listed) == ["sampler_weights/w1", "weights/s1"]

    rest.delete_checkpoint_from_tinker_path(state).result()
    assert not Path(state.removeprefix("file://")).exists()
    rest.delete_checkpoint(client.session_id, "sampler_weights/w1").result()
    assert not Path(sampler.removeprefix("file://")).exists()
    for bad in (state, "tinker://run/weights/x"):
        with pytest.raises(ValueError):
            rest.get_training_run_by_tinker_path(bad).result()
    with pytest.raises(ValueError, match="no training run"):
        RestClient(root=service.settings.root).get_training_run("no-such-run").result()


# -- installing it -------------------------------------------------------------------------------------------


def test_install_swaps_the_sdk_classes_and_puts_them_back(tmp_path: Path) -> None:
    original = tinker.ServiceClient, tinker.RestClient
    with installed(root=tmp_path, num_threads=1):
        assert tinker.ServiceClient is ServiceClient and tinker.RestClient is RestClient
        assert tinker.ServiceClient().settings.root == tmp_path
        assert tinker.RestClient().root == tmp_path
    assert (tinker.ServiceClient, tinker.RestClient) == original
    with pytest.raises(ValueError, match="device"):
        install(device="tpu")
    assert tinker.ServiceClient is original[0]


def test_the_runner_runs_a_program_with_the_engine_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "program.py"
    script.write_text(
        "import sys, tinker\n"
        "print(tinker.ServiceClient.__module__, tinker.RestClient.__module__, sys.argv[1:])\n"
    )
    original = tinker.ServiceClient, tinker.RestClient
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert main([str(script), "--flag", "x"]) == 0
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["-m", "program", "y"]) == 0
    assert (tinker.ServiceClient, tinker.RestClient) == original  # put back when the program ends
    out = capsys.readouterr().out.splitlines()
    engine = "resources.local_engine.dropin"
    assert out == [f"{engine} {engine} ['--flag', 'x']", f"{engine} {engine} ['y']"]
    assert main([str(tmp_path / "missing.py")]) == 2
    with warnings.catch_warnings():
        assert main([]) == 2
