"""Feedback to training data: the rules on a hand-filled store, then the ``feedback/training_data`` asset on
feedback posted to the serving app (the tiny model's base weights), batch after batch.

Expected pairs and rows are written out by hand from the replies the app returned, not rebuilt with the
code under test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from fastapi.testclient import TestClient
from test_serve_app import BaseLocator

from kitchen import telemetry
from kitchen.feedback import build_training_data, served_model_name, write_training_data
from kitchen.manifests import FeedbackDataManifest
from kitchen.serve import ModelSource, ServeSettings, create_app
from kitchen.serve.feedback import FeedbackStore
from kitchen.workflows import get_workflow, workflows
from kitchen_assets.feedback import FEEDBACK_KEY, FeedbackSettings, feedback_asset, feedback_settings
from kitchen_assets.io import ManifestIOManager, read_manifest
from resources.local_engine import LocalServiceClient

Q1 = [{"role": "user", "content": "What is 17 + 25?"}]
Q2 = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "What is 2 + 2?"}]
KEY = "feedback-test-key"


def _read(path: str | Path | None) -> list[dict[str, Any]]:
    assert path is not None
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _pair(prompt: list[dict[str, str]], chosen: str, rejected: str) -> dict[str, Any]:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def test_rules_on_a_hand_filled_store(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path / "feedback.db")
    store.record_completion("c1", "m/1", Q1, ["41", "42"])
    store.record_completion("c2", "m/2", Q1, ["40"])
    store.record_completion("c3", "m/2", Q2, ["five", "4", "four"])
    store.record_completion("c4", "m/2", [*Q2, {"role": "assistant", "content": "4"}], ["x"])
    add = store.add_feedback
    add("c1", choice_index=0, rating="down", correction=" 42 ")  # seq 1: row + pair; down has no up yet
    add("c1", choice_index=1, rating="up")  # seq 2: pairs with the down-vote of seq 1
    add("c2", rating="down", correction="42")  # seq 3: a repeated correction: pair, no second row
    add("c3", choice_index=0, score=0.0)  # seq 4: no other score yet
    add("c3", choice_index=1, score=1.0)  # seq 5: higher than seq 4
    add("c3", choice_index=2, score=0.5)  # seq 6: between the two
    add("c4", rating="up")  # seq 7: the prompt ends on an assistant turn
    add("c1", choice_index=1, correction="42")  # seq 8: the correction repeats the reply
    add("c2", rating="down")  # seq 9: the same down-vote again pairs nothing new

    everything = build_training_data(store.feedback(), 0)
    assert (everything.batch.id, everything.feedback) == ("000000-000009", 9)
    assert everything.sft_rows == [{"messages": [*Q1, {"role": "assistant", "content": "42"}]}]
    assert everything.pairs == [
        _pair(Q1, "42", "41"),  # seq 1's correction (seq 2's up over down is the same pair: made once)
        _pair(Q1, "42", "40"),  # seq 3's correction over its reply
        _pair(Q2, "4", "five"),  # seq 5 over seq 4
        _pair(Q2, "four", "five"),  # seq 6 over seq 4
        _pair(Q2, "4", "four"),  # seq 5 over seq 6
    ]
    assert dict(everything.skipped) == {
        "unpaired": 2,  # seq 1's down-vote, seq 4's score
        # seq 2's pair (= seq 1's); seq 3's row and its down-vote against seq 2 (= its correction's pair);
        # seq 8's row; seq 9's down-vote against seq 2 again
        "duplicate": 5,
        "bad_prompt": 1,  # seq 7
        "correction_equals_reply": 1,  # seq 8
    }
    counts = {v: (c.feedback, c.pairs, c.sft_rows) for v, c in everything.by_version.items()}
    assert counts == {"m/1": (3, 1, 1), "m/2": (6, 4, 0)}
    assert everything.model_names == ["m"]

    # Batches: (0, 3] then (3, 9]; together they make exactly what one batch does, none twice.
    first, rest = build_training_data(store.feedback(), 0, 3), build_training_data(store.feedback(), 3)
    assert first.pairs + rest.pairs == everything.pairs
    assert first.sft_rows + rest.sft_rows == everything.sft_rows
    assert (first.batch.id, rest.batch.id, rest.feedback) == ("000000-000003", "000003-000009", 6)
    assert build_training_data(store.feedback(), 9).feedback == 0

    written = write_training_data(everything, tmp_path / "batches")
    assert written.directory == tmp_path / "batches" / "000000-000009"
    assert written.pairs_path is not None and written.pairs_hash is not None
    assert written.pairs_path.name == f"pairs-{written.pairs_hash[:12]}.jsonl"
    assert _read(written.pairs_path) == everything.pairs and _read(written.sft_path) == everything.sft_rows
    assert write_training_data(everything, tmp_path / "batches") == written  # same content, same files
    assert write_training_data(build_training_data(store.feedback(), 9), tmp_path / "b").pairs_path is None
    assert sorted(p.name for p in written.directory.iterdir()) == sorted(
        [written.pairs_path.name, Path(str(written.sft_path)).name]
    )  # nothing half-written left behind


def test_served_model_name() -> None:
    assert served_model_name("supervised-tiny/3") == "supervised-tiny"
    assert served_model_name("tiny") is None
    assert served_model_name("file:///tmp/engine/x/sampler/step-4") is None


def test_feedback_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KITCHEN_FEEDBACK", raising=False)
    assert feedback_settings() is None
    monkeypatch.setenv("KITCHEN_FEEDBACK", "on")
    settings = feedback_settings()
    assert settings is not None and settings.path == Path(str(tmp_path / "kitchen-home" / "feedback.db"))
    monkeypatch.setenv("KITCHEN_FEEDBACK_DB", str(tmp_path / "other.db"))
    assert feedback_settings() == FeedbackSettings(tmp_path / "other.db")
    monkeypatch.setenv("KITCHEN_FEEDBACK", "maybe")
    with pytest.raises(ValueError, match="KITCHEN_FEEDBACK='maybe'"):
        feedback_settings()


@pytest.fixture
def http(tiny_model_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    service = LocalServiceClient(num_threads=1)
    source = ModelSource(
        BaseLocator(tiny_model_dir),
        lambda path: service.create_sampling_client(base_model=path).result(),
        poll_s=None,
    )
    app = create_app(source, ServeSettings(api_key=KEY), FeedbackStore(tmp_path / "feedback.db"))
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


def _ask(http: TestClient, seed: int) -> tuple[str, list[str]]:
    body = {"model": "tiny", "messages": Q1, "max_tokens": 6, "temperature": 1.0, "seed": seed, "n": 2}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    payload = response.json()
    return payload["id"], [c["message"]["content"] for c in payload["choices"]]


def _feedback(http: TestClient, **body: Any) -> None:
    response = http.post("/v1/feedback", json=body)
    assert response.status_code == 200, response.text


def _materialize(
    settings: FeedbackSettings, instance: dg.DagsterInstance, **config: int
) -> FeedbackDataManifest:
    result = dg.materialize(
        [feedback_asset(settings)],
        instance=instance,
        resources={"io_manager": ManifestIOManager()},
        run_config={"ops": {"feedback__training_data": {"config": config}}},
    )
    assert result.success
    manifest = read_manifest(FEEDBACK_KEY)
    assert isinstance(manifest, FeedbackDataManifest)
    event = result.get_asset_materialization_events()[0].materialization
    assert event.metadata["pairs"].value == manifest.pairs
    assert event.metadata["sft_rows"].value == manifest.sft_rows
    return manifest


def test_the_asset_turns_posted_feedback_into_batches(http: TestClient, tmp_path: Path) -> None:
    settings = FeedbackSettings(tmp_path / "feedback.db")
    first, replies = _ask(http, seed=3)
    assert len({r.strip() for r in replies} | {"42"}) == 3, replies  # three different texts to pair
    _feedback(http, completion_id=first, rating="down", correction="42")
    _feedback(http, completion_id=first, choice_index=1, rating="up")

    received: list[telemetry.TelemetryEvent] = []
    with (
        dg.DagsterInstance.ephemeral() as instance,
        telemetry.attached_handler("feedback-test", telemetry.FEEDBACK_BATCH, received.append),
    ):
        one = _materialize(settings, instance)
        assert (one.batch, one.feedback, one.pairs, one.sft_rows) == ("000000-000002", 2, 2, 1)
        assert _read(one.pairs_path) == [_pair(Q1, "42", replies[0]), _pair(Q1, replies[1], replies[0])]
        assert _read(one.sft_path) == [{"messages": [*Q1, {"role": "assistant", "content": "42"}]}]
        assert one.skipped == {"unpaired": 1}  # the first down-vote had no up-vote yet
        assert one.by_version == {"tiny": {"feedback": 2, "pairs": 2, "sft_rows": 1}}
        assert one.model_names == []  # "tiny" is no registered version
        [event] = received
        assert event.measurements == {"feedback": 2, "pairs": 2, "sft_rows": 1, "skipped": 1}
        assert (event.metadata["batch"], event.metadata["workflow"]) == ("000000-000002", "feedback")
        assert event.metadata["by_version"] == one.by_version

        # A second batch starts where the first ended; its down-vote pairs with the first batch's up-vote.
        second, later = _ask(http, seed=11)
        assert later[0].strip() not in (replies[1].strip(), "42"), later
        _feedback(http, completion_id=second, rating="down", correction="42")
        two = _materialize(settings, instance)
        assert (two.batch, two.after_seq, two.feedback, two.sft_rows) == ("000002-000003", 2, 1, 0)
        assert _read(two.pairs_path) == [_pair(Q1, "42", later[0]), _pair(Q1, replies[1], later[0])]
        assert two.sft_path is None and two.skipped == {"duplicate": 1}  # "42" was a row already

        # An explicit range rebuilds the first batch byte for byte.
        again = _materialize(settings, instance, after_seq=0, last_seq=2)
        assert (again.pairs_path, again.pairs_hash) == (one.pairs_path, one.pairs_hash)

        missing = FeedbackSettings(tmp_path / "nowhere.db")
        with pytest.raises(dg.Failure, match="no feedback store at"):
            dg.materialize(
                [feedback_asset(missing)], instance=instance, resources={"io_manager": ManifestIOManager()}
            )


@pytest.mark.parametrize("workflow_name", ["supervised", "dpo"])
def test_the_files_load_as_each_workflows_dataset(workflow_name: str, tmp_path: Path) -> None:
    """The batch's files are what the workflows read: SFT's chat loader, and DPO's preference loader
    once a ``dpo`` workflow is registered (this module does not depend on its code)."""
    if workflow_name not in {w.name for w in workflows()}:
        pytest.skip(f"no {workflow_name!r} workflow registered")
    store = FeedbackStore(tmp_path / "feedback.db")
    for a in range(1, 6):
        question = [{"role": "user", "content": f"What is {a} + {a}?"}]
        store.record_completion(f"c{a}", "m/1", question, [str(a)])
        store.add_feedback(f"c{a}", rating="down", correction=str(2 * a))
    written = write_training_data(build_training_data(store.feedback(), 0), tmp_path / "batches")
    workflow = get_workflow(workflow_name)
    path = written.pairs_path if workflow_name == "dpo" else written.sft_path
    loaded = workflow.load_dataset(workflow.sections["dataset"](dataset=str(path), test_size=0.2))
    assert sum(loaded.skipped_rows.values()) == 0
    assert sum(len(split) for split in loaded.dataset.values()) == 5
    if workflow_name == "dpo":
        rows = [r for split in loaded.dataset.values() for r in split]
        assert sorted((r["chosen"], r["rejected"]) for r in rows) == sorted(
            (str(2 * a), str(a)) for a in range(1, 6)
        )


def test_a_dpo_retraining_run_trains_on_the_pairs(tmp_path: Path) -> None:
    """With ``dpo`` registered, the retraining run is ``dpo_job`` on the batch's pairs, from the champion."""
    from jobs.feedback import FeedbackRetrainSettings, feedback_target, retraining_request

    if "dpo" not in {w.name for w in workflows()}:
        pytest.skip("no 'dpo' workflow registered")
    assert feedback_target().name == "dpo"
    batch = FeedbackDataManifest(
        batch="000000-000040",
        after_seq=0,
        last_seq=40,
        store=str(tmp_path / "feedback.db"),
        feedback=40,
        pairs=20,
        sft_rows=3,
        pairs_path=str(tmp_path / "pairs-0123456789ab.jsonl"),
        sft_path=str(tmp_path / "sft-0123456789ab.jsonl"),
        model_names=["old-model", "served-model"],
    )
    request = retraining_request(FeedbackRetrainSettings(get_workflow("dpo"), threshold=16), batch)
    assert isinstance(request, dg.RunRequest)
    assert (request.job_name, request.run_key) == ("dpo_job", "dpo-feedback-000000-000040")
    assert request.run_config == {
        "dataset": batch.pairs_path,
        "model": "models:/served-model@champion",
        "registered_model_name": "served-model",
    }
