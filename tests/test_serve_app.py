"""The serving app in-process on the tiny model's base weights: wire format, stops, limits, batching.

``tests/test_serve.py`` runs ``kitchen serve`` itself on a registered version with the ``openai`` client;
this module covers what is quicker to check without a subprocess. Expected texts come from the local
engine's sampler called directly with the chat template applied by the tokenizer, not through the app.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from test_registry_support import fake_trained_model, register
from tinker import types

from kitchen import telemetry
from kitchen.contract import StreamingSamplingClient
from kitchen.registry import ModelRegistry
from kitchen.registry.names import parse_model_ref
from kitchen.serve import Batcher, ModelSource, RegistryLocator, SamplerLocator, ServeSettings, create_app
from kitchen.serve.feedback import FeedbackStore
from resources.futures import EngineFuture, resolved
from resources.local_engine import LocalSamplingClient, LocalServiceClient

KEY = "serve-test-key-0123456789"
QUESTION = [{"role": "user", "content": "What is 17 + 25?"}]


class BaseLocator:
    """The tiny model's base weights as the served model (no registry needed here)."""

    def __init__(self, model_dir: Path) -> None:
        self.name = "tiny"
        self._dir = str(model_dir)

    def current_version(self) -> str:
        return "tiny"

    def sampler_path(self, version: str) -> str:
        return self._dir


@pytest.fixture(scope="module")
def service() -> LocalServiceClient:
    return LocalServiceClient(num_threads=1)


@pytest.fixture(scope="module")
def sampler(service: LocalServiceClient, tiny_model_dir: Path) -> LocalSamplingClient:
    client = service.create_sampling_client(base_model=str(tiny_model_dir)).result()
    assert isinstance(client, LocalSamplingClient)
    return client


@pytest.fixture
def feedback_db(tmp_path: Path) -> Path:
    return tmp_path / "feedback.db"


@pytest.fixture
def http(service: LocalServiceClient, tiny_model_dir: Path, feedback_db: Path) -> Iterator[TestClient]:
    source = ModelSource(
        BaseLocator(tiny_model_dir),
        lambda path: service.create_sampling_client(base_model=path).result(),
        poll_s=None,
    )
    settings = ServeSettings(api_key=KEY, max_tokens_limit=32, max_request_bytes=4096, max_n=4)
    app = create_app(source, settings, FeedbackStore(feedback_db))
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


def expected(
    sampler: LocalSamplingClient, messages: list[dict[str, str]], **params: Any
) -> tuple[list[types.SampledSequence], int]:
    """Sequences the sampler gives for ``messages`` rendered by the tokenizer's chat template."""
    tokenizer = sampler.get_tokenizer()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = params.pop("n", 1)
    sampling = types.SamplingParams(stop=[tokenizer.eos_token], **params)
    return sampler.sample(types.ModelInput.from_ints(ids), n, sampling).result().sequences, len(ids)


def decode(sampler: LocalSamplingClient, sequence: types.SampledSequence) -> str:
    return str(sampler.get_tokenizer().decode(sequence.tokens, skip_special_tokens=True))


def chat(http: TestClient, **body: Any) -> Any:
    return chat_as(http, "tiny", **body)


def test_greedy_completion_matches_the_sampler(http: TestClient, sampler: LocalSamplingClient) -> None:
    sequences, prompt_tokens = expected(sampler, QUESTION, max_tokens=16, temperature=0.0)
    response = chat(http, max_tokens=16, temperature=0)
    assert response.status_code == 200
    assert response.headers["x-kitchen-model-version"] == "tiny"
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "tiny"
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": decode(sampler, sequences[0])}
    assert choice["finish_reason"] == ("stop" if sequences[0].stop_reason == "stop" else "length")
    tokens = len(sequences[0].tokens)
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": tokens,
        "total_tokens": prompt_tokens + tokens,
    }


