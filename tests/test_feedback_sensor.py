"""The feedback retraining sensor on a tiny supervised run's champion, served by the app.

Feedback is posted to the app serving ``models:/NAME@champion``; the sensor is ticked with
``dg.build_sensor_context`` on one instance, and each run it requests is executed in process as the daemon
would launch it, so the next tick sees what that run did: a batch is materialised once, trained once
(from the champion, through the usual gate and champion rule), and never again, cursor or no cursor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from fastapi.testclient import TestClient

from jobs.feedback import ATTEMPT_TAG, BATCH_TAG, LAST_SEQ_TAG, FeedbackRetrainSettings, feedback_target
from kitchen.manifests import BaseModelManifest, DatasetManifest, RegisteredModelManifest
from kitchen.registry import ModelRegistry, default_tracking_uri
from kitchen.registry.names import parse_model_ref
from kitchen.serve import ModelSource, RegistryLocator, ServeSettings, create_app
from kitchen.serve.feedback import FeedbackStore
from kitchen.workflows import get_workflow, workflows
from kitchen_assets.definitions import build_definitions
from kitchen_assets.feedback import FEEDBACK_KEY
from kitchen_assets.io import read_manifest
from resources.local_engine import LocalServiceClient
from tests.champion_home import home_with_tiny_champion

NAME = "supervised-tiny-kitchen-arithmetic"
REF = f"models:/{NAME}@champion"
SENSOR = "supervised_feedback_sensor"
RETRAIN = {
    "batch_size": 2,
    "max_steps": 2,
    "save_every": 2,
    "learning_rate": 5e-3,
    "lora_rank": 4,
    "max_length": 64,
    "eval_examples": 2,
    "eval_max_tokens": 4,
    "gate_metric": "nll",
    "gate_margin": 0.0,
}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """One tiny supervised run: its champion (v1) is what is served and what retraining starts from."""
    return home_with_tiny_champion(tmp_path_factory, tiny_model_dir, "feedback")


@pytest.fixture(autouse=True)
def kitchen_home(home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """The module's home (its registry), feedback on, retraining supervised on 3 corrected replies."""
    config = tmp_path / "retrain.yaml"
    config.write_text(yaml.safe_dump(RETRAIN))
    monkeypatch.setenv("KITCHEN_HOME", str(home))
    monkeypatch.setenv("KITCHEN_FEEDBACK", "on")
    monkeypatch.setenv("KITCHEN_FEEDBACK_WORKFLOW", "supervised")
    monkeypatch.setenv("KITCHEN_SUPERVISED_FEEDBACK_THRESHOLD", "3")
    monkeypatch.setenv("KITCHEN_SUPERVISED_FEEDBACK_RUN_CONFIG", str(config))
    yield home


@contextmanager
def _serving(db: Path) -> Iterator[TestClient]:
    """The app serving the champion, keeping completions and feedback in ``db``."""
    service = LocalServiceClient(num_threads=1)
    source = ModelSource(
        RegistryLocator(ModelRegistry(default_tracking_uri()), parse_model_ref(REF)),
        lambda path: service.create_sampling_client(model_path=path).result(),
        poll_s=None,
    )
    app = create_app(source, ServeSettings(), FeedbackStore(db))
    with TestClient(app) as client:
        yield client


@pytest.fixture
def http(home: Path) -> Iterator[TestClient]:
    with _serving(home / "feedback.db") as client:
        yield client


