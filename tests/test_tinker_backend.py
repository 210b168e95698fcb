"""The Tinker backend without the Tinker service: preflight bounds, model names, futures, retries, secrets.

A stand-in HTTP server answers the few endpoints the SDK's capability probe calls, so the reachable,
refused, silent and unauthorised cases all run offline and fast.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import tinker

from kitchen.models.base import ModelResolutionError
from kitchen_assets.definitions import build_definitions
from resources.futures import resolved
from resources.tinker_backend import (
    BoundedFuture,
    TinkerBackend,
    TinkerRequestError,
    TinkerRequestTimeout,
    TinkerServiceClient,
    TinkerUnavailableError,
    _Session,
    clear_probe_cache,
    tokenizer_id_for,
)
from resources.training import LocalBackend

REPO = Path(__file__).resolve().parents[1]
CANARY = "tml-kitchen-secret-canary-7f3a9c1e5b"
MODELS = [
    {
        "model_name": "meta-llama/Llama-3.1-8B",
        "trainable": True,
        "sampleable": True,
        "max_context_length": 32768,
    },
    {"model_name": "Qwen/Qwen3-8B", "trainable": True, "sampleable": True},
    {"model_name": "Qwen/Qwen3-235B-Sampler", "trainable": False, "sampleable": True},
]


class FakeTinker:
    """Serves client config and capabilities like the Tinker API; records the keys it was sent."""

    def __init__(self, *, status: int = 200) -> None:
        self.keys: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code: int, payload: Any) -> None:
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                fake.keys.append(self.headers.get("X-API-Key", ""))
                if status != 200:
                    self._reply(status, {"detail": "invalid API key"})
                elif self.path.endswith("/client/config"):
                    self._reply(200, {"use_pyqwest_transport": False})
                elif self.path.endswith("/get_server_capabilities"):
                    self._reply(200, {"supported_models": MODELS})
                else:
                    self._reply(404, {"detail": "not here"})

            do_GET = do_POST = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def _fresh_probe_cache() -> Iterator[None]:
    clear_probe_cache()
    yield
    clear_probe_cache()


@pytest.fixture
def fake_tinker() -> Iterator[FakeTinker]:
    fake = FakeTinker()
    yield fake
    fake.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- preflight ---------------------------------------------------------------------------------------------


def test_no_key_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    backend = TinkerBackend.from_env()
    started = time.perf_counter()
    with pytest.raises(TinkerUnavailableError, match="TINKER_API_KEY is not set"):
        backend.preflight()
    assert time.perf_counter() - started < 0.5


def test_malformed_key_is_rejected_without_echoing_it() -> None:
    with pytest.raises(TinkerUnavailableError, match="start with 'tml-'") as raised:
        TinkerBackend(api_key="sk-not-a-tinker-key").preflight()
    assert "sk-not-a-tinker-key" not in str(raised.value)


def test_refused_connection_fails_fast_and_names_the_url() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    started = time.perf_counter()
    with pytest.raises(TinkerUnavailableError, match="cannot connect") as raised:
        TinkerBackend(api_key=CANARY, base_url=url, probe_timeout_s=20).preflight()
    assert time.perf_counter() - started < 5
    assert url in str(raised.value) and CANARY not in str(raised.value)


def test_silent_service_fails_within_probe_timeout() -> None:
    # A listening socket that never accepts: connections complete, requests are never answered.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.perf_counter()
        with pytest.raises(TinkerUnavailableError, match=r"did not answer within 1\.5s"):
            TinkerBackend(api_key=CANARY, base_url=url, probe_timeout_s=1.5).preflight()
        assert 1.4 < time.perf_counter() - started < 4


def test_rejected_key_is_reported_without_the_key() -> None:
    fake = FakeTinker(status=401)
    try:
        with pytest.raises(TinkerUnavailableError, match="AuthenticationError") as raised:
            TinkerBackend(api_key=CANARY, base_url=fake.url, probe_timeout_s=10).preflight()
    finally:
        fake.close()
    assert CANARY not in str(raised.value)


def test_probe_lists_models_and_sends_the_key(fake_tinker: FakeTinker) -> None:
    backend = TinkerBackend(api_key=CANARY, base_url=fake_tinker.url, probe_timeout_s=10)
    backend.preflight()
    assert [m.name for m in backend.offered_models()] == [m["model_name"] for m in MODELS]
    # The SDK sends the key; the plain reachability request does not. That request races the SDK's in a
    # thread of its own and may reach the server after the probe has its answer: wait for it.
    deadline = time.monotonic() + 5
    while "" not in fake_tinker.keys and time.monotonic() < deadline:
        time.sleep(0.01)
    assert set(fake_tinker.keys) == {CANARY, ""}
    calls = len(fake_tinker.keys)
    backend.resolve_base_model("Qwen/Qwen3-8B")
    assert len(fake_tinker.keys) == calls  # the probe is reused, not repeated


# -- model names -------------------------------------------------------------------------------------------


def test_known_model_resolves_to_a_tinker_manifest(fake_tinker: FakeTinker) -> None:
    backend = TinkerBackend(api_key=CANARY, base_url=fake_tinker.url)
    manifest = backend.resolve_base_model("meta-llama/Llama-3.1-8B")
    assert manifest.source == "tinker"
    assert manifest.backend_model == "meta-llama/Llama-3.1-8B"
    assert manifest.tokenizer_path == "thinkingmachineslabinc/meta-llama-3-instruct-tokenizer"
    assert manifest.path is None and len(manifest.content_hash) == 64
    # No local config.json, yet the default learning rate is tinker-cookbook's rule for an 8B Llama.
    from kitchen.workflows import get_workflow

    assert get_workflow("supervised").default_learning_rate(manifest) == pytest.approx(2.86e-4, rel=1e-2)


def test_unknown_model_lists_what_the_service_offers(fake_tinker: FakeTinker) -> None:
    backend = TinkerBackend(api_key=CANARY, base_url=fake_tinker.url)
    with pytest.raises(ModelResolutionError) as raised:
        backend.resolve_base_model("SmolLM2-135M-Instruct")
    message = str(raised.value)
    assert "SmolLM2-135M-Instruct" in message
    assert "meta-llama/Llama-3.1-8B" in message and "Qwen/Qwen3-8B" in message
    with pytest.raises(ModelResolutionError, match="did you mean 'Qwen/Qwen3-8B'"):
        backend.resolve_base_model("qwen/qwen3-8b")
    with pytest.raises(ModelResolutionError, match="sampling only"):
        backend.resolve_base_model("Qwen/Qwen3-235B-Sampler")


def test_tokenizer_ids_follow_the_sdk_rule() -> None:
    assert (
        tokenizer_id_for("meta-llama/Llama-3.2-1B")
        == "thinkingmachineslabinc/meta-llama-3-instruct-tokenizer"
    )
    assert tokenizer_id_for("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    assert tokenizer_id_for("org/model/variant") == "org/model"


# -- futures, clients, retries -----------------------------------------------------------------------------


def test_a_timed_out_request_kills_the_session_so_cleanup_does_not_wait_again() -> None:
    session = _Session(request_timeout_s=0.2, secret=CANARY)
    first: BoundedFuture[int] = BoundedFuture(Future(), session, "forward_backward")
    second: BoundedFuture[int] = BoundedFuture(Future(), session, "optim")
    started = time.perf_counter()
    with pytest.raises(TinkerRequestTimeout, match=r"forward_backward did not finish within 0\.2s"):
        first.result()
    with pytest.raises(TinkerRequestTimeout):
        second.result()
    assert time.perf_counter() - started < 0.5
    assert TinkerBackend(api_key=CANARY).is_transient(TinkerRequestTimeout("x"))


def test_errors_carrying_the_key_are_redacted() -> None:
    session = _Session(request_timeout_s=1, secret=CANARY)
    failed: Future[int] = Future()
    failed.set_exception(RuntimeError(f"bad header X-API-Key: {CANARY}"))
    with pytest.raises(TinkerRequestError) as raised:
        BoundedFuture(failed, session, "sample").result()
    assert CANARY not in str(raised.value) and "tml-***" in str(raised.value)
    plain: Future[int] = Future()
    plain.set_exception(ValueError("no secret here"))
    with pytest.raises(ValueError, match="no secret here"):
        BoundedFuture(plain, session, "sample").result()


class _FakeSdkService:
    """Creation methods return futures of clients, as tinker 0.38 does; one never completes."""

    def __init__(self) -> None:
        self.training = object()

    def create_lora_training_client(self, base_model: str, rank: int, seed: int | None) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(self.training)
        return future

    def create_training_client_from_state(self, path: str) -> Future[Any]:
        self.loaded_weights_only = path
        return resolved(self.training)

    def create_training_client_from_state_with_optimizer(self, path: str) -> Future[Any]:
        return Future()  # a service that accepted the request and went silent


def test_service_client_resolves_client_futures_and_bounds_them() -> None:
    sdk = _FakeSdkService()
    service = TinkerServiceClient(sdk, _Session(request_timeout_s=0.3, secret=CANARY))
    assert service.create_lora_training_client("m", rank=4, seed=0).result()._inner is sdk.training
    path = "tinker://run/weights/step-2"
    assert service.create_training_client_from_state(path).result()._inner is sdk.training
    assert sdk.loaded_weights_only == path
    started = time.perf_counter()
    with pytest.raises(TinkerRequestTimeout, match="create_training_client_from_state_with_optimizer"):
        service.create_training_client_from_state_with_optimizer("tinker://run/weights/step-2").result()
    assert time.perf_counter() - started < 1.5


class _FakeSdkTraining:
    """The SDK training client's shape for the two calls the wrapper adds; futures are set by the test."""

    def __init__(self) -> None:
        self.custom: list[tuple[Any, Any]] = []
        self.snapshots: list[tuple[str | None, Future[Any]]] = []
        self.custom_result: Future[Any] = Future()

    def forward_backward_custom(self, data: Any, loss_fn: Any) -> Future[Any]:
        self.custom.append((data, loss_fn))
        return self.custom_result

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> Future[Any]:
        future: Future[Any] = Future()
        self.snapshots.append((name, future))
        return future


