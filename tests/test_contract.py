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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tinker import types

from kitchen.contract import SamplingClient, ServiceClient, TrainingClient

LR = 1e-2
RANK = 4


@dataclass(frozen=True)
class Backend:
    name: str
    service: ServiceClient
    base_model: str
    uri_scheme: str
    loss_rtol: float
    """Reported loss vs the weighted NLL recomputed from returned logprobs (same numbers, summed twice)."""
    same_weights_atol: float
    """Two computations on identical weights and data (resume vs uninterrupted; forward repeated)."""
    sampler_atol: float
    """Mean |difference| of logprobs between the training and the sampling path (different kernels)."""


def _local(tiny_model_dir: Path, root: Path) -> Backend:
    from resources.local_engine import LocalServiceClient

    service = LocalServiceClient(root=root, num_threads=1)
    return Backend("local", service, str(tiny_model_dir), "file://", 1e-5, 1e-5, 1e-3)


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
    return Backend("tinker", backend.service_client(), model, "tinker://", 1e-3, 2e-3, 0.1)


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


# -- training numerics -------------------------------------------------------------------------------------


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
    _step(original)
    expected = _logprobs(original)

    resumed = backend.service.create_training_client_from_state_with_optimizer(path).result()
    _step(resumed)
    assert _max_diff(expected, _logprobs(resumed)) <= backend.same_weights_atol

    reloaded = _new_client(backend)
    reloaded.load_state_with_optimizer(path).result()
    _step(reloaded)
    assert _max_diff(expected, _logprobs(reloaded)) <= backend.same_weights_atol

    # Weights alone restart Adam's moments, so the third step lands elsewhere: the state really is saved.
    weights_only = _new_client(backend)
    weights_only.load_state(path).result()
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