def test_seeded_samples_and_stop_sequences(http: TestClient, sampler: LocalSamplingClient) -> None:
    sequences, _ = expected(sampler, QUESTION, max_tokens=12, temperature=1.0, top_p=0.9, seed=7, n=3)
    body = chat(http, max_tokens=12, temperature=1.0, top_p=0.9, seed=7, n=3).json()
    assert [c["message"]["content"] for c in body["choices"]] == [decode(sampler, s) for s in sequences]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]

    # A stop sequence from the middle of a seeded answer: the same answer ends just before it.
    full = decode(sampler, expected(sampler, QUESTION, max_tokens=24, temperature=1.0, seed=3)[0][0])
    cut = next(
        i
        for i in range(2, len(full) - 2)
        if full[i : i + 2].isascii() and full[i : i + 2].isalnum() and full.find(full[i : i + 2]) == i
    )
    body = chat(http, max_tokens=24, temperature=1.0, seed=3, stop=["\x00never", full[cut : cut + 2]]).json()
    assert body["choices"][0]["message"]["content"] == full[:cut]
    assert body["choices"][0]["finish_reason"] == "stop"


def test_streaming_sends_the_same_answer_as_sse(http: TestClient, sampler: LocalSamplingClient) -> None:
    sequences, prompt_tokens = expected(sampler, QUESTION, max_tokens=10, temperature=0.0)
    body = {"max_tokens": 10, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    request = {"model": "tiny", "messages": QUESTION, **body}
    with http.stream("POST", "/v1/chat/completions", json=request) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "tiny" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks[1:] if c["choices"]]
    assert "".join(p or "" for p in pieces) == decode(sampler, sequences[0])
    assert len([p for p in pieces if p]) > 1  # sent as it formed, not as one piece at the end
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == prompt_tokens


class HeldBack:
    """Test-only ``StreamingSamplingClient``: reports the local sampler's tokens at once but holds the
    result back until released, so text that reaches the client before the release was streamed."""

    def __init__(self, inner: LocalSamplingClient) -> None:
        self.inner = inner
        self.release = threading.Event()
        self.timed_out = False

    def sample(self, prompt: types.ModelInput, n: int, params: types.SamplingParams) -> Any:
        return self.inner.sample(prompt, n, params)

    def compute_logprobs(self, prompt: types.ModelInput) -> Any:
        return self.inner.compute_logprobs(prompt)

    def get_tokenizer(self) -> Any:
        return self.inner.get_tokenizer()

    def sample_streaming(
        self, prompt: types.ModelInput, n: int, params: types.SamplingParams, on_token: Any
    ) -> EngineFuture[types.SampleResponse]:
        response = self.inner.sample(prompt, n, params).result()
        held: EngineFuture[types.SampleResponse] = EngineFuture()

        def play() -> None:
            for index, sequence in enumerate(response.sequences):
                for token in sequence.tokens:
                    on_token(index, token)
            self.timed_out = not self.release.wait(30)
            held.set_result(response)

        threading.Thread(target=play, daemon=True).start()
        return held


def test_streamed_text_arrives_before_the_generation_ends(
    service: LocalServiceClient, tiny_model_dir: Path, sampler: LocalSamplingClient
) -> None:
    client = HeldBack(sampler)
    assert isinstance(client, StreamingSamplingClient)
    source = ModelSource(BaseLocator(tiny_model_dir), lambda _: client, poll_s=None)  # type: ignore[arg-type,return-value]
    [sequence], _ = expected(sampler, QUESTION, max_tokens=10, temperature=0.0)
    whole, streamed = decode(sampler, sequence), ""
    request = {"model": "tiny", "messages": QUESTION, "max_tokens": 10, "temperature": 0, "stream": True}
    with (
        TestClient(create_app(source, ServeSettings())) as http,
        http.stream("POST", "/v1/chat/completions", json=request) as response,
    ):
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                assert choice["finish_reason"] is None or client.release.is_set()
                streamed += choice["delta"].get("content") or ""
            if streamed == whole:
                client.release.set()  # the whole reply arrived while its result was still held back
    assert streamed == whole and not client.timed_out


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "other"}, 404, "model"),
        ({"max_tokens": 33}, 400, "max_tokens"),
        ({"max_completion_tokens": 100}, 400, "max_completion_tokens"),
        ({"messages": []}, 400, "messages"),
        ({"temperature": 2.5}, 400, "temperature"),
        ({"n": 5}, 400, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ],
)
def test_bad_requests_get_openai_errors(
    http: TestClient, body: dict[str, Any], status: int, param: str
) -> None:
    response = http.post("/v1/chat/completions", json={"model": "tiny", "messages": QUESTION, **body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_malformed_oversized_and_unauthorised(http: TestClient) -> None:
    bad = http.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers=_json())
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]}
    huge = http.post("/v1/chat/completions", json=big)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    for headers in ({"Authorization": "Bearer wrong-key"}, {"Authorization": ""}):
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
            denied = http.request(method, path, json={"model": "tiny", "messages": QUESTION}, headers=headers)
            assert denied.status_code == 401, (headers, path)
            assert denied.json()["error"]["code"] == "invalid_api_key"
            assert KEY not in denied.text and "wrong-key" not in denied.text
    assert http.get("/health").json()["version"] == "tiny"  # health needs no key
    assert http.get("/nowhere").json()["error"]["type"] == "not_found"
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]