def test_training_client_passes_custom_losses_and_snapshots_through_bounded() -> None:
    from kitchen.contract import SamplingClient, TrainingClient
    from resources.tinker_backend import TinkerSamplingClient, TinkerTrainingClient

    sdk = _FakeSdkTraining()
    client = TinkerTrainingClient(sdk, _Session(request_timeout_s=0.3, secret=CANARY))
    assert isinstance(client, TrainingClient)
    # Deprecated in tinker 0.38; checkpoints load through ServiceClient.create_training_client_from_state*.
    assert not hasattr(client, "load_state") and not hasattr(client, "load_state_with_optimizer")

    data, loss_fn = [object()], lambda d, lp: (lp[0].sum(), {})
    custom = client.forward_backward_custom(data, loss_fn)  # type: ignore[arg-type]
    assert sdk.custom == [(data, loss_fn)]
    sdk.custom_result.set_exception(RuntimeError(f"custom loss failed; X-API-Key: {CANARY}"))
    with pytest.raises(TinkerRequestError) as raised:
        custom.result()
    assert CANARY not in str(raised.value)

    snapshot = client.save_weights_and_get_sampling_client()  # returns before the snapshot exists
    (name, pending), sdk_sampler = sdk.snapshots[0], object()
    assert name is None and not pending.done()
    pending.set_result(sdk_sampler)
    sampler = snapshot.result()
    assert isinstance(sampler, TinkerSamplingClient) and isinstance(sampler, SamplingClient)
    assert sampler._inner is sdk_sampler

    client.save_weights_and_get_sampling_client("named")
    assert sdk.snapshots[1][0] == "named"
    started = time.perf_counter()
    with pytest.raises(TinkerRequestTimeout, match="save_weights_and_get_sampling_client did not finish"):
        client.save_weights_and_get_sampling_client().result()
    assert time.perf_counter() - started < 1.5


