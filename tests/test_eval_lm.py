"""KitchenLM against lm-eval's own expectations, on the tiny model through the local engine's client."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from lm_eval.api.instance import Instance
from tinker import types

from kitchen.contract import SamplingClient
from kitchen.eval.lm import KitchenLM


class RecordingClient:
    """Delegates to a real client, logging each submission and each wait, in order."""

    def __init__(self, inner: SamplingClient) -> None:
        self.inner = inner
        self.log: list[str] = []
        self.sampled: list[tuple[list[int], types.SamplingParams, list[int]]] = []

    def _track(self, kind: str, future: Any, on_result: Any = None) -> Any:
        self.log.append(f"submit:{kind}")
        log = self.log

        class Tracked:
            def result(self, timeout: float | None = None) -> Any:
                log.append(f"result:{kind}")
                value = future.result(timeout)
                if on_result is not None:
                    on_result(value)
                return value

        return Tracked()

    def sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
    ) -> Any:
        future = self.inner.sample(prompt, num_samples, sampling_params, include_prompt_logprobs)
        record = (list(prompt.to_ints()), sampling_params)
        return self._track(
            "sample", future, lambda r: self.sampled.append((*record, list(r.sequences[0].tokens)))
        )

    def compute_logprobs(self, prompt: types.ModelInput) -> Any:
        return self._track("logprobs", self.inner.compute_logprobs(prompt))

    def get_tokenizer(self) -> Any:
        return self.inner.get_tokenizer()


@pytest.fixture(scope="module")
def engine_client(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SamplingClient:
    from resources.local_engine import LocalServiceClient

    service = LocalServiceClient(root=tmp_path_factory.mktemp("engine"))
    return service.create_sampling_client(base_model=str(tiny_model_dir)).result()


@pytest.fixture
def client(engine_client: SamplingClient) -> RecordingClient:
    return RecordingClient(engine_client)


@pytest.fixture
def lm(client: RecordingClient) -> KitchenLM:
    return KitchenLM(client, max_length=256, skip_greedy_for=["nll_only"])


def request(kind: str, args: tuple[Any, ...], task: str = "some_task") -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0, metadata=(task, 0, 1))  # type: ignore[arg-type]


def direct_logprobs(client: RecordingClient, tokens: list[int]) -> list[float | None]:
    return client.inner.compute_logprobs(types.ModelInput.from_ints(tokens)).result()


def summed(logprobs: list[float | None]) -> float:
    assert all(lp is not None for lp in logprobs)
    return math.fsum(lp for lp in logprobs if lp is not None)


def test_loglikelihood_is_the_clients_summed_logprobs(lm: KitchenLM, client: RecordingClient) -> None:
    context, continuation = "What is 2 + 3?", " the answer is 5"
    ((loglikelihood, is_greedy),) = lm.loglikelihood([request("loglikelihood", (context, continuation))])
    # lm-eval's causal split: encode the whole, take the context's tokens off the front.
    whole, n_context = lm.tok_encode(context + continuation), len(lm.tok_encode(context))
    expected = summed(direct_logprobs(client, whole)[n_context:])
    assert loglikelihood == pytest.approx(expected, abs=1e-4)
    assert loglikelihood < 0 and isinstance(is_greedy, bool)
    assert lm.continuation_length(context, continuation) == len(whole) - n_context


def test_empty_context_is_conditioned_on_the_prefix_token(lm: KitchenLM, client: RecordingClient) -> None:
    ((loglikelihood, _),) = lm.loglikelihood([request("loglikelihood", ("", "hello world"))])
    tokens = [lm.prefix_token_id, *lm.tok_encode("hello world")]
    expected = summed(direct_logprobs(client, tokens)[1:])
    assert loglikelihood == pytest.approx(expected, abs=1e-4)


def test_is_greedy_exactly_for_the_greedy_continuation(lm: KitchenLM, client: RecordingClient) -> None:
    context = lm.tok_encode("hello world")
    params = types.SamplingParams(max_tokens=3, temperature=0.0, stop=[])
    response = client.inner.sample(types.ModelInput.from_ints(context), 1, params).result()
    greedy = list(response.sequences[0].tokens)
    other = [*greedy[:-1], (greedy[-1] + 1) % len(lm.tokenizer)]
    results = lm._loglikelihood_tokens([(None, context, greedy), (None, context, other)])
    assert [is_greedy for _, is_greedy in results] == [True, False]


def test_tasks_that_never_read_is_greedy_skip_the_check(lm: KitchenLM, client: RecordingClient) -> None:
    lm.loglikelihood([request("loglikelihood", ("hello", " world cat"), task="nll_only")])
    assert "submit:sample" not in client.log


def test_every_request_is_submitted_before_any_is_awaited(lm: KitchenLM, client: RecordingClient) -> None:
    requests = [request("loglikelihood", (f"What is {i} + {i}?", f" {2 * i}")) for i in range(5)]
    lm.loglikelihood(requests)
    first_wait = next(i for i, entry in enumerate(client.log) if entry.startswith("result"))
    assert client.log[:first_wait] == ["submit:logprobs"] * 5
    client.log.clear()
    lm.generate_until(
        [request("generate_until", (f"q{i}", {"until": ["x"], "max_gen_toks": 3})) for i in "abcd"]
    )
    assert client.log[:4] == ["submit:sample"] * 4


def test_greedy_generate_until_stops_at_until(lm: KitchenLM, client: RecordingClient) -> None:
    context = "hello world"
    (free,) = lm.generate_until([request("generate_until", (context, {"until": [], "max_gen_toks": 8}))])
    assert free.startswith(" world world")  # the tiny model repeats itself greedily
    until = {"until": ["ld w"], "max_gen_toks": 8}
    (stopped,) = lm.generate_until([request("generate_until", (context, until))])
    assert stopped == free.split("ld w")[0] == " wor"
    prompt, params, tokens = client.sampled[-1]
    assert prompt == lm.tok_encode(context)
    assert params.temperature == 0.0 and params.stop == ["ld w", lm.tokenizer.eos_token]
    assert len(tokens) < 8  # the sampler itself stopped at the stop string, not at max_gen_toks


def test_generation_ends_at_a_special_token(lm: KitchenLM) -> None:
    eos = lm.tokenizer.eos_token_id
    assert lm._decode_until([*lm.tok_encode(" 42"), eos, *lm.tok_encode(" more")], []) == " 42"


def test_generation_settings_the_client_cannot_honour_are_refused(lm: KitchenLM) -> None:
    bad = request("generate_until", ("hi", {"until": [], "repetition_penalty": 1.3}))
    with pytest.raises(ValueError, match="repetition_penalty"):
        lm.generate_until([bad])


def test_loglikelihood_rolling_scores_every_token_once(lm: KitchenLM, client: RecordingClient) -> None:
    text = "the cat sat on the mat"
    (total,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", (text,))])
    tokens = [lm.prefix_token_id, *lm.tok_encode(text)]
    assert total == pytest.approx(summed(direct_logprobs(client, tokens)[1:]), abs=1e-4)
    # Windows shorter than the text still score each token exactly once, just with less context.
    short = KitchenLM(client, max_length=4)
    (windowed,) = short.loglikelihood_rolling([request("loglikelihood_rolling", (text,))])
    assert math.isfinite(windowed) and windowed != pytest.approx(total, abs=1e-4)