def _json() -> dict[str, str]:
    return {"Content-Type": "application/json"}


def test_concurrent_requests_are_generated_together(sampler: LocalSamplingClient) -> None:
    """Eight requests arriving together reach the engine as one submission and one generation batch,
    and each still gets exactly what it would have got alone."""
    tokenizer = sampler.get_tokenizer()
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"What is {i} + {i}?"}], tokenize=False, add_generation_prompt=True
        )
        for i in range(8)
    ]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    params = types.SamplingParams(max_tokens=8, temperature=0.0, stop=[tokenizer.eos_token])
    alone = [sampler.sample(types.ModelInput.from_ints(p), 1, params).result() for p in prompts]
    before = len(sampler.batch_sizes)

    async def together() -> list[types.SampleResponse]:
        batcher = Batcher(window_s=0.05)
        batcher.start()
        try:
            return await asyncio.gather(
                *(batcher.sample(sampler, types.ModelInput.from_ints(p), 1, params) for p in prompts)
            )
        finally:
            assert batcher.stats.submissions == 1 and batcher.stats.largest == 8
            await batcher.stop()

    batched = asyncio.run(together())
    assert [r.sequences[0].tokens for r in batched] == [r.sequences[0].tokens for r in alone]
    assert max(sampler.batch_sizes[before:]) > 1  # the engine generated several requests as one batch


