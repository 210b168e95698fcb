"""The retraining sensor (first tick, unchanged, changed, unreachable, run keys) and the failure sensor."""

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dagster as dg
import pytest

from jobs.sensors import (
    DATASET_TAG,
    FAILED_ASSETS_TAG,
    FAILURE_TAG,
    FAILURE_WEBHOOK_TAG,
    REVISION_TAG,
    RetrainSettings,
    retraining_sensor,
    run_failure_recorder,
)
from jobs.workflow_jobs import workflow_job
from kitchen.workflows import get_workflow
from kitchen.workflows.supervised import SupervisedConfig
from kitchen_assets.definitions import build_definitions
from tests.test_supervised_workflow import tiny_run_config

SUPERVISED = get_workflow("supervised")
supervised_job = workflow_job(SUPERVISED)
CANARY = "kitchen-webhook-canary-3b7e21"

ROWS_A = [{"question": "What is 2 + 2?", "answer": "4"}, {"question": "What is 3 + 5?", "answer": "8"}]
ROWS_B = [*ROWS_A, {"question": "What is 7 + 1?", "answer": "8"}]


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _tick(sensor: dg.SensorDefinition, cursor: str | None) -> dg.SensorResult:
    result = sensor(dg.build_sensor_context(cursor=cursor))
    assert isinstance(result, dg.SensorResult)
    return result


def _reason(result: dg.SensorResult) -> str:
    assert result.skip_reason is not None and result.skip_reason.skip_message is not None
    return result.skip_reason.skip_message


def _local_sensor(path: Path, **run_config: Any) -> dg.SensorDefinition:
    return retraining_sensor(supervised_job, RetrainSettings(sources=(str(path),), run_config=run_config))


def test_local_file_first_tick_records_unchanged_skips_changed_requests_one_run(tmp_path: Path) -> None:
    data = tmp_path / "chats.jsonl"
    _write(data, ROWS_A)
    sensor = _local_sensor(data, max_steps=2, batch_size=4)

    first = _tick(sensor, None)
    assert not first.run_requests
    assert "first seen" in _reason(first)
    assert json.loads(first.cursor or "")[str(data)]["kind"] == "local"

    same = _tick(sensor, first.cursor)
    assert not same.run_requests
    assert "unchanged" in _reason(same)

    _write(data, ROWS_A)  # rewritten with the same bytes: new mtime, same content, still no run
    rewritten = _tick(sensor, same.cursor)
    assert not rewritten.run_requests

    _write(data, ROWS_B)
    changed = _tick(sensor, rewritten.cursor)
    (request,) = changed.run_requests or []
    revision = json.loads(changed.cursor or "")[str(data)]["revision"]
    assert revision != json.loads(first.cursor or "")[str(data)]["revision"]
    assert request.run_key == f"{data}@{revision}"
    assert request.tags[REVISION_TAG] == revision and request.tags[DATASET_TAG] == str(data)
    # The flat config supervised_job takes: the sensor's base config with the watched dataset.
    assert request.run_config == {"max_steps": 2, "batch_size": 4, "dataset": str(data)}
    SupervisedConfig(**request.run_config)

    after = _tick(sensor, changed.cursor)
    assert not after.run_requests


def test_run_key_is_the_revision_so_a_lost_cursor_or_a_revert_repeats_a_key(tmp_path: Path) -> None:
    """The daemon launches at most one run per run key, so equal keys mean no duplicate runs."""
    data = tmp_path / "chats.jsonl"
    _write(data, ROWS_A)
    sensor = _local_sensor(data)
    baseline = _tick(sensor, None).cursor
    _write(data, ROWS_B)
    (to_b,) = _tick(sensor, baseline).run_requests or []
    # The cursor is lost (reset in the UI): the same change yields the same key, not a new run.
    (again,) = _tick(sensor, baseline).run_requests or []
    assert again.run_key == to_b.run_key
    # A -> B -> A -> B: the second B is the revision already trained on.
    seen_b = _tick(sensor, baseline).cursor
    _write(data, ROWS_A)
    back_to_a = _tick(sensor, seen_b)
    _write(data, ROWS_B)
    (b_again,) = _tick(sensor, back_to_a.cursor).run_requests or []
    assert b_again.run_key == to_b.run_key


