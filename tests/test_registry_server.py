"""The registry against a real ``mlflow server`` on 127.0.0.1 (what a team runs), registering over HTTP.

One server for the module: it takes several seconds to start. It runs in its own session, so stopping it
by its own PID's process group also stops the uvicorn worker it spawns.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_registry_support import fake_trained_model, register

from kitchen.cli import main
from kitchen.registry import CHALLENGER, CHAMPION, ModelRegistry, RegistrationResult, sampler_path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-server")
    url = f"http://127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    # The job runner (huey consumers, a dozen processes) serves features Kitchen does not use.
    env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    command = [
        str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
        "--port", url.rsplit(":", 1)[1], "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"mlflow server exited {proc.returncode}: {(root / 'server.log').read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server not healthy after 120 s: {(root / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(0.25)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # proc.pid is the server's own PID and its group's id
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def test_preflight_passes_against_the_server(server: str) -> None:
    ModelRegistry(server).preflight()


def test_registers_over_http_with_promotion_both_ways(server: str, tmp_path: Path) -> None:
    registry = ModelRegistry(server)
    first = register(registry, fake_trained_model(tmp_path, seed=1, exact_match=0.5), "srv-1", "srv-promo")
    assert first.manifest.alias == CHAMPION
    # Local adapters land in the server's artifact store, proxied over HTTP.
    assert first.manifest.source.startswith("mlflow-artifacts:/") and first.manifest.source.endswith("/model")
    assert first.run_url and first.run_url.startswith(f"{server}/#/experiments/")
    assert first.version_url == f"{server}/#/models/srv-promo/versions/1"

    worse = register(registry, fake_trained_model(tmp_path, seed=2, exact_match=0.3), "srv-2", "srv-promo")
    better = register(registry, fake_trained_model(tmp_path, seed=3, exact_match=0.8), "srv-3", "srv-promo")
    assert (worse.manifest.alias, better.manifest.alias) == (CHALLENGER, CHAMPION)
    assert registry.aliases("srv-promo") == {CHAMPION: "3", CHALLENGER: "2"}

    tags = registry.version("srv-promo", "3").tags
    assert tags["kitchen.upstream.supervised/trained_weights"] == "srv-3"
    assert tags["kitchen.promotion.previous_champion"] == "1"
    run = registry.client.get_run(str(better.manifest.run_id))
    assert run.info.status == "FINISHED" and run.data.metrics["eval/trained/exact_match"] == 0.8


def test_same_weights_over_http_register_once(server: str, tmp_path: Path) -> None:
    registry = ModelRegistry(server)
    model = fake_trained_model(tmp_path, seed=10, exact_match=0.5)
    first = register(registry, model, "srv-idem-1", "srv-idem")
    again = register(registry, model, "srv-idem-2", "srv-idem")
    assert (again.manifest.version, again.manifest.created) == (first.manifest.version, False)
    assert [v.number for v in registry.versions("srv-idem")] == ["1"]


def test_concurrent_registrations_land_intact(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Different weights at once both get versions; the same weights at once from two machines (no shared
    lock: the file lock is disabled here) end as one version."""
    models = [fake_trained_model(tmp_path, seed=s, exact_match=0.4 + s / 100) for s in (20, 21)]

    def run(args: tuple[int, str]) -> RegistrationResult:
        index, name = args
        return register(ModelRegistry(server), models[index % 2], f"srv-race-{name}-{index}", name)

    with ThreadPoolExecutor(2) as pool:
        different = list(pool.map(run, [(0, "srv-race"), (1, "srv-race")]))
    assert sorted(r.manifest.version for r in different) == ["1", "2"], [r.manifest for r in different]

    monkeypatch.setattr(ModelRegistry, "lock", lambda self, name: _NoLock())
    with ThreadPoolExecutor(2) as pool:
        same = list(pool.map(run, [(0, "srv-dup"), (2, "srv-dup")]))
    registry = ModelRegistry(server)
    versions = [(v.number, v.aliases, v.version.run_id) for v in registry.versions("srv-dup")]
    assert [n for n, _, _ in versions] == [same[0].manifest.version], (versions, [r.manifest for r in same])
    assert {r.manifest.version for r in same} == {same[0].manifest.version}
    assert registry.aliases("srv-dup") == {CHAMPION: same[0].manifest.version}


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_champion_loads_back_over_http_and_cli_shows_it(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = ModelRegistry(server)
    model = fake_trained_model(tmp_path, seed=30, exact_match=0.5)
    register(registry, model, "srv-load", "srv-load")
    uri, _ = sampler_path(registry, "models:/srv-load@champion")
    original = Path(model.weights.sampler_path.removeprefix("file://"))
    loaded = Path(uri.removeprefix("file://"))
    assert (loaded / "adapter_model.safetensors").read_bytes() == (
        original / "adapter_model.safetensors"
    ).read_bytes()

    assert main(["models", "--tracking-uri", server, "show", "srv-load@champion"]) == 0
    shown = capsys.readouterr().out
    assert "srv-load v1  [champion]" in shown and f"{server}/#/experiments/" in shown
    assert main(["models", "--tracking-uri", server, "list"]) == 0
    assert "srv-load" in capsys.readouterr().out