def test_transient_errors_are_the_retryable_ones() -> None:
    backend = TinkerBackend(api_key=CANARY)
    request = __import__("httpx").Request("GET", "http://x")
    assert backend.is_transient(tinker.APIConnectionError(request=request))
    assert backend.is_transient(ConnectionResetError())
    assert backend.is_transient(TinkerUnavailableError("gone"))
    assert not backend.is_transient(ValueError("bad datum"))
    assert not LocalBackend().is_transient(RuntimeError("CUDA out of memory"))


def test_switching_backend_changes_only_the_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TINKER_API_KEY", CANARY)
    local, remote = build_definitions("local"), build_definitions("tinker")
    assert local.resources is not None and remote.resources is not None
    assert isinstance(remote.resources["training"], TinkerBackend)
    assert CANARY not in repr(remote.resources["training"])
    assert remote.assets is not None and local.assets is not None

    def shape(defs: dg.Definitions) -> list[tuple[str, list[str]]]:
        return [(a.node_def.name, sorted(k.to_user_string() for k in a.keys)) for a in defs.assets or []]

    assert shape(remote) == shape(local)
    # The shipped asset definitions themselves are shared, not rebuilt per backend.
    assert {id(a) for a in local.assets} & {id(a) for a in remote.assets}
    assert remote.resources["io_manager"] == local.resources["io_manager"]


