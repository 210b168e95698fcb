"""The local engine's sampling client: SamplingParams semantics, determinism and dynamic batching."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tinker import types

from kitchen.contract import StreamingSamplingClient
from resources.local_engine import LocalSamplingClient, LocalServiceClient


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> LocalServiceClient:
    return LocalServiceClient(root=tmp_path_factory.mktemp("engine"))


@pytest.fixture
def sampler(engine: LocalServiceClient, tiny_model_dir: Path) -> LocalSamplingClient:
    """A fresh client per test (its own queue and batch log) over the process-wide cached base model."""
    return engine.create_sampling_client(base_model=str(tiny_model_dir)).result()


def prompt_of(sampler: LocalSamplingClient, text: str) -> types.ModelInput:
    return types.ModelInput.from_ints(sampler.get_tokenizer().encode(text))


def sample_one(sampler: LocalSamplingClient, text: str, **params: Any) -> types.SampledSequence:
    response = sampler.sample(prompt_of(sampler, text), 1, types.SamplingParams(**params)).result()
    assert len(response.sequences) == 1
    return response.sequences[0]


PROMPTS = [
    "what is",
    "hello world the cat sat on mat",
    "1 + 2 =",
    "you are a helpful assistant",
    "reverse word letters count number please give only result",
    "the",
    "7 + 11 = 18",
    "question answer",
]


def test_max_tokens_and_length_stop_reason(sampler: LocalSamplingClient) -> None:
    seq = sample_one(sampler, "hello world", max_tokens=7, temperature=1.0, seed=0, stop=[])
    assert seq.stop_reason == "length"
    assert len(seq.tokens) == 7
    assert seq.logprobs is not None and len(seq.logprobs) == 7
    assert all(lp <= 0 for lp in seq.logprobs)


def test_greedy_is_deterministic_and_top_k_1_or_tiny_top_p_is_greedy(sampler: LocalSamplingClient) -> None:
    greedy = sample_one(sampler, "what is the sum", max_tokens=12, temperature=0.0, stop=[])
    assert (
        sample_one(sampler, "what is the sum", max_tokens=12, temperature=0.0, stop=[]).tokens
        == greedy.tokens
    )
    response = sampler.sample(
        prompt_of(sampler, "what is the sum"),
        3,
        types.SamplingParams(max_tokens=12, temperature=0.0, stop=[]),
    ).result()
    assert [s.tokens for s in response.sequences] == [greedy.tokens] * 3
    for params in ({"top_k": 1}, {"top_p": 1e-6}):
        seq = sample_one(
            sampler, "what is the sum", max_tokens=12, temperature=1.0, seed=5, stop=[], **params
        )
        assert seq.tokens == greedy.tokens


def test_same_seed_same_samples(sampler: LocalSamplingClient) -> None:
    params = types.SamplingParams(max_tokens=16, temperature=1.0, seed=1234, stop=[])
    first = sampler.sample(prompt_of(sampler, "hello"), 4, params).result()
    second = sampler.sample(prompt_of(sampler, "hello"), 4, params).result()
    assert [s.tokens for s in first.sequences] == [s.tokens for s in second.sequences]
    assert len({tuple(s.tokens) for s in first.sequences}) > 1  # the samples of one request differ
    ids = [s.sequence_id for s in (*first.sequences, *second.sequences)]
    assert len(set(ids)) == len(ids)
    other = sampler.sample(prompt_of(sampler, "hello"), 4, params.model_copy(update={"seed": 99})).result()
    assert [s.tokens for s in other.sequences] != [s.tokens for s in first.sequences]


def _first_stop(tokens: list[int], stop_ids: set[int]) -> int:
    return next(i for i, token in enumerate(tokens) if token in stop_ids)


def test_stop_token_is_included_and_ends_generation(sampler: LocalSamplingClient) -> None:
    eos = sampler.get_tokenizer().eos_token_id
    free = sample_one(sampler, "the cat", max_tokens=20, temperature=1.0, seed=3, stop=[])
    stop_token = free.tokens[6]
    end = _first_stop(free.tokens, {stop_token, eos})
    stopped = sample_one(sampler, "the cat", max_tokens=20, temperature=1.0, seed=3, stop=[stop_token])
    assert stopped.stop_reason == "stop"
    assert stopped.tokens == free.tokens[: end + 1]
    assert stopped.tokens[-1] in (stop_token, eos)


def test_eos_stops_unless_stop_is_an_empty_list(sampler: LocalSamplingClient) -> None:
    eos = sampler.get_tokenizer().eos_token_id
    for seed in range(40):  # find a seeded sample that emits EOS
        free = sample_one(sampler, "hello", max_tokens=24, temperature=1.5, seed=seed, stop=[])
        if eos in free.tokens:
            break
    else:
        pytest.skip("the tiny model emitted no EOS in 40 seeded samples")
    default = sample_one(sampler, "hello", max_tokens=24, temperature=1.5, seed=seed)
    assert default.stop_reason == "stop"
    assert default.tokens == free.tokens[: free.tokens.index(eos) + 1]
    assert len(free.tokens) == 24 and free.stop_reason == "length"


def test_stop_string_is_included_and_matched_in_generated_text_only(sampler: LocalSamplingClient) -> None:
    tokenizer = sampler.get_tokenizer()
    eos = tokenizer.eos_token_id
    free = sample_one(sampler, "the cat", max_tokens=20, temperature=1.0, seed=8, stop=[])
    stop_text = tokenizer.decode(free.tokens[5:7])
    expected_end = next(
        i
        for i in range(len(free.tokens))
        if stop_text in tokenizer.decode(free.tokens[: i + 1]) or free.tokens[i] == eos
    )
    stopped = sample_one(sampler, "the cat", max_tokens=20, temperature=1.0, seed=8, stop=[stop_text])
    assert stopped.stop_reason == "stop"
    assert stopped.tokens == free.tokens[: expected_end + 1]
    # A stop string already in the prompt does not end generation at once.
    prompt_text = tokenizer.decode(prompt_of(sampler, "the cat").to_ints())
    in_prompt = sample_one(sampler, "the cat", max_tokens=5, temperature=0.0, stop=[prompt_text])
    assert len(in_prompt.tokens) > 1 or in_prompt.tokens[0] == eos


def test_batched_equals_unbatched(engine: LocalServiceClient, tiny_model_dir: Path) -> None:
    """Many requests in flight are generated together, with the same results as one at a time."""
    greedy = types.SamplingParams(max_tokens=10, temperature=0.0, stop=[])
    seeded = types.SamplingParams(max_tokens=10, temperature=1.0, seed=21, stop=[])

    alone = engine.create_sampling_client(base_model=str(tiny_model_dir)).result()
    expected = [
        (alone.sample(prompt_of(alone, text), 1, params).result().sequences[0], params)
        for text in PROMPTS
        for params in (greedy, seeded)
    ]
    assert max(alone.batch_sizes) == 1

    together = engine.create_sampling_client(base_model=str(tiny_model_dir)).result()
    futures = [
        together.sample(prompt_of(together, text), 1, params)
        for text in PROMPTS
        for params in (greedy, seeded)
    ]
    got = [f.result().sequences[0] for f in futures]
    assert max(together.batch_sizes) > 1
    for (want, _), have in zip(expected, got, strict=True):
        assert have.tokens == want.tokens
        assert have.stop_reason == want.stop_reason
        torch.testing.assert_close(
            torch.tensor(have.logprobs), torch.tensor(want.logprobs), atol=1e-5, rtol=0
        )


def test_calls_submitted_back_to_back_are_one_batch(
    sampler: LocalSamplingClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker waits for a run of submissions to end before it generates, rather than generating the
    first call alone (a wide settling window, so a loaded machine cannot split the run)."""
    from resources.local_engine import sampling

    monkeypatch.setattr(sampling, "SETTLE_S", 0.25)
    params = types.SamplingParams(max_tokens=2, temperature=0.0)
    futures = [sampler.sample(prompt_of(sampler, text), 1, params) for text in PROMPTS]
    assert all(len(f.result().sequences[0].tokens) >= 1 for f in futures)
    assert sampler.batch_sizes == [len(PROMPTS)]