def test_deployment_asset_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The optional ``deployment`` asset is off without a server named; bad values name the variable."""
    from kitchen.workflows import get_workflow
    from kitchen_assets.deployment import deployment_settings

    supervised = get_workflow("supervised")
    for name in ("KITCHEN_DEPLOYMENT_URL", "KITCHEN_SUPERVISED_DEPLOYMENT_URL", "KITCHEN_DEPLOYMENT_WAIT_S"):
        monkeypatch.delenv(name, raising=False)
    assert deployment_settings(supervised) is None
    monkeypatch.setenv("KITCHEN_DEPLOYMENT_URL", "http://127.0.0.1:8000/{workflow}/")
    settings = deployment_settings(supervised)
    assert settings is not None and settings.wait_s == 30
    assert settings.url == "http://127.0.0.1:8000/supervised"
    monkeypatch.setenv("KITCHEN_SUPERVISED_DEPLOYMENT_URL", "127.0.0.1:8000")
    with pytest.raises(ValueError, match=re.escape("KITCHEN_SUPERVISED_DEPLOYMENT_URL='127.0.0.1:8000'")):
        deployment_settings(supervised)
    monkeypatch.delenv("KITCHEN_SUPERVISED_DEPLOYMENT_URL")
    monkeypatch.setenv("KITCHEN_DEPLOYMENT_WAIT_S", "soon")
    with pytest.raises(ValueError, match="KITCHEN_DEPLOYMENT_WAIT_S='soon'"):
        deployment_settings(supervised)


def test_feedback_is_kept_with_the_prompt_reply_and_version(http: TestClient, feedback_db: Path) -> None:
    received: list[telemetry.TelemetryEvent] = []
    with telemetry.attached_handler("serve-feedback-test", telemetry.FEEDBACK_RECEIVED, received.append):
        _feedback_round_trip(http, feedback_db)
    # kitchen.feedback.received: one per stored POST /v1/feedback, none for a refused one, no texts.
    stored = FeedbackStore(feedback_db).feedback()
    session = http.get("/health").json()["session"]
    assert session.startswith("serve-")
    assert [(e.metadata["run_id"], e.metadata["workflow"]) for e in received] == [(session, "serve")] * 3
    assert [e.metadata["feedback_id"] for e in received] == [f.id for f in stored]
    assert [(e.measurements["seq"], e.measurements["choice_index"]) for e in received] == [
        (f.seq, f.choice_index) for f in stored
    ]
    assert [(e.metadata["rating"], e.metadata["corrected"]) for e in received] == [
        ("down", True),
        (None, False),
        ("up", False),
    ]
    assert [e.measurements.get("score") for e in received] == [None, 0.5, None]
    assert all(e.metadata["model_version"] == "tiny" for e in received)
    assert all("42" not in e.metadata.values() for e in received)  # never the correction's text


def _feedback_round_trip(http: TestClient, feedback_db: Path) -> None:
    body = chat(http, max_tokens=8, temperature=1.0, seed=1, n=2).json()
    cid, replies = body["id"], [c["message"]["content"] for c in body["choices"]]
    down = http.post("/v1/feedback", json={"completion_id": cid, "rating": "down", "correction": "42"})
    assert down.status_code == 200, down.text
    receipt = down.json()
    assert receipt["object"] == "feedback" and receipt["completion_id"] == cid and receipt["model"] == "tiny"
    scored = http.post("/v1/feedback", json={"completion_id": cid, "choice_index": 1, "score": 0.5})
    assert scored.status_code == 200
    request = {"model": "tiny", "messages": QUESTION, "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=request) as streamed:
        events = [line[6:] for line in streamed.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    first = json.loads(events[0])
    up = http.post("/v1/feedback", json={"completion_id": first["id"], "rating": "up"})
    assert up.status_code == 200  # streamed completions are kept too

    # Refused feedback gets the matching 4xx and stores nothing.
    refused = [
        ({"completion_id": "chatcmpl-unknown", "rating": "up"}, 404, "completion_not_found"),
        ({"completion_id": cid, "choice_index": 2, "rating": "up"}, 404, "completion_not_found"),
        ({"completion_id": cid}, 400, "invalid_value"),
        ({"completion_id": cid, "rating": "meh"}, 400, "invalid_value"),
        ({"completion_id": cid, "rating": "up", "comment": "?"}, 400, "invalid_value"),
    ]
    for payload, status, code in refused:
        response = http.post("/v1/feedback", json=payload)
        assert response.status_code == status and response.json()["error"]["code"] == code, payload
    denied = http.post(
        "/v1/feedback", json={"completion_id": cid, "rating": "up"}, headers={"Authorization": ""}
    )
    assert denied.status_code == 401
    # A refused completion request is not kept either.
    kept = FeedbackStore(feedback_db).completion_count()
    assert chat(http, max_tokens=999).status_code == 400
    assert FeedbackStore(feedback_db).completion_count() == kept == 2

    stored = FeedbackStore(feedback_db).feedback()  # a fresh store on the same file: it is durable
    assert [(f.completion_id, f.choice_index, f.rating, f.score, f.correction) for f in stored] == [
        (cid, 0, "down", None, "42"),
        (cid, 1, None, 0.5, None),
        (first["id"], 0, "up", None, None),
    ]
    assert [f.reply for f in stored[:2]] == replies
    assert all(f.messages == QUESTION and f.model_version == "tiny" for f in stored)
    assert [f.seq for f in FeedbackStore(feedback_db).feedback(after_seq=stored[1].seq)] == [stored[2].seq]


def test_a_failing_registry_check_keeps_the_served_version(sampler: LocalSamplingClient) -> None:
    """The source swaps versions only on a successful check; a failing one is recorded, not fatal."""

    class MovingLocator:
        name = "m@champion"

        def __init__(self) -> None:
            self.answers: list[str | Exception] = ["m/1", RuntimeError("registry down"), "m/2"]
            self.opened: list[str] = []

        def current_version(self) -> str:
            answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            if isinstance(answer, Exception):
                raise answer
            return answer

        def sampler_path(self, version: str) -> str:
            return f"path-of-{version}"

    locator = MovingLocator()

    def open_sampler(path: str) -> LocalSamplingClient:
        locator.opened.append(path)
        return sampler

    source = ModelSource(locator, open_sampler, poll_s=None)
    assert source.load().version == "m/1"
    assert source.refresh() is False and source.served.version == "m/1"
    assert source.last_error == "RuntimeError: registry down"
    assert source.refresh() is True and source.served.version == "m/2" and source.last_error is None
    assert source.refresh() is False  # unchanged: nothing reopened
    assert locator.opened == ["path-of-m/1", "path-of-m/2"]


class TinkerStandIn:
    """Test-only: what ``kitchen serve`` asks of Tinker's ``ServiceClient``, a sampling client for a
    ``tinker://`` sampler path; it answers with the tiny model's local sampler (the same contract)."""

    def __init__(self, sampler: LocalSamplingClient) -> None:
        self.sampler = sampler
        self.opened: list[str] = []

    def create_sampling_client(self, model_path: str) -> EngineFuture[LocalSamplingClient]:
        if not model_path.startswith("tinker://"):
            raise ValueError(f"the Tinker stand-in holds tinker:// paths only, not {model_path!r}")
        self.opened.append(model_path)
        return resolved(self.sampler)