# -- the command line and secrets ----------------------------------------------------------------------------


def _cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kitchen.cli", "run", "supervised", "--backend", "tinker", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _tinker_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINKER_")}
    env.update(
        KITCHEN_HOME=str(tmp_path / "home"),
        DAGSTER_HOME=str(tmp_path / "home" / "dagster"),
        TINKER_TELEMETRY="0",
        **extra,
    )
    return env


def test_cli_without_key_fails_at_once(tmp_path: Path) -> None:
    started = time.perf_counter()
    proc = _cli(
        ["--model", "meta-llama/Llama-3.1-8B", "--dataset", "HuggingFaceH4/no_robots", "--epochs", "1"],
        _tinker_env(tmp_path),
    )
    assert proc.returncode == 1
    assert "TINKER_API_KEY is not set" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.perf_counter() - started < 60  # interpreter and Dagster imports; the check itself is instant


def _files_containing(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_the_api_key_never_appears_in_any_output(tmp_path: Path, fake_tinker: FakeTinker) -> None:
    # 1. Unreachable service: the CLI's preflight fails fast and says where it tried.
    refused = _cli(
        ["--model", "meta-llama/Llama-3.1-8B"],
        _tinker_env(tmp_path, TINKER_API_KEY=CANARY, TINKER_BASE_URL=f"http://127.0.0.1:{_closed_port()}"),
    )
    assert refused.returncode == 1 and "cannot connect to the Tinker service" in refused.stderr
    # 2. A service that accepts the key: a real Dagster run starts, resolves the model through the service
    #    (the key is used), records metadata, and fails later (no Hub here for the tokenizer).
    #    A failure webhook whose URL is a bearer secret is configured too (read when definitions load).
    env = _tinker_env(
        tmp_path,
        TINKER_API_KEY=CANARY,
        TINKER_BASE_URL=fake_tinker.url,
        TINKER_LOG="debug",
        KITCHEN_FAILURE_WEBHOOK_URL=f"https://hooks.slack.invalid/services/T0/B0/{CANARY}",
    )
    ran = _cli(["--model", "meta-llama/Llama-3.1-8B", "--max-rows", "8", "--log-level", "DEBUG"], env)
    assert CANARY in fake_tinker.keys, "the key was never sent, so its absence below would prove nothing"
    assert ran.returncode == 1 and "supervised__datums" in ran.stderr
    # 3. An MLflow store whose URI carries a database password: the registry preflight fails in one
    #    line that names the store without the password.
    store = _cli(
        ["--model", "meta-llama/Llama-3.1-8B"],
        {**env, "MLFLOW_TRACKING_URI": f"postgresql://kitchen:{CANARY}@127.0.0.1:{_closed_port()}/mlflow"},
    )
    assert store.returncode == 1 and "Traceback" not in store.stderr
    assert "could not reach MLflow store postgresql://***@127.0.0.1:" in store.stderr

    for proc in (refused, ran, store):
        assert CANARY not in proc.stdout and CANARY not in proc.stderr
    assert _files_containing(tmp_path / "home", CANARY) == []
    from dagster._core.instance.ref import InstanceRef

    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(tmp_path / "home" / "dagster"))) as instance:
        (run,) = instance.get_runs()
        assert CANARY not in json.dumps(run.run_config, default=str)
        records = instance.get_records_for_run(run.run_id).records
        base_model = [
            r
            for r in records
            if r.event_log_entry.dagster_event
            and r.event_log_entry.dagster_event.event_type_value == "ASSET_MATERIALIZATION"
        ]
        assert base_model, "the base_model asset should have materialised through the service"
        for record in records:
            assert CANARY not in record.event_log_entry.to_json()


