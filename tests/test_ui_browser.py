"""The UI and the daemon under a real ``dagster dev``: the asset graph in headless Chromium, a materialisation
of the tiny configuration launched through the UI's GraphQL API, exactly one retraining run when a watched
file changes, and a gated evaluation run after training alone.

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it), driven by Playwright; nothing is
downloaded at run time and the browser tests skip, saying why, when it is absent. Screenshots go to
``$KITCHEN_UI_SCREENSHOTS`` (default ``build/screenshots``); ``KITCHEN_UI_SCREENSHOTS=docs/screenshots``
refreshes the README's. The module starts one ``dagster dev`` and stops it, and every process it had
started, by their ids.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from kitchen.cli.instance import DAGSTER_INSTANCE_SETTINGS
from tests.test_supervised_workflow import tiny_run_config

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("KITCHEN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ASSETS = ("base_model", "dataset", "datums", "checkpoints", "trained_weights", "eval_report")
LOCATION = {"repositoryLocationName": "kitchen", "repositoryName": "__repository__"}
RETRAIN_SENSOR = "supervised_retraining_sensor"
T = TypeVar("T")


def _rows(n: int, offset: int = 0) -> str:
    return "".join(
        json.dumps({"question": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)}) + "\n"
        for i in range(offset, offset + n)
    )


def _wait_for(what: str, probe: Callable[[], T | None], timeout: float, every: float = 1.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"gave up after {timeout:.0f}s waiting for {what}")


class DagsterDev:
    """``dagster dev -w workspace.yaml`` on 127.0.0.1, with its own instance and Kitchen home."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        home = root / "dagster"
        home.mkdir()
        (home / "dagster.yaml").write_text(DAGSTER_INSTANCE_SETTINGS)  # what `make ui` installs
        self.log_path = root / "dagster-dev.log"
        self.env = {**os.environ, **env, "DAGSTER_HOME": str(home), "KITCHEN_HOME": str(root / "kitchen")}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        dagster = str(Path(sys.executable).parent / "dagster")
        with self.log_path.open("wb") as log:
            # The server's own PID (no shell in between). SIGINT is reset to its default so the server can
            # be stopped even when this test runs where SIGINT is ignored (a background CI job), since
            # `dagster dev` maps SIGTERM to whatever its SIGINT handler is.
            self.process = subprocess.Popen(
                [dagster, "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(self.port)],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
        _wait_for("the code location to load", self._loaded, timeout=180)

    def _loaded(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"dagster dev exited with {self.process.returncode}:\n{self.log_tail()}")
        try:
            data = self.graphql(
                "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
                "locationOrLoadError { __typename ... on PythonError { message } } } } } }"
            )
        except OSError:
            return False
        for entry in data["workspaceOrError"]["locationEntries"]:
            loaded = entry["locationOrLoadError"]
            if loaded and loaded["__typename"] == "PythonError":
                raise RuntimeError(f"code location failed to load: {loaded['message']}")
            if entry["loadStatus"] == "LOADED" and loaded and loaded["__typename"] == "RepositoryLocation":
                return True
        return False

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = json.loads(response.read())
        if payload.get("errors"):
            raise RuntimeError(f"GraphQL errors: {payload['errors']}")
        return dict(payload["data"])

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """Interrupt ``dagster dev`` (it shuts down its webserver, daemon, code server and runs), then
        kill by PID whatever it had started that is still alive."""
        if self.process is None:
            return
        try:
            started = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            started = []
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        _, alive = psutil.wait_procs(started, timeout=15)
        for leftover in alive:
            leftover.kill()
        psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("watched") / "chats.jsonl"
    path.write_text(_rows(40))
    return path


@pytest.fixture(scope="module")
def dagster_dev(
    tiny_model_dir: Path, watched: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DagsterDev]:
    root = tmp_path_factory.mktemp("dagster-dev")
    retrain_config = root / "retrain.json"
    retrain_config.write_text(json.dumps(tiny_run_config(tiny_model_dir, max_rows=None, max_steps=2)))
    server = DagsterDev(
        root,
        {
            "KITCHEN_RETRAIN_SOURCES": str(watched),
            "KITCHEN_RETRAIN_RUN_CONFIG": str(retrain_config),
            "KITCHEN_RETRAIN_SENSOR": "running",
            "KITCHEN_RETRAIN_INTERVAL": "3",
            "KITCHEN_NEW_WEIGHTS_INTERVAL": "3",
            "DAGSTER_TELEMETRY_DISABLED": "1",
        },
    )
    try:
        server.start()
        server.graphql("mutation { setNuxSeen }")  # no "join the community" dialog over the graph
        yield server
    except BaseException:
        print(server.log_tail(), file=sys.stderr)
        raise
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser_context() -> Iterator[Any]:
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set KITCHEN_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")
    with sync_api.sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            args=CHROMIUM_FLAGS,
            headless=True,
            viewport={"width": 1600, "height": 1200},
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def screenshots() -> Path:
    folder = Path(os.environ.get("KITCHEN_UI_SCREENSHOTS") or REPO / "build" / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _runs(server: DagsterDev, tags: dict[str, str]) -> list[dict[str, Any]]:
    data = server.graphql(
        "query($tags: [ExecutionTag!]) { runsOrError(filter: {tags: $tags}) "
        "{ ... on Runs { results { runId status tags { key value } } } } }",
        {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
    )
    return list(data["runsOrError"]["results"])


def _finished(server: DagsterDev, run_id: str, timeout: float) -> str:
    def status() -> str | None:
        data = server.graphql(
            "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }", {"id": run_id}
        )
        value = data["runOrError"]["status"]
        return value if value in {"SUCCESS", "FAILURE", "CANCELED"} else None

    return _wait_for(f"run {run_id} to finish", status, timeout=timeout, every=2)


def test_asset_graph_shows_every_supervised_asset_in_its_group(
    browser_context: Any, dagster_dev: DagsterDev
) -> None:
    page = browser_context.new_page()
    page.goto(f"{dagster_dev.url}/locations/kitchen/asset-groups/supervised")
    page.get_by_text("Asset Group in").wait_for(timeout=60_000)
    header = page.get_by_text("Asset Group in").locator("xpath=ancestor::*[2]").inner_text()
    assert "supervised" in header and "kitchen" in header
    for name in ASSETS:
        node = page.get_by_text(name, exact=True).first
        node.wait_for(timeout=30_000)
        assert node.is_visible(), f"{name} is not drawn in the supervised group's graph"
    # The UI draws what the server says: every supervised asset is in the supervised group.
    nodes = dagster_dev.graphql("{ assetNodes { assetKey { path } groupName } }")["assetNodes"]
    groups = {tuple(n["assetKey"]["path"]): n["groupName"] for n in nodes}
    assert all(groups[("supervised", name)] == "supervised" for name in ASSETS)
    page.close()


def test_materialise_tiny_config_from_the_api_and_screenshot_eval_report(
    browser_context: Any, dagster_dev: DagsterDev, tiny_model_dir: Path, screenshots: Path
) -> None:
    launched = dagster_dev.graphql(
        """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
             __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
             ... on RunConfigValidationInvalid { errors { message } } } }""",
        {
            "params": {
                "selector": {**LOCATION, "jobName": "supervised_job"},
                "runConfigData": tiny_run_config(tiny_model_dir),
                "executionMetadata": {"tags": [{"key": "kitchen/trigger", "value": "browser-test"}]},
            }
        },
    )["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    assert _finished(dagster_dev, run_id, timeout=300) == "SUCCESS", dagster_dev.log_tail()

    page = browser_context.new_page()
    page.goto(f"{dagster_dev.url}/locations/kitchen/asset-groups/supervised")
    for name in ASSETS:
        page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
    page.wait_for_timeout(1500)  # let the materialisation states finish rendering
    page.screenshot(path=str(screenshots / "asset-graph.png"))

    page.goto(f"{dagster_dev.url}/assets/supervised/eval_report")
    comparison = page.get_by_text("| metric | base | trained | delta |").or_(page.get_by_text("comparison"))
    comparison.first.wait_for(timeout=60_000)
    page.get_by_text(run_id[:8]).first.wait_for(timeout=30_000)
    page.screenshot(path=str(screenshots / "eval-report.png"), full_page=True)
    page.close()
    for name in ("asset-graph.png", "eval-report.png"):
        assert (screenshots / name).stat().st_size > 20_000


def test_changing_the_watched_file_launches_exactly_one_retraining_run(
    dagster_dev: DagsterDev, watched: Path
) -> None:
    selector = {**LOCATION, "sensorName": RETRAIN_SENSOR}
    ticks_query = """query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { ... on Sensor {
        sensorState { status ticks(limit: 20) { id status timestamp runKeys runIds cursor skipReason } }
        } } }"""

    def ticks() -> list[dict[str, Any]]:
        state = dagster_dev.graphql(ticks_query, {"s": selector})["sensorOrError"]["sensorState"]
        assert state["status"] == "RUNNING"  # KITCHEN_RETRAIN_SENSOR=running
        return list(state["ticks"])

    baseline = _wait_for(
        "the sensor to record the file's first revision",
        lambda: next((t for t in ticks() if t["cursor"] and str(watched) in t["cursor"]), None),
        timeout=60,
    )
    assert not _runs(dagster_dev, {"kitchen/trigger": "dataset-changed"})

    watched.write_text(_rows(40) + _rows(8, offset=100))
    (run,) = _wait_for(
        "a retraining run", lambda: _runs(dagster_dev, {"kitchen/trigger": "dataset-changed"}), timeout=60
    )
    tags = {t["key"]: t["value"] for t in run["tags"]}
    assert tags["kitchen/dataset"] == str(watched)
    assert tags["dagster/run_key"] == f"{watched}@{tags['kitchen/dataset_revision']}"
    assert _finished(dagster_dev, run["runId"], timeout=300) == "SUCCESS", dagster_dev.log_tail()

    # Forget that the change was seen: the sensor asks again for the same revision, and its run key
    # keeps the daemon from launching a second run.
    reset_at = time.time()
    dagster_dev.graphql(
        "mutation($s: SensorSelector!, $c: String) { setSensorCursor(sensorSelector: $s, cursor: $c) "
        "{ __typename } }",
        {"s": selector, "c": baseline["cursor"]},
    )
    repeat = _wait_for(
        "a tick that requests the same run key again",
        lambda: next(
            (t for t in ticks() if t["timestamp"] > reset_at and tags["dagster/run_key"] in t["runKeys"]),
            None,
        ),
        timeout=60,
    )
    assert repeat["runIds"] == []
    time.sleep(4)  # one more tick
    assert [r["runId"] for r in _runs(dagster_dev, {"dagster/sensor_name": RETRAIN_SENSOR})] == [run["runId"]]


def test_training_alone_is_followed_by_a_gated_evaluation_run(
    dagster_dev: DagsterDev, tiny_model_dir: Path
) -> None:
    # Full runs (above) evaluate their own weights: the new-weights sensor launched nothing for them.
    assert not _runs(dagster_dev, {"kitchen/trigger": "new-weights"})
    train = {
        k: v
        for k, v in tiny_run_config(tiny_model_dir, seed=3).items()
        if k in {"batch_size", "max_steps", "save_every", "learning_rate", "lora_rank", "seed"}
    }
    launched = dagster_dev.graphql(
        """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
             __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""",
        {
            "params": {
                "selector": {
                    **LOCATION,
                    "jobName": "__ASSET_JOB",
                    "assetSelection": [
                        {"path": ["supervised", "checkpoints"]},
                        {"path": ["supervised", "trained_weights"]},
                    ],
                },
                "runConfigData": {"ops": {"supervised__train": {"config": train}}},
            }
        },
    )["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    train_run = launched["run"]["runId"]
    assert _finished(dagster_dev, train_run, timeout=300) == "SUCCESS", dagster_dev.log_tail()

    (follow,) = _wait_for(
        "the evaluation run", lambda: _runs(dagster_dev, {"kitchen/trigger": "new-weights"}), timeout=90
    )
    assert {t["key"]: t["value"] for t in follow["tags"]}["kitchen/weights_run"] == train_run
    assert _finished(dagster_dev, follow["runId"], timeout=300) == "SUCCESS", dagster_dev.log_tail()
    latest = dagster_dev.graphql(
        """query($keys: [AssetKeyInput!]) { assetNodes(assetKeys: $keys) {
             assetKey { path } assetMaterializations(limit: 1) { runId } } }""",
        {"keys": [{"path": ["supervised", "eval_report"]}, {"path": ["supervised", "registered_model"]}]},
    )["assetNodes"]
    # The gate (the team's held-out NLL margin, carried from the last eval) passed: evaluated and registered.
    assert {n["assetKey"]["path"][-1]: n["assetMaterializations"][0]["runId"] for n in latest} == {
        "eval_report": follow["runId"],
        "registered_model": follow["runId"],
    }