def test_a_tinker_trained_version_is_served_from_its_sampler_path(
    sampler: LocalSamplingClient, tmp_path: Path
) -> None:
    """A Tinker-trained version keeps its weights on Tinker: the registry names a ``tinker://`` sampler
    path, which the server opens through the backend's ``create_sampling_client`` like any other path.
    Offline, the stand-in plays Tinker; the alias, the path, the version in answers and feedback, and a
    bare ``tinker://`` reference are the server's part, checked here."""
    registry = ModelRegistry(
        f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=(tmp_path / "mlruns").as_uri()
    )
    trained = fake_trained_model(tmp_path, seed=40, exact_match=0.5, tinker=True)
    path = register(registry, trained, "run-tinker", name="tinker-sft").manifest.source
    assert path == "tinker://session-40/sampler_weights/final"
    locator = RegistryLocator(registry, parse_model_ref("models:/tinker-sft@champion"))
    assert locator.backend() == "tinker"  # so `kitchen serve` opens it with the Tinker backend
    tinker = TinkerStandIn(sampler)
    sequences, _ = expected(sampler, QUESTION, max_tokens=8, temperature=0.0)
    store = FeedbackStore(tmp_path / "feedback.db")

    @contextmanager
    def serve(source: ModelSource) -> Iterator[TestClient]:
        with TestClient(create_app(source, ServeSettings(), store)) as client:
            yield client

    registered = ModelSource(
        locator, lambda p: tinker.create_sampling_client(model_path=p).result(), poll_s=None
    )
    with serve(registered) as http:
        body = chat_as(http, "tinker-sft@champion", max_tokens=8, temperature=0).json()
        assert body["model"] == "tinker-sft/1"
        assert body["choices"][0]["message"]["content"] == decode(sampler, sequences[0])
        rated = http.post("/v1/feedback", json={"completion_id": body["id"], "rating": "up"})
        assert rated.status_code == 200 and rated.json()["model"] == "tinker-sft/1"
    assert tinker.opened == [path]

    pinned = ModelSource(  # a fixed version, as `kitchen serve models:/NAME/1` serves it
        RegistryLocator(registry, parse_model_ref("models:/tinker-sft/1")),
        lambda p: tinker.create_sampling_client(model_path=p).result(),
        poll_s=None,
    )
    with serve(pinned) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tinker-sft/1"]
        assert chat_as(http, "tinker-sft/1", max_tokens=8, temperature=0).json()["model"] == "tinker-sft/1"
    assert tinker.opened == [path, path]

    bare = ModelSource(
        SamplerLocator(path), lambda p: tinker.create_sampling_client(model_path=p).result(), poll_s=None
    )
    with serve(bare) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [path]
        body = chat_as(http, path, max_tokens=8, temperature=0).json()
        assert body["model"] == path
        assert body["choices"][0]["message"]["content"] == decode(sampler, sequences[0])
    assert tinker.opened == [path, path, path]
    assert [(f.model_version, f.rating) for f in store.feedback()] == [("tinker-sft/1", "up")]


def chat_as(http: TestClient, model: str, **body: Any) -> Any:
    return http.post("/v1/chat/completions", json={"model": model, "messages": QUESTION, **body})