# -- the loop against a remote-like service: overlap, retry, resume -----------------------------------------


def _bench_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "kitchen_bench_pipelining", REPO / "bench" / "pipelining.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _InstantTraining:
    """A training client with no compute: what is left of a step's time is the injected latency."""

    def __init__(self) -> None:
        self.steps = 0

    def _done(self, value: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(value)
        return future

    def forward_backward(self, data: list[Any], loss_fn: str, loss_fn_config: Any = None) -> Future[Any]:
        self.steps += 1
        outputs = [{"logprobs": tinker.types.TensorData(data=[-1.0], dtype="float32", shape=[1])}]
        return self._done(
            tinker.types.ForwardBackwardOutput(
                loss_fn_output_type="ArrayRecord",
                loss_fn_outputs=outputs * len(data),
                metrics={"loss:sum": float(self.steps)},
            )
        )

    def optim_step(self, optim_params: Any = None, *, adam_params: Any = None) -> Future[Any]:
        return self._done(tinker.types.OptimStepResponse())

    def save_state(self, name: str) -> Future[Any]:
        return self._done(tinker.types.SaveWeightsResponse(path=f"tinker://fake/weights/{name}"))

    def save_weights_for_sampler(self, name: str) -> Future[Any]:
        return self._done(tinker.types.SaveWeightsForSamplerResponse(path=f"tinker://fake/sampler/{name}"))


class _InstantService:
    def create_lora_training_client(self, base_model: str, rank: int = 32, seed: int | None = None) -> Any:
        return resolved(_InstantTraining())

    def close(self, status: str = "success", detail: str | None = None) -> None:
        pass


def test_the_loop_overlaps_requests_and_records_every_step(tmp_path: Path) -> None:
    from kitchen.training.loop import TrainingSpec, run_training
    from kitchen.training.supervised import SupervisedPlan

    bench = _bench_module()
    datum = tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints([1, 2]),
        loss_fn_inputs={
            "target_tokens": tinker.types.TensorData(data=[2, 3], dtype="int64", shape=[2]),
            "weights": tinker.types.TensorData(data=[1.0, 1.0], dtype="float32", shape=[2]),
        },
    )

    def plan() -> SupervisedPlan:
        return SupervisedPlan.build(
            [datum] * 8, datums_hash="h", batch_size=1, epochs=1, seed=0, max_steps=None
        )

    def per_step(in_flight: int) -> tuple[float, list[float]]:
        spec = TrainingSpec(
            base_model="m",
            lora_rank=4,
            learning_rate=1e-4,
            lr_schedule="constant",
            warmup_steps=0,
            save_every=3,
            seed=0,
            max_in_flight=in_flight,
        )
        service = bench.LatencyService(_InstantService(), 0.1)
        result = run_training(service, spec, plan(), tmp_path / f"m{in_flight}", key=f"m{in_flight}")
        assert [c.step for c in result.checkpoints if c.kind == "state"] == [3, 6, 8]
        return result.metrics[-1].elapsed_seconds / 8, [m.loss * 2 for m in result.metrics]

    sequential, losses = per_step(1)
    pipelined, pipelined_losses = per_step(4)
    assert losses == pipelined_losses == [float(i) for i in range(1, 9)]  # every step's result, in order
    assert sequential > 0.09  # one round trip per step when nothing overlaps
    assert pipelined < 0.6 * sequential


_FLAKY: dict[str, Any] = {}