def test_batches_respect_max_sampling_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    client = (
        LocalServiceClient(root=tmp_path, max_sampling_batch=3)
        .create_sampling_client(base_model=str(tiny_model_dir))
        .result()
    )
    params = types.SamplingParams(max_tokens=3, temperature=0.0)
    futures = [client.sample(prompt_of(client, text), 2, params) for text in PROMPTS]
    assert all(len(f.result().sequences) == 2 for f in futures)
    assert max(client.batch_sizes) <= 3
    assert sum(client.batch_sizes) == 2 * len(PROMPTS)


def test_logprobs_agree_across_sample_prompt_logprobs_and_compute_logprobs(
    sampler: LocalSamplingClient,
) -> None:
    prompt = prompt_of(sampler, "you are a helpful assistant")
    response = sampler.sample(
        prompt,
        1,
        types.SamplingParams(max_tokens=6, temperature=1.0, seed=4, stop=[]),
        include_prompt_logprobs=True,
    ).result()
    seq = response.sequences[0]
    scored = sampler.compute_logprobs(types.ModelInput.from_ints([*prompt.to_ints(), *seq.tokens])).result()
    assert scored[0] is None and response.prompt_logprobs is not None
    assert response.prompt_logprobs[0] is None and len(response.prompt_logprobs) == prompt.length
    # Not bit-equal: the prompt was scored alone and as the prefix of a longer sequence, and matmul kernels
    # block and sum differently for different shapes (float32 rounding: up to ~5e-7 on the tiny model).
    torch.testing.assert_close(
        torch.tensor(response.prompt_logprobs[1:]), torch.tensor(scored[1 : prompt.length]), atol=1e-5, rtol=0
    )
    assert seq.logprobs is not None
    torch.testing.assert_close(
        torch.tensor(seq.logprobs), torch.tensor(scored[prompt.length :]), atol=1e-5, rtol=0
    )
    assert sampler.compute_logprobs(types.ModelInput.from_ints([5])).result() == [None]


