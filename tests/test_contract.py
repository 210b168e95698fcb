"""The training-client contract, run against every backend: the local engine always, Tinker when it answers.

Workflow code is written once against ``kitchen.contract``; these tests pin what it relies on, so a
backend that passes them can replace another. They use raw token ids (valid in any vocabulary over 300),
so no tokenizer is loaded. The Tinker leg runs when ``TINKER_API_KEY`` is set and the service answers a
probe within ``KITCHEN_TINKER_PROBE_TIMEOUT_S`` (default 5 s); ``KITCHEN_TINKER_TEST_MODEL`` picks the
model (default ``meta-llama/Llama-3.2-1B``).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tinker import types

from kitchen.contract import BUILTIN_LOSSES, SamplingClient, ServiceClient, TrainingClient

LR = 1e-2
RANK = 4


@dataclass(frozen=True)
class Backend:
    name: str
    service: ServiceClient
    new_service: Callable[[], ServiceClient]
    """Another session (``close`` is tested on it, not on the shared one)."""
    base_model: str
    uri_scheme: str
    loss_rtol: float
    """Reported loss vs the weighted NLL recomputed from returned logprobs (same numbers, summed twice)."""
    same_weights_atol: float
    """Two computations on identical weights and data (resume vs uninterrupted; forward repeated)."""
    sampler_atol: float
    """Mean |difference| of logprobs between the training and the sampling path (different kernels;
    locally the same weights in float32, differing only in batch shape and KV-cache use)."""


def _local(tiny_model_dir: Path, root: Path) -> Backend:
    from resources.local_engine import LocalServiceClient

    service = LocalServiceClient(root=root, num_threads=1)
    return Backend(
        "local",
        service,
        lambda: LocalServiceClient(root=root),
        str(tiny_model_dir),
        "file://",
        1e-5,
        1e-5,
        1e-5,
    )


def _tinker() -> Backend:
    from resources.tinker_backend import TinkerBackend, TinkerUnavailableError

    if not os.environ.get("TINKER_API_KEY"):
        pytest.skip("TINKER_API_KEY is not set: the Tinker leg of the contract suite needs the live service")
    backend = TinkerBackend(
        api_key=os.environ["TINKER_API_KEY"],
        base_url=os.environ.get("TINKER_BASE_URL") or None,
        probe_timeout_s=float(os.environ.get("KITCHEN_TINKER_PROBE_TIMEOUT_S") or 5),
    )
    try:
        backend.preflight()
    except TinkerUnavailableError as err:
        pytest.skip(f"Tinker did not answer the probe: {err}")
    model = os.environ.get("KITCHEN_TINKER_TEST_MODEL", "meta-llama/Llama-3.2-1B")
    backend.resolve_base_model(model)  # an unknown model fails here, listing what the service offers
    return Backend(
        "tinker", backend.service_client(), backend.service_client, model, "tinker://", 1e-3, 2e-3, 0.1
    )


@pytest.fixture(scope="module", params=["local", "tinker"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    if request.param == "local":
        yield _local(request.getfixturevalue("tiny_model_dir"), tmp_path_factory.mktemp("engine"))
    else:
        yield _tinker()


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 300) for _ in range(n)]


def _datum(tokens: list[int], weights: list[float] | None = None) -> types.Datum:
    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[n]),
            "weights": types.TensorData(data=weights or [1.0] * n, dtype="float32", shape=[n]),
        },
    )


BATCH = [_datum(_tokens(17, seed)) for seed in range(4)]


def _step(client: TrainingClient, data: list[types.Datum] = BATCH) -> float:
    fb = client.forward_backward(data, "cross_entropy")
    optim = client.optim_step(types.AdamParams(learning_rate=LR))
    loss = fb.result().metrics["loss:sum"]
    optim.result()
    return float(loss)


def _logprobs(client: TrainingClient, data: list[types.Datum] = BATCH) -> list[list[float]]:
    out = client.forward(data, "cross_entropy").result()
    return [list(o["logprobs"].tolist()) for o in out.loss_fn_outputs]


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def _new_client(backend: Backend) -> TrainingClient:
    return backend.service.create_lora_training_client(backend.base_model, rank=RANK, seed=0).result()


@pytest.fixture(scope="module")
def trained(backend: Backend) -> tuple[TrainingClient, SamplingClient]:
    """A client after two steps, and a sampling client on its saved weights."""
    client = _new_client(backend)
    _step(client)
    _step(client)
    path = client.save_weights_for_sampler("contract-two-steps").result().path
    return client, client.create_sampling_client(path).result()


@pytest.fixture(scope="module")
def base_sampler(backend: Backend) -> SamplingClient:
    return backend.service.create_sampling_client(base_model=backend.base_model).result()


# -- types ---------------------------------------------------------------------------------------------------


def test_types_in_and_out(backend: Backend) -> None:
    client = _new_client(backend)
    assert isinstance(client, TrainingClient)
    output = client.forward_backward(BATCH, "cross_entropy").result()
    assert isinstance(output, types.ForwardBackwardOutput)
    assert len(output.loss_fn_outputs) == len(BATCH)
    for datum, record in zip(BATCH, output.loss_fn_outputs, strict=True):
        assert isinstance(record["logprobs"], types.TensorData)
        assert len(record["logprobs"].tolist()) == datum.model_input.length
    assert isinstance(output.metrics["loss:sum"], float)
    assert isinstance(client.optim_step(types.AdamParams(learning_rate=LR)).result(), types.OptimStepResponse)

    state = client.save_state("contract-types").result()
    assert isinstance(state, types.SaveWeightsResponse) and state.path.startswith(backend.uri_scheme)
    sampler_path = client.save_weights_for_sampler("contract-types").result()
    assert isinstance(sampler_path, types.SaveWeightsForSamplerResponse)
    assert sampler_path.path.startswith(backend.uri_scheme)

    sampler = client.create_sampling_client(sampler_path.path).result()
    assert isinstance(sampler, SamplingClient)
    prompt = types.ModelInput.from_ints(_tokens(6, 1))
    response = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=3, temperature=1.0, seed=1)).result()
    assert isinstance(response, types.SampleResponse) and len(response.sequences) == 2
    for sequence in response.sequences:
        assert isinstance(sequence, types.SampledSequence)
        assert all(isinstance(t, int) for t in sequence.tokens) and 1 <= len(sequence.tokens) <= 3
        assert sequence.stop_reason in ("length", "stop")
    logprobs = sampler.compute_logprobs(prompt).result()
    assert len(logprobs) == 6 and logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in logprobs[1:])


def test_tokenizers_encode_and_decode(backend: Backend, base_sampler: SamplingClient) -> None:
    client = _new_client(backend)
    for tokenizer in (client.get_tokenizer(), base_sampler.get_tokenizer()):
        ids = tokenizer.encode("hello world", add_special_tokens=False)
        assert ids and all(isinstance(i, int) for i in ids)
        assert tokenizer.decode(ids) == "hello world"


# -- training numerics ---------------------------------------------------------------------------------------


def test_cross_entropy_loss_is_the_weighted_nll_of_the_returned_logprobs(backend: Backend) -> None:
    weights = [0.0, 0.0, 0.5, 1.0, 2.0] + [1.0] * 11
    data = [_datum(_tokens(17, 10), weights), _datum(_tokens(17, 11))]
    client = _new_client(backend)
    for output in (
        client.forward(data, "cross_entropy").result(),
        client.forward_backward(data, "cross_entropy").result(),
    ):
        recomputed = -sum(
            w * lp
            for datum, record in zip(data, output.loss_fn_outputs, strict=True)
            for w, lp in zip(
                datum.loss_fn_inputs["weights"].tolist(), record["logprobs"].tolist(), strict=True
            )
        )
        assert output.metrics["loss:sum"] == pytest.approx(recomputed, rel=backend.loss_rtol)


def test_forward_is_pure_and_optim_step_learns(backend: Backend) -> None:
    client = _new_client(backend)
    before = _logprobs(client)
    assert _max_diff(before, _logprobs(client)) <= backend.same_weights_atol
    losses = [_step(client) for _ in range(3)]
    assert losses[-1] < losses[0]
    assert _max_diff(before, _logprobs(client)) > 100 * backend.same_weights_atol


def test_optimizer_state_survives_save_and_load(backend: Backend) -> None:
    original = _new_client(backend)
    _step(original)
    _step(original)
    path = original.save_state("contract-resume").result().path
    before_third_step = _logprobs(original)
    _step(original)
    expected = _logprobs(original)

    resumed = backend.service.create_training_client_from_state_with_optimizer(path).result()
    _step(resumed)
    assert _max_diff(expected, _logprobs(resumed)) <= backend.same_weights_atol

    # Weights alone restart Adam's moments, so the third step lands elsewhere: the state really is saved.
    weights_only = backend.service.create_training_client_from_state(path).result()
    assert _max_diff(before_third_step, _logprobs(weights_only)) <= backend.same_weights_atol
    _step(weights_only)
    assert _max_diff(expected, _logprobs(weights_only)) > 10 * backend.same_weights_atol


# -- sampling ------------------------------------------------------------------------------------------------

PROMPT = types.ModelInput.from_ints(_tokens(8, 42))


def _greedy(sampler: SamplingClient, max_tokens: int, **params: object) -> types.SampledSequence:
    sampling = types.SamplingParams(max_tokens=max_tokens, temperature=0.0, **params)  # type: ignore[arg-type]
    return sampler.sample(PROMPT, 1, sampling).result().sequences[0]


def test_max_tokens_is_honoured(base_sampler: SamplingClient) -> None:
    for max_tokens in (1, 5):
        sequence = _greedy(base_sampler, max_tokens, stop=[])
        assert len(sequence.tokens) == max_tokens and sequence.stop_reason == "length"


def test_temperature_zero_is_deterministic(base_sampler: SamplingClient) -> None:
    params = types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
    first = base_sampler.sample(PROMPT, 2, params).result().sequences
    second = base_sampler.sample(PROMPT, 1, params).result().sequences
    assert first[0].tokens == first[1].tokens == second[0].tokens


def test_stop_tokens_end_the_sequence_and_are_kept(base_sampler: SamplingClient) -> None:
    free = _greedy(base_sampler, 8, stop=[]).tokens
    stop_token = free[3]
    cut = free.index(stop_token) + 1
    stopped = _greedy(base_sampler, 8, stop=[stop_token])
    assert stopped.tokens == free[:cut] and stopped.stop_reason == "stop"


def test_seed_makes_sampling_reproducible(base_sampler: SamplingClient) -> None:
    def draw(seed: int) -> list[int]:
        params = types.SamplingParams(max_tokens=16, temperature=1.0, seed=seed, stop=[])
        return list(base_sampler.sample(PROMPT, 1, params).result().sequences[0].tokens)

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_compute_logprobs_agrees_with_forward_and_with_sampling(
    backend: Backend, trained: tuple[TrainingClient, SamplingClient]
) -> None:
    client, sampler = trained
    tokens = _tokens(17, 3)
    scored = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    assert scored[0] is None
    (forward,) = _logprobs(client, [_datum(tokens)])
    diffs = [abs(s - f) for s, f in zip(scored[1:], forward, strict=True) if s is not None]
    assert len(diffs) == 16
    assert sum(diffs) / len(diffs) <= backend.sampler_atol

    sequence = sampler.sample(
        PROMPT, 1, types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    ).result()
    generated = sequence.sequences[0]
    assert generated.logprobs is not None and len(generated.logprobs) == len(generated.tokens)
    rescored = sampler.compute_logprobs(
        types.ModelInput.from_ints(PROMPT.to_ints() + generated.tokens)
    ).result()
    tail = [x for x in rescored[PROMPT.length :] if x is not None]
    assert len(tail) == len(generated.tokens)
    mean_diff = sum(abs(a - b) for a, b in zip(generated.logprobs, tail, strict=True)) / len(tail)
    assert not math.isnan(mean_diff) and mean_diff <= backend.sampler_atol


# -- service: creation futures and close ---------------------------------------------------------------------


def test_creation_calls_return_futures_and_fail_at_result(backend: Backend) -> None:
    future = backend.service.create_lora_training_client(backend.base_model, rank=RANK, seed=0)
    assert not isinstance(future, TrainingClient)
    client = future.result()
    assert isinstance(client, TrainingClient)
    path = client.save_state("contract-futures").result().path
    for make in (
        backend.service.create_training_client_from_state,
        backend.service.create_training_client_from_state_with_optimizer,
    ):
        pending = make(path)
        assert not isinstance(pending, TrainingClient) and isinstance(pending.result(), TrainingClient)
    sampler = backend.service.create_sampling_client(base_model=backend.base_model)
    assert not isinstance(sampler, SamplingClient) and isinstance(sampler.result(), SamplingClient)

    bad = backend.service.create_lora_training_client("no-such-org/no-such-model", rank=RANK)
    with pytest.raises(Exception):  # noqa: B017 - each backend words it its own way; it must raise here
        bad.result()


def test_close_ends_a_session_without_raising(backend: Backend) -> None:
    service = backend.new_service()
    client = service.create_lora_training_client(backend.base_model, rank=RANK, seed=0).result()
    assert _step(client) > 0
    assert service.close() is None
    assert backend.new_service().close("errored", "contract test: nothing went wrong") is None


# -- built-in RL losses --------------------------------------------------------------------------------------

# Offsets of the sampler's logprobs q from the learner's: ratios exp(-offset) from 0.55 to 1.8, so the
# 0.8/1.2 clip binds on both sides for both signs of the advantage.
OFFSETS = [-0.6, -0.3, -0.15, -0.05, 0.0, 0.05, 0.15, 0.3, 0.6, -0.25, 0.25, 0.1, -0.1, 0.4, -0.4, 0.2]
ADVANTAGES = [1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 1.5, -1.5, 0.0, 1.0, -1.0, 0.7, -0.7, 1.2, -1.2, 0.3]


def _rl_datum(tokens: list[int], q: list[float], advantages: list[float]) -> types.Datum:
    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[n]),
            "logprobs": types.TensorData(data=q, dtype="float32", shape=[n]),
            "advantages": types.TensorData(data=advantages, dtype="float32", shape=[n]),
        },
    )


def _by_hand(loss: str, config: dict[str, float], lp: float, q: float, a: float) -> float:
    """One token's loss, written out with plain arithmetic from Tinker's documented formulas."""
    ratio = math.exp(lp - q)
    low, high = config.get("clip_low_threshold", 0.0), config.get("clip_high_threshold", 0.0)
    clipped = min(max(ratio, low), high)
    if loss == "importance_sampling":
        return -ratio * a
    if loss == "ppo":
        return -min(ratio * a, clipped * a)
    if loss == "cispo":
        return -clipped * lp * a
    assert loss == "dro"
    return -(lp * a - 0.5 * config["beta"] * (lp - q) ** 2)


RL_CASES = [
    pytest.param("importance_sampling", None, {}, id="importance_sampling"),
    # Tinker's documented defaults, then explicit configs.
    pytest.param("ppo", None, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}, id="ppo-default"),
    pytest.param("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}, None, id="ppo-0.9-1.1"),
    pytest.param("cispo", None, {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}, id="cispo-default"),
    pytest.param("cispo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}, None, id="cispo-0.8-1.2"),
    pytest.param("dro", {"beta": 0.5}, None, id="dro-beta-0.5"),
]


@pytest.mark.parametrize(("loss", "config", "defaults"), RL_CASES)
def test_rl_losses_match_the_formulas_by_hand(
    backend: Backend, loss: str, config: dict[str, float] | None, defaults: dict[str, float] | None
) -> None:
    client = _new_client(backend)
    token_lists = [_tokens(17, 20), _tokens(17, 21)]
    current = _logprobs(client, [_datum(tokens) for tokens in token_lists])
    data = [
        _rl_datum(tokens, [lp + off for lp, off in zip(lps, OFFSETS, strict=True)], ADVANTAGES[::sign])
        for tokens, lps, sign in zip(token_lists, current, (1, -1), strict=True)
    ]
    effective = {**(defaults or {}), **(config or {})}
    for output in (
        client.forward(data, loss, config).result(),
        client.forward_backward(data, loss, config).result(),
    ):
        expected = 0.0
        for datum, record in zip(data, output.loss_fn_outputs, strict=True):
            lps = record["logprobs"].tolist()
            assert len(lps) == 16
            qs, advs = datum.loss_fn_inputs["logprobs"].tolist(), datum.loss_fn_inputs["advantages"].tolist()
            expected += sum(
                _by_hand(loss, effective, lp, q, a) for lp, q, a in zip(lps, qs, advs, strict=True)
            )
        assert output.metrics["loss:sum"] == pytest.approx(expected, rel=backend.loss_rtol, abs=1e-5)
        assert _max_diff([r["logprobs"].tolist() for r in output.loss_fn_outputs], current) <= (
            backend.same_weights_atol
        )


@pytest.mark.parametrize("loss", [name for name in BUILTIN_LOSSES if name != "cross_entropy"])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
def test_rl_losses_move_logprobs_the_way_the_advantage_points(
    backend: Backend, loss: str, sign: float
) -> None:
    """On-policy (q = current logprobs), one small step raises the logprobs of tokens with A > 0 and lowers
    them for A < 0, whatever the loss: their gradients all reduce to A * grad(logprob) at ratio 1."""
    client = _new_client(backend)
    tokens = _tokens(17, 30)
    (before,) = _logprobs(client, [_datum(tokens)])
    data = [_rl_datum(tokens, before, [sign] * 16)]
    client.forward_backward(data, loss, {"beta": 0.1} if loss == "dro" else None).result()
    client.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    (after,) = _logprobs(client, [_datum(tokens)])
    assert sign * (sum(after) - sum(before)) > 0.01


# -- forward_backward_custom ---------------------------------------------------------------------------------


def _custom_cross_entropy(
    data: list[types.Datum], logprobs: list[torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    loss = sum(
        -(d.loss_fn_inputs["weights"].to_torch() * lp).sum() for d, lp in zip(data, logprobs, strict=True)
    )
    assert isinstance(loss, torch.Tensor)
    return loss, {"datums:sum": float(len(data))}


def test_custom_loss_equal_to_cross_entropy_trains_identically(backend: Backend) -> None:
    weights = [0.0, 0.5, 1.0, 2.0] + [1.0] * 12
    data = [_datum(_tokens(17, 40), weights), _datum(_tokens(17, 41))]
    builtin, custom = _new_client(backend), _new_client(backend)
    expected = builtin.forward_backward(data, "cross_entropy")
    got = custom.forward_backward_custom(data, _custom_cross_entropy)
    builtin.optim_step(types.AdamParams(learning_rate=LR))
    custom.optim_step(types.AdamParams(learning_rate=LR))
    assert got.result().metrics["loss:sum"] == pytest.approx(expected.result().metrics["loss:sum"], rel=1e-5)
    assert got.result().metrics["datums:sum"] == 2.0
    assert "surrogate_loss:sum" in got.result().metrics
    assert _max_diff(_logprobs(builtin), _logprobs(custom)) <= backend.same_weights_atol


def test_custom_loss_couples_datums_and_needs_only_target_tokens(backend: Backend) -> None:
    """A DPO-shaped loss over a (chosen, rejected) pair; datums carry no weights (zeros, as in the SDK)."""
    beta, reference = 0.5, (-90.0, -80.0)
    pair = [_tokens(13, 50), _tokens(13, 51)]
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[12])},
        )
        for tokens in pair
    ]

    def dpo(data: list[types.Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = logprobs[0].sum(), logprobs[1].sum()
        margin = beta * ((chosen - reference[0]) - (rejected - reference[1]))
        return -torch.nn.functional.logsigmoid(margin), {"margin:sum": float(margin.detach())}

    client = _new_client(backend)
    output = client.forward_backward_custom(data, dpo).result()
    chosen, rejected = (sum(r["logprobs"].tolist()) for r in output.loss_fn_outputs)
    margin = beta * ((chosen - reference[0]) - (rejected - reference[1]))
    assert output.metrics["margin:sum"] == pytest.approx(margin, rel=1e-4)
    assert output.metrics["loss:sum"] == pytest.approx(math.log1p(math.exp(-margin)), rel=1e-4)
    client.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    after = [sum(lps) for lps in _logprobs(client, [_datum(tokens) for tokens in pair])]
    # The loss pushes the chosen sequence up relative to the rejected one.
    assert (after[0] - after[1]) > (chosen - rejected)


# -- sampling from a snapshot of the training weights --------------------------------------------------------


def _sampler_logprobs(sampler: SamplingClient, tokens: list[int]) -> list[float]:
    scored = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    assert scored[0] is None
    return [float(x) for x in scored[1:] if x is not None]


def _mean_abs(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def test_snapshot_sampler_is_ordered_with_the_steps_around_it(backend: Backend) -> None:
    client = _new_client(backend)
    _step(client)
    tokens = _tokens(17, 60)
    (before,) = _logprobs(client, [_datum(tokens)])
    # Submitted without waiting, as a pipelined RL loop does: each snapshot sees the steps before it only.
    first = client.save_weights_and_get_sampling_client()
    client.forward_backward(BATCH, "cross_entropy")
    client.optim_step(types.AdamParams(learning_rate=LR))
    second = client.save_weights_and_get_sampling_client()
    (after,) = _logprobs(client, [_datum(tokens)])
    _step(client)  # training on must not reach into either snapshot

    assert isinstance(first.result(), SamplingClient) and isinstance(second.result(), SamplingClient)
    first_lp, second_lp = (_sampler_logprobs(s.result(), tokens) for s in (first, second))
    assert _mean_abs(first_lp, before) <= backend.sampler_atol
    assert _mean_abs(second_lp, after) <= backend.sampler_atol
    assert _mean_abs(first_lp, before) < _mean_abs(first_lp, after)
    assert _mean_abs(second_lp, after) < _mean_abs(second_lp, before)


def test_snapshot_samples_carry_the_training_logprobs(backend: Backend) -> None:
    """RL's kl_sample_train: what the sampler reports for its tokens is what training computes for them."""
    client = _new_client(backend)
    _step(client)
    _step(client)
    sampler = client.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=12, temperature=1.0, seed=3, stop=[])
    diffs = []
    for sequence in sampler.sample(PROMPT, 4, params).result().sequences:
        assert sequence.logprobs is not None
        full = [*PROMPT.to_ints(), *sequence.tokens]
        (train,) = _logprobs(client, [_datum(full)])
        sampled_part = train[PROMPT.length - 1 :]
        diffs.extend(s - t for s, t in zip(sequence.logprobs, sampled_part, strict=True))
    assert len(diffs) == 48
    assert sum(abs(d) for d in diffs) / len(diffs) <= backend.sampler_atol