def test_directory_source_hashes_its_files(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    _write(folder / "train.jsonl", ROWS_A)
    sensor = _local_sensor(folder)
    cursor = _tick(sensor, None).cursor
    _write(folder / "test.jsonl", ROWS_A)  # a new split file is a new revision
    assert len(_tick(sensor, cursor).run_requests or []) == 1


def test_builtin_dataset_never_changes() -> None:
    sensor = retraining_sensor(supervised_job, RetrainSettings(sources=("kitchen/arithmetic",)))
    first = _tick(sensor, None)
    second = _tick(sensor, first.cursor)
    assert not second.run_requests
    assert "unchanged at builtin" in _reason(second)


@pytest.fixture
def hub_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests run with HF_HUB_OFFLINE=1; these ones answer (or fail) the Hub call themselves."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_hub_source_uses_the_revision_sha_and_pins_it(
    hub_online: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import HfApi

    calls: list[tuple[str, str | None, float | None]] = []
    shas = iter(["a" * 40, "a" * 40, "b" * 40])

    def dataset_info(
        self: HfApi, repo_id: str, *, revision: str | None = None, timeout: float | None = None, **_: Any
    ) -> SimpleNamespace:
        calls.append((repo_id, revision, timeout))
        return SimpleNamespace(sha=next(shas))

    monkeypatch.setattr(HfApi, "dataset_info", dataset_info)
    settings = RetrainSettings(sources=("someone/chats:default",), run_config={"dataset_revision": "main"})
    sensor = retraining_sensor(supervised_job, settings)
    first = _tick(sensor, None)
    unchanged = _tick(sensor, first.cursor)
    assert not first.run_requests and not unchanged.run_requests
    (request,) = _tick(sensor, unchanged.cursor).run_requests or []
    assert request.run_key == "someone/chats:default@" + "b" * 40
    assert request.run_config == {"dataset": "someone/chats:default", "dataset_revision": "b" * 40}
    # One cheap call per tick, for the configured branch, with a bounded timeout.
    assert calls == [("someone/chats", "main", 5.0)] * 3


@pytest.fixture
def silent_server() -> Iterator[str]:
    """An endpoint that accepts connections and never answers: the worst case for a tick."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def test_unreachable_hub_skips_the_tick_within_its_timeout_and_keeps_the_cursor(
    hub_online: None, silent_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", silent_server)
    data = tmp_path / "chats.jsonl"
    _write(data, ROWS_A)
    settings = RetrainSettings(sources=("someone/chats", str(data)), hub_timeout=1.0)
    sensor = retraining_sensor(supervised_job, settings)
    seen_hub = json.dumps({"someone/chats": {"name": "someone/chats", "kind": "hub", "revision": "a" * 40}})

    started = time.monotonic()
    result = _tick(sensor, seen_hub)
    assert time.monotonic() - started < 2.5  # the 1 s deadline, whatever huggingface_hub does first
    assert not result.run_requests
    assert "someone/chats: unavailable (the Hugging Face Hub did not answer" in _reason(result)
    cursor = json.loads(result.cursor or "")
    assert cursor["someone/chats"]["revision"] == "a" * 40  # the last seen revision survives the outage
    assert str(data) in cursor  # the reachable source was still checked


def test_missing_local_file_and_offline_hub_skip_with_reasons(tmp_path: Path) -> None:
    missing = tmp_path / "gone.jsonl"
    sensor = retraining_sensor(supervised_job, RetrainSettings(sources=(str(missing), "someone/chats")))
    result = _tick(sensor, None)
    assert not result.run_requests
    assert f"no such file: {missing}" in _reason(result) and "HF_HUB_OFFLINE is set" in _reason(result)
    assert json.loads(result.cursor or "") == {}


def test_settings_come_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "retrain.yaml"
    config.write_text("dataset: data/chats.jsonl\nmax_steps: 3\n")
    monkeypatch.setenv("KITCHEN_RETRAIN_RUN_CONFIG", str(config))
    monkeypatch.setenv("KITCHEN_RETRAIN_SENSOR", "running")
    monkeypatch.setenv("KITCHEN_RETRAIN_INTERVAL", "45")
    settings = RetrainSettings.from_env(SUPERVISED)
    assert settings.sources == ("data/chats.jsonl",)  # the run config's dataset, unless listed
    assert settings.default_status == dg.DefaultSensorStatus.RUNNING and settings.interval_seconds == 45
    monkeypatch.setenv("KITCHEN_RETRAIN_SOURCES", "a/b, ./c.jsonl")
    assert RetrainSettings.from_env(SUPERVISED).sources == ("a/b", "./c.jsonl")
    monkeypatch.setenv("KITCHEN_SUPERVISED_RETRAIN_SOURCES", "x/y")  # the per-workflow name wins
    assert RetrainSettings.from_env(SUPERVISED).sources == ("x/y",)
    monkeypatch.setenv("KITCHEN_RETRAIN_SENSOR", "sometimes")
    with pytest.raises(ValueError, match="KITCHEN_RETRAIN_SENSOR"):
        RetrainSettings.from_env(SUPERVISED)
    monkeypatch.delenv("KITCHEN_RETRAIN_SENSOR")
    config.write_text("epochs: 0\n")
    with pytest.raises(
        ValueError, match=f"KITCHEN_RETRAIN_RUN_CONFIG={config}: not a valid run config"
    ) as raised:
        RetrainSettings.from_env(SUPERVISED)
    assert "epochs" in str(raised.value)


def test_default_sensors_and_their_status() -> None:
    defs = build_definitions("local")
    retrain = defs.resolve_sensor_def("supervised_retraining_sensor")
    assert retrain.default_status == dg.DefaultSensorStatus.STOPPED
    assert retrain.minimum_interval_seconds == 300
    assert (
        defs.resolve_sensor_def("kitchen_run_failure_sensor").default_status == dg.DefaultSensorStatus.RUNNING
    )
    new_weights = defs.resolve_sensor_def("supervised_new_weights_sensor")
    assert new_weights.default_status == dg.DefaultSensorStatus.RUNNING
    assert new_weights.minimum_interval_seconds == 30


# -- failures -------------------------------------------------------------------------------------


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()
    server.server_close()


def test_failed_run_is_tagged_with_asset_and_error_and_posted(
    tiny_model_dir: Path, webhook: tuple[str, list[dict[str, Any]]], capfd: pytest.CaptureFixture[str]
) -> None:
    url, received = webhook
    job = build_definitions("local").resolve_job_def("supervised_job")
    with dg.DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(
            run_config=tiny_run_config(tiny_model_dir, dataset="no/such-dataset-anywhere"),
            instance=instance,
            raise_on_error=False,
        )
        assert not result.success

        def evaluate(sensor: dg.SensorDefinition) -> dict[str, str]:
            context = dg.build_run_status_sensor_context(
                sensor_name=sensor.name,
                dagster_event=result.get_run_failure_event(),
                dagster_instance=instance,
                dagster_run=result.dagster_run,
            )
            sensor(context.for_run_failure())
            run = instance.get_run_by_id(result.run_id)
            assert run is not None
            return dict(run.tags)

        capfd.readouterr()
        tags = evaluate(run_failure_recorder(webhook_url=url))
        log = capfd.readouterr().err  # the sensor's log line (the daemon's log, and the tick's in the UI)
        assert tags[FAILED_ASSETS_TAG] == "supervised/dataset"
        assert "no/such-dataset-anywhere" in tags[FAILURE_TAG]
        assert tags[FAILURE_TAG].startswith("DatasetSourceError: ")
        assert tags[FAILURE_WEBHOOK_TAG] == "sent"
        (payload,) = received
        assert payload["run_id"] == result.run_id and payload["job"] == "supervised_job"
        assert list(payload["failures"]) == ["supervised/dataset"]
        assert (
            f"Kitchen run {result.run_id} (supervised_job) failed: supervised/dataset: DatasetSourceError"
            in log
        )

        # An unreachable webhook is recorded on the run, not swallowed and not a sensor crash.
        tags = evaluate(run_failure_recorder(webhook_url="http://127.0.0.1:9/hook"))
        assert tags[FAILURE_WEBHOOK_TAG].startswith("failed: ")

        # A webhook URL is a bearer secret (Slack's path is the credential): an unreachable one and a
        # malformed one (whose error message quotes the URL) show only scheme and host, anywhere.
        shown = {
            f"http://127.0.0.1:9/services/{CANARY}": "failure webhook http://127.0.0.1:9/*** not reached",
            f"hooks.invalid/services/{CANARY}": "failure webhook *** not reached",
        }
        for secret_url, line in shown.items():
            capfd.readouterr()
            tags = evaluate(run_failure_recorder(webhook_url=secret_url))
            out, err = capfd.readouterr()
            assert tags[FAILURE_WEBHOOK_TAG].startswith("failed: ")
            assert CANARY not in out + err and CANARY not in json.dumps(tags)
            assert line in err
        for record in instance.get_records_for_run(result.run_id).records:
            assert CANARY not in record.event_log_entry.to_json()