def _correct(http: TestClient, a: int, b: int) -> str:
    """Ask ``a + b`` and post the right answer as the correction; the reply it corrects."""
    question = [{"role": "user", "content": f"What is {a} + {b}?"}]
    response = http.post(
        "/v1/chat/completions", json={"model": REF, "messages": question, "max_tokens": 4, "temperature": 0}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == f"{NAME}/1"
    posted = http.post(
        "/v1/feedback", json={"completion_id": body["id"], "rating": "down", "correction": str(a + b)}
    )
    assert posted.status_code == 200, posted.text
    return str(body["choices"][0]["message"]["content"])


def _tick(sensor: dg.SensorDefinition, instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorResult:
    result = sensor(dg.build_sensor_context(instance=instance, cursor=cursor))
    assert isinstance(result, dg.SensorResult)
    return result


def _skipped(result: dg.SensorResult) -> str:
    assert not result.run_requests
    assert result.skip_reason is not None and result.skip_reason.skip_message is not None
    return result.skip_reason.skip_message


def _run(
    defs: dg.Definitions, instance: dg.DagsterInstance, request: dg.RunRequest, **changed: Any
) -> dg.ExecuteInProcessResult:
    """Execute a requested run as the daemon would launch it: its job, config (with ``changed``) and tags."""
    assert request.job_name is not None
    job = defs.resolve_job_def(request.job_name)
    return job.execute_in_process(
        run_config={**request.run_config, **changed},
        instance=instance,
        tags=request.tags,
        raise_on_error=False,
    )


def test_a_batch_of_feedback_trains_once(http: TestClient, home: Path) -> None:
    defs = build_definitions("local")
    sensor = defs.get_sensor_def(SENSOR)
    with dg.DagsterInstance.ephemeral() as instance:
        first = _tick(sensor, instance, None)
        assert _skipped(first) == "0 of 3 corrected replies in 0 new feedback after seq 0"

        _correct(http, 2, 3)
        _correct(http, 4, 4)
        below = _tick(sensor, instance, first.cursor)
        assert _skipped(below) == "2 of 3 corrected replies in 2 new feedback after seq 0"

        _correct(http, 6, 1)
        batch = _tick(sensor, instance, below.cursor)
        [materialise] = batch.run_requests
        assert (materialise.job_name, materialise.run_key) == ("feedback_job", "feedback-000000-000003")
        assert materialise.tags[BATCH_TAG] == "000000-000003"
        # Until the batch is materialised it is asked for again (the daemon drops a repeated run key).
        assert [r.run_key for r in _tick(sensor, instance, batch.cursor).run_requests] == [
            materialise.run_key
        ]
        assert _run(defs, instance, materialise).success

        launch = _tick(sensor, instance, batch.cursor)
        [retrain] = launch.run_requests
        assert (retrain.job_name, retrain.run_key) == ("supervised_job", "supervised-feedback-000000-000003")
        sft = Path(retrain.run_config["dataset"])
        expected = [
            [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": str(a + b)}]
            for a, b in ((2, 3), (4, 4), (6, 1))
        ]
        assert [json.loads(line)["messages"] for line in sft.read_text().splitlines()] == expected
        assert sft.parent == home / "feedback" / "batches" / "000000-000003"
        assert retrain.run_config["model"] == REF and retrain.run_config["registered_model_name"] == NAME
        assert {k: retrain.run_config[k] for k in RETRAIN} == RETRAIN
        assert (retrain.tags[BATCH_TAG], retrain.tags[LAST_SEQ_TAG]) == ("000000-000003", "3")

        trained = _run(defs, instance, retrain)
        base = read_manifest(dg.AssetKey(["supervised", "base_model"]))
        dataset = read_manifest(dg.AssetKey(["supervised", "dataset"]))
        assert isinstance(base, BaseModelManifest) and isinstance(dataset, DatasetManifest)
        assert base.registered_version == f"models:/{NAME}/1"  # started from the served champion
        assert dataset.train_rows + dataset.test_rows == 3
        # The usual gate decides: a passing gate registers a version of the served model, which the
        # champion rule names champion or challenger; a failing one stops registration.
        checks = trained.get_asset_check_evaluations()
        assert checks, "the eval gate ran"
        if all(c.passed for c in checks):
            registered = read_manifest(dg.AssetKey(["supervised", "registered_model"]))
            assert isinstance(registered, RegisteredModelManifest)
            assert (registered.name, registered.version) == (NAME, "2")

        # The batch never trains again: not on the next tick, nor after a cursor reset.
        assert "0 of 3" in _skipped(_tick(sensor, instance, launch.cursor))
        assert "after seq 3" in _skipped(_tick(sensor, instance, None))

        # New feedback makes a new batch, from where the last one ended.
        for a, b in ((1, 1), (3, 3), (5, 2)):
            _correct(http, a, b)
        [following] = _tick(sensor, instance, launch.cursor).run_requests
        assert following.run_key == "feedback-000003-000006"
        config = following.run_config["ops"]["feedback__training_data"]["config"]
        assert config == {"after_seq": 3, "last_seq": 6}


def test_a_failed_retraining_run_is_requested_again(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that fails is requested again with the same config and tags, before newer feedback is
    batched, up to the attempts allowed; a run the eval gate rejected is not (that is its verdict)."""
    db = tmp_path / "feedback.db"  # a store of its own: batches from seq 0
    monkeypatch.setenv("KITCHEN_FEEDBACK_DB", str(db))
    defs = build_definitions("local")
    sensor = defs.get_sensor_def(SENSOR)
    with _serving(db) as http, dg.DagsterInstance.ephemeral() as instance:

        def retraining(*questions: tuple[int, int]) -> dg.RunRequest:
            for a, b in questions:
                _correct(http, a, b)
            [materialise] = _tick(sensor, instance, None).run_requests
            assert _run(defs, instance, materialise).success
            [request] = _tick(sensor, instance, None).run_requests
            return request

        first = retraining((7, 1), (8, 1), (9, 1))
        assert first.run_key == "supervised-feedback-000000-000003"
        dataset = Path(first.run_config["dataset"])
        hidden = dataset.rename(dataset.with_name("away"))  # the run fails before training
        assert not _run(defs, instance, first).success
        [again] = _tick(sensor, instance, None).run_requests
        assert again.run_key == "supervised-feedback-000000-000003-attempt-2"
        assert again.job_name == first.job_name and again.run_config == first.run_config
        assert again.tags == {**first.tags, ATTEMPT_TAG: "2"}

        # Attempt 2 trains, and the gate rejects the weights: final, the batch is not retrained.
        hidden.rename(dataset)
        rejected = _run(defs, instance, again, gate_margin=100.0)
        assert not rejected.success
        assert not all(c.passed for c in rejected.get_asset_check_evaluations())
        assert (
            _skipped(_tick(sensor, instance, None))
            == "0 of 3 corrected replies in 0 new feedback after seq 3"
        )

        # A batch whose run keeps failing is requested until its three attempts are spent.
        second = retraining((1, 2), (2, 2), (3, 2))
        assert second.run_key == "supervised-feedback-000003-000006"
        Path(second.run_config["dataset"]).unlink()
        request = second
        for attempt in (2, 3):
            assert not _run(defs, instance, request).success
            [request] = _tick(sensor, instance, None).run_requests
            assert (request.run_key, request.tags[ATTEMPT_TAG]) == (
                f"{second.run_key}-attempt-{attempt}",
                str(attempt),
            )
        assert not _run(defs, instance, request).success
        assert "after seq 6" in _skipped(_tick(sensor, instance, None))


def test_the_target_and_its_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    on = build_definitions("local")
    assert on.resolve_assets_def(FEEDBACK_KEY) and on.resolve_job_def("feedback_job")
    monkeypatch.delenv("KITCHEN_FEEDBACK")
    off = build_definitions("local")
    assert FEEDBACK_KEY not in off.resolve_asset_graph().get_all_asset_keys()
    assert SENSOR not in {s.name for s in off.sensors or []}
    assert feedback_target().name == "supervised"  # KITCHEN_FEEDBACK_WORKFLOW
    monkeypatch.delenv("KITCHEN_FEEDBACK_WORKFLOW")
    names = {w.name for w in workflows()}
    assert feedback_target().name == ("dpo" if "dpo" in names else "supervised")
    supervised = get_workflow("supervised")
    settings = FeedbackRetrainSettings.from_env(supervised)
    assert (settings.threshold, settings.trains_on, settings.model) == (3, "sft", None)
    assert settings.max_attempts == 3
    monkeypatch.setenv("KITCHEN_SUPERVISED_FEEDBACK_MAX_ATTEMPTS", "0")
    with pytest.raises(ValueError, match="KITCHEN_SUPERVISED_FEEDBACK_MAX_ATTEMPTS: must be at least 1"):
        FeedbackRetrainSettings.from_env(supervised)
    monkeypatch.delenv("KITCHEN_SUPERVISED_FEEDBACK_MAX_ATTEMPTS")
    assert settings.default_status == dg.DefaultSensorStatus.STOPPED
    monkeypatch.setenv("KITCHEN_SUPERVISED_FEEDBACK_THRESHOLD", "2.5")
    with pytest.raises(ValueError, match="whole number"):
        FeedbackRetrainSettings.from_env(supervised)
    bad: dict[str, Any] = {"batch_size": 0}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    monkeypatch.setenv("KITCHEN_SUPERVISED_FEEDBACK_THRESHOLD", "3")
    monkeypatch.setenv("KITCHEN_SUPERVISED_FEEDBACK_RUN_CONFIG", str(tmp_path / "bad.yaml"))
    with pytest.raises(ValueError, match="not a valid run config"):
        FeedbackRetrainSettings.from_env(supervised)
    monkeypatch.setenv("KITCHEN_FEEDBACK_WORKFLOW", "nope")
    with pytest.raises(ValueError, match="KITCHEN_FEEDBACK_WORKFLOW='nope'"):
        feedback_target()
