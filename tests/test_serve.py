"""``kitchen serve`` on the version a tiny supervised run registers, driven by the official ``openai`` client.

One server process for the module, started as a user would (``python -m kitchen.cli serve
models:/NAME@champion``) on a free port with a bearer key in ``KITCHEN_SERVE_API_KEY``. Expected answers
come from the local engine in this process: the registered adapter opened directly and sampled with the
same seed on the prompt the tokenizer's chat template renders. The last tests move ``champion`` to a
second version with different weights and read the server's whole output for the key.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import openai
import pytest
from tinker import types

from kitchen import telemetry
from kitchen.cli import main
from kitchen.hashing import ADAPTER_FILES, hash_file, hash_json
from kitchen.manifests import DeploymentManifest, FeedbackDataManifest
from kitchen.registry import ModelRegistry, default_tracking_uri
from kitchen.registry.loading import sampler_path
from kitchen.registry.register import DESCRIPTOR
from kitchen.registry.store import MODEL_ARTIFACT_DIR, WEIGHTS_HASH_TAG
from kitchen.serve.feedback import FeedbackStore
from kitchen.workflows import get_workflow
from kitchen_assets.definitions import service_resources
from kitchen_assets.feedback import FEEDBACK_KEY, FeedbackSettings, feedback_asset
from kitchen_assets.io import ManifestIOManager, read_manifest
from kitchen_assets.workflows import workflow_assets
from resources.local_engine import LocalServiceClient
from resources.local_engine.checkpoints import SAMPLER_MANIFEST
from resources.mlflow_registry import MlflowRegistry
from resources.training import LocalBackend
from tests.champion_home import home_with_tiny_champion

NAME = "supervised-tiny-kitchen-arithmetic"
REF = f"models:/{NAME}@champion"
KEY = "ksk-canary-SERVE-0123456789abcdef"
WRONG = "ksk-wrong-9876543210fedcba"
REPO = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "What is 17 + 25?"}]
LIMIT = 48
DEPLOYMENT = dg.AssetKey(["supervised", "deployment"])


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """One tiny supervised run: its champion (v1) is what the server starts on."""
    return home_with_tiny_champion(tmp_path_factory, tiny_model_dir, "serve")


@pytest.fixture(autouse=True)
def kitchen_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Overrides conftest's per-test home: the tests share the module's registry and server."""
    monkeypatch.setenv("KITCHEN_HOME", str(home))
    yield home


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def health(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/health", timeout=10)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    env = {**os.environ, "KITCHEN_HOME": str(home), "KITCHEN_SERVE_API_KEY": KEY, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "kitchen.cli", "serve", REF, "--port", str(port)]
    command += ["--poll-interval", "0.5", "--max-tokens-limit", str(LIMIT)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    served = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                served.health()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
        yield served
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def engine(home: Path) -> LocalServiceClient:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KITCHEN_HOME", str(home))
        return LocalServiceClient(num_threads=1)


def expected(
    engine: LocalServiceClient, version: str, messages: list[dict[str, str]], n: int = 1, **params: Any
) -> tuple[list[str], list[types.SampledSequence], int]:
    """Texts (special tokens dropped), sequences and prompt length the registered ``version`` gives."""
    path, _ = sampler_path(ModelRegistry(default_tracking_uri()), f"{NAME}/{version}")
    client = engine.create_sampling_client(model_path=path).result()
    tokenizer = client.get_tokenizer()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    sampling = types.SamplingParams(stop=[tokenizer.eos_token], **params)
    sequences = client.sample(types.ModelInput.from_ints(ids), n, sampling).result().sequences
    texts = [tokenizer.decode(s.tokens, skip_special_tokens=True) for s in sequences]
    return texts, sequences, len(ids)


def _client(server: Server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def test_openai_client_plain_and_streaming(server: Server, engine: LocalServiceClient, home: Path) -> None:
    client = _client(server)
    assert {m.id for m in client.models.list()} == {f"{NAME}@champion", f"{NAME}/1"}

    texts, sequences, prompt_tokens = expected(engine, "1", QUESTION, max_tokens=16, temperature=1.0, seed=5)
    raw = client.chat.completions.with_raw_response.create(
        model=REF, messages=QUESTION, max_tokens=16, temperature=1.0, seed=5
    )
    assert raw.headers["x-kitchen-model-version"] == f"{NAME}/1"
    completion = raw.parse()
    assert completion.model == f"{NAME}/1"
    assert completion.choices[0].message.content == texts[0]
    assert completion.choices[0].finish_reason == ("stop" if sequences[0].stop_reason == "stop" else "length")
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == prompt_tokens
    assert completion.usage.completion_tokens == len(sequences[0].tokens)

    # Feedback on it is kept (in the home's feedback.db) with the prompt, the reply and the version.
    rated = httpx.post(
        f"{server.url}/v1/feedback",
        json={"completion_id": completion.id, "rating": "down", "correction": "42"},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert rated.status_code == 200 and rated.json()["model"] == f"{NAME}/1"
    [kept] = [f for f in FeedbackStore(home / "feedback.db").feedback() if f.completion_id == completion.id]
    assert (kept.messages, kept.reply, kept.model_version) == (QUESTION, texts[0], f"{NAME}/1")
    assert (kept.rating, kept.correction) == ("down", "42")
    # ... and announced to the telemetry sinks: the JSONL sink's file for the serving session.
    session = server.health()["session"]
    lines = [json.loads(line) for line in (home / "telemetry" / f"{session}.jsonl").read_text().splitlines()]
    [received] = [e for e in lines if e["metadata"]["completion_id"] == completion.id]
    assert received["name"] == "kitchen.feedback.received"
    assert received["metadata"]["feedback_id"] == rated.json()["id"] == kept.id
    assert (received["metadata"]["model_version"], received["metadata"]["rating"]) == (f"{NAME}/1", "down")
    # ... and the feedback asset makes it a preference pair: the correction chosen over the served reply.
    with dg.DagsterInstance.ephemeral() as instance:
        store = FeedbackSettings(home / "feedback.db")
        assert dg.materialize(
            [feedback_asset(store)], instance=instance, resources={"io_manager": ManifestIOManager()}
        ).success
    batch = read_manifest(FEEDBACK_KEY)
    assert isinstance(batch, FeedbackDataManifest) and batch.pairs_path is not None
    pairs = [json.loads(line) for line in Path(batch.pairs_path).read_text().splitlines()]
    assert {"prompt": QUESTION, "chosen": "42", "rejected": texts[0]} in pairs

    # Several seeded choices, the name without models:/, and the same answers streamed.
    texts, _, _ = expected(engine, "1", QUESTION, n=2, max_tokens=12, temperature=0.8, top_p=0.95, seed=11)
    both = client.chat.completions.create(
        model=f"{NAME}@champion", messages=QUESTION, max_tokens=12, temperature=0.8, top_p=0.95, seed=11, n=2
    )
    assert [c.message.content for c in both.choices] == texts
    stream = client.chat.completions.create(
        model=REF,
        messages=QUESTION,
        max_tokens=12,
        temperature=0.8,
        top_p=0.95,
        seed=11,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    streamed = ["", ""]
    finished: dict[int, str] = {}
    usage = None
    for chunk in stream:
        assert chunk.model == f"{NAME}/1"
        usage = chunk.usage or usage
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert streamed == texts
    assert set(finished) == {0, 1}
    assert usage is not None and usage.prompt_tokens == both.usage.prompt_tokens  # type: ignore[union-attr]


def test_bad_requests_get_4xx_from_the_client(server: Server) -> None:
    client = _client(server)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model=f"{NAME}/7", messages=QUESTION, max_tokens=4)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model=REF, messages=QUESTION, max_tokens=LIMIT + 1)
    assert too_many.value.param == "max_tokens" and str(LIMIT) in too_many.value.message
    with pytest.raises(openai.AuthenticationError) as refused:
        _client(server, WRONG).chat.completions.create(model=REF, messages=QUESTION, max_tokens=4)
    assert refused.value.code == "invalid_api_key" and WRONG not in refused.value.message
    keyless = httpx.get(f"{server.url}/v1/models")
    assert keyless.status_code == 401 and keyless.json()["error"]["code"] == "invalid_api_key"
    malformed = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_json"
    unknown = httpx.post(
        f"{server.url}/v1/feedback",
        json={"completion_id": "chatcmpl-0000", "rating": "up"},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "completion_not_found"


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(
    server: Server, engine: LocalServiceClient
) -> None:
    import concurrent.futures

    questions = [[{"role": "user", "content": f"What is {i} + {2 * i}?"}] for i in range(6)]
    wanted = [
        expected(engine, "1", q, max_tokens=10, temperature=1.0, seed=i)[0][0]
        for i, q in enumerate(questions)
    ]
    before = server.health()["batching"]
    client = _client(server)

    def ask(i: int) -> str | None:
        reply = client.chat.completions.create(
            model=REF,
            messages=questions[i],
            max_tokens=10,
            temperature=1.0,
            seed=i,  # type: ignore[arg-type]
        )
        return reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        answers = list(pool.map(ask, range(len(questions))))
    assert answers == wanted
    after = server.health()["batching"]
    assert after["requests"] - before["requests"] == len(questions)
    assert after["submissions"] - before["submissions"] < len(questions)  # some arrived together


def _materialise_deployment(url: str) -> tuple[dg.ExecuteInProcessResult, DeploymentManifest | None]:
    """``supervised/deployment`` alone (its input is the module's registration), pointed at ``url``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KITCHEN_SUPERVISED_DEPLOYMENT_URL", url)
        mp.setenv("KITCHEN_SUPERVISED_DEPLOYMENT_WAIT_S", "60")
        assets = workflow_assets(get_workflow("supervised"))
        [asset] = [a for a in assets if isinstance(a, dg.AssetsDefinition) and DEPLOYMENT in a.keys]
        assert asset.asset_deps[DEPLOYMENT] == {dg.AssetKey(["supervised", "registered_model"])}  # lineage
        with dg.DagsterInstance.ephemeral() as instance:
            result = dg.materialize(
                assets,
                selection=[DEPLOYMENT],
                resources={
                    "training": LocalBackend(),
                    "registry": MlflowRegistry(),
                    "io_manager": ManifestIOManager(),
                    **service_resources(),
                },
                instance=instance,
                raise_on_error=False,
            )
    manifest = read_manifest(DEPLOYMENT) if result.success else None
    assert manifest is None or isinstance(manifest, DeploymentManifest)
    return result, manifest


def test_deployment_asset_records_what_the_server_serves(server: Server) -> None:
    assert DEPLOYMENT not in {
        k for a in workflow_assets(get_workflow("supervised")) for k in a.keys
    }  # opt-in
    updates: list[telemetry.TelemetryEvent] = []
    with telemetry.attached_handler("deployment-test", telemetry.DEPLOYMENT_UPDATED, updates.append):
        result, deployment = _materialise_deployment(server.url)
    assert result.success and deployment is not None
    [update] = updates  # kitchen.deployment.updated, to the run's sinks
    assert update.metadata["run_id"] == result.run_id and update.metadata["workflow"] == "supervised"
    assert (update.metadata["served_version"], update.metadata["current"]) == (f"models:/{NAME}/1", True)
    assert deployment.served_ref == f"{NAME}@champion" and deployment.served_version == f"{NAME}/1"
    assert deployment.current and deployment.registered_uri == f"models:/{NAME}/1"
    tags = ModelRegistry(default_tracking_uri()).version(NAME, "1").tags
    assert (
        tags["kitchen.deployment.url"] == server.url and tags["kitchen.deployment.ref"] == f"{NAME}@champion"
    )

    down, nothing = _materialise_deployment(f"http://127.0.0.1:{_free_port()}")
    assert not down.success and nothing is None
    failure = down.get_step_failure_events()[0].event_specific_data
    assert "unreachable" in str(failure)


def _register_perturbed_version(registry: ModelRegistry) -> str:
    """A second version of NAME with different adapter weights, logged and registered as Kitchen does
    (files under an MLflow run, the weights-hash tag the loader checks), but not promoted."""
    import torch
    from safetensors.torch import load_file, save_file

    first = registry.resolve(f"{NAME}/1")
    staged = Path(registry.download(first))
    copy = staged.parent / "perturbed"
    shutil.copytree(staged, copy)
    adapter = copy / "adapter"
    weights = load_file(adapter / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(0)
    changed = {
        k: v + torch.randn(v.shape, generator=generator, dtype=v.dtype) * 0.5 if "lora_B" in k else v
        for k, v in weights.items()
    }
    save_file(changed, adapter / "adapter_model.safetensors")
    # The engine's sampler manifest records the adapter's file hashes, as write_sampler does.
    sampler = json.loads((adapter / SAMPLER_MANIFEST).read_text())
    sampler["files"] = {name: hash_file(adapter / name) for name in sampler["files"]}
    sampler["content_hash"] = sampler["files"]["adapter_model.safetensors"]
    (adapter / SAMPLER_MANIFEST).write_text(json.dumps(sampler))
    descriptor = json.loads((copy / DESCRIPTOR).read_text())
    new_hash = hash_json(
        {
            "base": descriptor["base_model"]["content_hash"],
            "adapter": {name: hash_file(adapter / name) for name in ADAPTER_FILES},
        }
    )
    client = registry.client
    run = client.create_run(client.get_run(first.version.run_id).info.experiment_id, run_name="perturbed")
    client.log_artifacts(run.info.run_id, str(copy), MODEL_ARTIFACT_DIR)
    tags = {**first.tags, WEIGHTS_HASH_TAG: new_hash}
    source = f"{run.info.artifact_uri}/{MODEL_ARTIFACT_DIR}"
    version = client.create_model_version(NAME, source=source, run_id=run.info.run_id, tags=tags)
    return str(version.version)


def test_champion_move_is_picked_up_without_restart(server: Server, engine: LocalServiceClient) -> None:
    registry = ModelRegistry(default_tracking_uri())
    version = _register_perturbed_version(registry)
    assert version == "2"
    old, _, _ = expected(engine, "1", QUESTION, max_tokens=16, temperature=1.0, seed=21)
    new, _, _ = expected(engine, "2", QUESTION, max_tokens=16, temperature=1.0, seed=21)
    assert old != new  # the versions answer differently, so the test can tell which one served
    time.sleep(1.5)
    assert server.health()["version"] == f"{NAME}/1"  # registering alone moves nothing

    registry.client.set_registered_model_alias(NAME, "champion", version)
    # The deployment asset waits for the server to pick the new champion up, then records it.
    result, deployment = _materialise_deployment(server.url)
    assert result.success and deployment is not None, server.log.read_text()[-3000:]
    assert deployment.served_version == f"{NAME}/2" and not deployment.current
    assert f"models:/{NAME}/1 was registered as champion" in deployment.reason
    assert server.health()["version"] == f"{NAME}/2"
    client = _client(server)
    raw = client.chat.completions.with_raw_response.create(
        model=REF, messages=QUESTION, max_tokens=16, temperature=1.0, seed=21
    )
    assert raw.headers["x-kitchen-model-version"] == f"{NAME}/2"
    completion = raw.parse()
    assert completion.model == f"{NAME}/2" and completion.choices[0].message.content == new[0]
    assert {m.id for m in client.models.list()} == {f"{NAME}@champion", f"{NAME}/2"}
    assert server.process.poll() is None  # the same process throughout


def test_the_bearer_key_never_reaches_the_log(server: Server) -> None:
    log = server.log.read_text()
    assert 'POST /v1/chat/completions HTTP/1.1" 200' in log  # requests are logged...
    assert "401" in log and "moved: now serving" in log
    assert KEY not in log and WRONG not in log  # ...but no key, right or wrong


def test_unknown_alias_fails_at_startup(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", f"models:/{NAME}@prod", "--port", str(_free_port())]) == 1
    err = capsys.readouterr().err
    assert "no alias 'prod'" in err and "champion -> v" in err