def test_invalid_requests_are_refused_at_submission(sampler: LocalSamplingClient) -> None:
    prompt = prompt_of(sampler, "hello")
    with pytest.raises(ValueError, match="empty"):
        sampler.sample(types.ModelInput.from_ints([]), 1, types.SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="max_tokens"):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="temperature"):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2, temperature=-1.0))
    with pytest.raises(ValueError, match="num_samples"):
        sampler.sample(prompt, 0, types.SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="context window"):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=10_000))
    with pytest.raises(ValueError, match="vocabulary"):
        sampler.compute_logprobs(types.ModelInput.from_ints([1, 10_000]))


def test_sample_streaming_reports_each_token_as_generated(sampler: LocalSamplingClient) -> None:
    """``sample_streaming`` (``StreamingSamplingClient``) gives exactly ``sample``'s result, and every token
    reaches the listener, in order and by choice, before that result exists; a listener that raises loses
    its stream, not the request, nor a request batched with it."""
    assert isinstance(sampler, StreamingSamplingClient)
    params = types.SamplingParams(max_tokens=12, temperature=1.0, seed=5, stop=[])
    prompt = prompt_of(sampler, "hello world the cat")
    want = sampler.sample(prompt, 3, params).result().sequences
    heard: list[tuple[int, int, bool]] = []
    submitted: list[Any] = []

    def listen(index: int, token: int) -> None:
        heard.append((index, token, bool(submitted) and submitted[0].done()))

    def deaf(index: int, token: int) -> None:
        raise RuntimeError("the client went away")

    other = sampler.sample_streaming(prompt_of(sampler, "the"), 1, params, deaf)
    submitted.append(sampler.sample_streaming(prompt, 3, params, listen))
    got = submitted[0].result().sequences
    assert [s.tokens for s in got] == [s.tokens for s in want]
    assert [[t for i, t, _ in heard if i == c] for c in range(3)] == [s.tokens for s in want]
    assert not any(done for _, _, done in heard)  # all heard before the result was set
    assert len(other.result().sequences[0].tokens) == 12  # the deaf listener's request still finished