class _FlakyTraining:
    """Passes through to the local engine, except that one forward_backward fails like a dropped link."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def forward_backward(self, data: list[Any], loss_fn: str, loss_fn_config: Any = None) -> Any:
        _FLAKY["calls"][-1] += 1
        if not _FLAKY["failed"] and sum(_FLAKY["calls"]) == _FLAKY["fail_at"]:
            _FLAKY["failed"] = True
            failed: Future[Any] = Future()
            failed.set_exception(_FLAKY["error"])
            return failed
        return self._inner.forward_backward(data, loss_fn, loss_fn_config)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _FlakyService:
    def __init__(self, inner: Any) -> None:
        self._inner = inner
        _FLAKY["calls"].append(0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def create_lora_training_client(self, base_model: str, rank: int = 32, seed: int | None = None) -> Any:
        return resolved(
            _FlakyTraining(self._inner.create_lora_training_client(base_model, rank=rank, seed=seed).result())
        )

    def create_training_client_from_state_with_optimizer(self, path: str) -> Any:
        _FLAKY["resumed_from"].append(path)
        return resolved(
            _FlakyTraining(self._inner.create_training_client_from_state_with_optimizer(path).result())
        )

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None) -> Any:
        return self._inner.create_sampling_client(model_path=model_path, base_model=base_model)


class _FlakyLocalBackend(LocalBackend):
    def service_client(self) -> Any:
        return _FlakyService(super().service_client())


def _run_with_failure_at_step_3(model_dir: Path, error: Exception) -> dg.ExecuteInProcessResult:
    from kitchen.workflows import get_workflow, split_run_config
    from kitchen.workflows.supervised import SupervisedConfig
    from kitchen_assets.factory import op_configs
    from kitchen_assets.training import training_asset
    from kitchen_assets.workflows import workflow_assets

    _FLAKY.update(calls=[], failed=False, fail_at=3, resumed_from=[], error=error)
    workflow = get_workflow("supervised")
    train = training_asset(workflow, retry_policy=dg.RetryPolicy(max_retries=2, delay=0))
    assets = [
        a
        for a in workflow_assets(workflow)
        if isinstance(a, dg.AssetsDefinition)
        and a.node_def.name in {"supervised__base_model", "supervised__dataset", "supervised__datums"}
    ] + [train]
    flat = SupervisedConfig(
        model=str(model_dir),
        max_rows=48,
        batch_size=8,
        max_steps=4,
        save_every=2,
        learning_rate=5e-3,
        lora_rank=4,
        max_length=64,
    )
    names = {a.node_def.name for a in assets}
    ops = {k: v for k, v in split_run_config(flat, op_configs(workflow)).items() if k in names}
    with dg.DagsterInstance.ephemeral() as instance:
        return dg.materialize(
            assets,
            instance=instance,
            run_config={"ops": ops},
            raise_on_error=False,
            resources={**(build_definitions("local").resources or {}), "training": _FlakyLocalBackend()},
        )


def test_a_transient_failure_is_retried_and_resumes_from_the_last_checkpoint(tiny_model_dir: Path) -> None:
    from kitchen.manifests import CheckpointsManifest
    from kitchen.workflows import get_workflow
    from kitchen_assets.training import TRAIN_RETRY_POLICY
    from kitchen_assets.workflows import workflow_assets

    shipped = next(
        a
        for a in workflow_assets(get_workflow("supervised"))
        if isinstance(a, dg.AssetsDefinition) and a.node_def.name == "supervised__train"
    )
    assert shipped.op.retry_policy == TRAIN_RETRY_POLICY
    result = _run_with_failure_at_step_3(tiny_model_dir, ConnectionResetError("injected: connection reset"))
    assert result.success
    assert [e.step_key for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"] == [
        "supervised__train"
    ]
    # Step 3 failed after the step-2 checkpoint entered the ledger: the retry loads it (with optimizer
    # state) and runs only steps 3 and 4.
    (resumed,) = _FLAKY["resumed_from"]
    assert resumed.endswith("step-000002")
    assert _FLAKY["calls"][-1] == 2
    checkpoints = result.output_for_node("supervised__train", "checkpoints")
    assert isinstance(checkpoints, CheckpointsManifest)
    metrics = [json.loads(line) for line in Path(checkpoints.metrics_path).read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    meta = next(
        e.materialization.metadata
        for e in result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey(["supervised", "checkpoints"])
    )
    assert meta["resumed"].value is True and meta["resumed_from"].value == f"step 2: {resumed}"


def test_a_permanent_failure_is_not_retried(tiny_model_dir: Path) -> None:
    result = _run_with_failure_at_step_3(tiny_model_dir, ValueError("injected: malformed datum"))
    assert not result.success
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert failure.step_key == "supervised__train"
    assert "ValueError: injected: malformed datum" in str(failure.step_failure_data)
    assert _FLAKY["resumed_from"] == []
