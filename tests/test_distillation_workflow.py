"""The distillation group on tiny models: both modes train, evaluate, gate and register from the defaults
(the default teacher name, registered here by a tiny supervised run) and from a prompts file; bad input
fails in one line before any sampling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from kitchen.data.sources import load_saved_dataset
from kitchen.manifests import (
    CheckpointsManifest,
    DatasetManifest,
    DatumsManifest,
    EvalManifest,
    NotUsedManifest,
    RegisteredModelManifest,
    TeacherManifest,
    TeacherSamplesManifest,
)
from kitchen.models.tiny import build_tiny_model
from kitchen.workflows.distillation import DEFAULT_TEACHER, DEFAULT_TEACHER_NAME
from kitchen.workflows.supervised import smoke_run_config as supervised_smoke
from kitchen_assets.definitions import build_definitions
from kitchen_assets.io import read_manifest

REPO = Path(__file__).resolve().parents[1]
KINDS = (
    "base_model",
    "teacher_model",
    "dataset",
    "teacher_samples",
    "datums",
    "checkpoints",
    "trained_weights",
    "eval_report",
    "registered_model",
)


def _key(kind: str) -> dg.AssetKey:
    return dg.AssetKey(["distillation", kind])


def _job(name: str) -> Any:
    return build_definitions("local").resolve_job_def(name)


@pytest.fixture(scope="module")
def teacher_store(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A tiny supervised run registered under the default teacher's name: the SFT champion on
    ``kitchen/arithmetic``, as ``make run`` registers it for SmolLM2. Trained hard enough (30 steps at a
    high rate) that its replies differ clearly from the untrained student's."""
    home = tmp_path_factory.mktemp("teacher-home")
    uri = f"sqlite:///{home}/mlflow.db"
    config = {
        **supervised_smoke(str(tiny_model_dir)),
        "max_rows": 240,
        "batch_size": 8,
        "max_steps": 30,
        "save_every": 0,
        "learning_rate": 2e-2,
        "lora_rank": 8,
        "registered_model_name": DEFAULT_TEACHER_NAME,
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KITCHEN_HOME", str(home))
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        with dg.DagsterInstance.ephemeral() as instance:
            result = _job("supervised_job").execute_in_process(run_config=config, instance=instance)
        registered = read_manifest(dg.AssetKey(["supervised", "registered_model"]), home / "manifests")
    assert result.success and isinstance(registered, RegisteredModelManifest)
    assert registered.name == DEFAULT_TEACHER_NAME and registered.alias == "champion"
    yield uri


@pytest.fixture
def shared_store(teacher_store: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", teacher_store)
    return teacher_store


def tiny_config(model_dir: Path, **overrides: Any) -> dict[str, Any]:
    """The workflow's defaults except what a tiny model needs: the student, small sizes, a gate on the
    held-out reverse KL (a tiny model gets no sum right, so exact match cannot move)."""
    return {
        "model": str(model_dir),
        "max_rows": 64,
        "batch_size": 8,
        "group_size": 2,
        "max_tokens": 6,
        "max_steps": 6,
        "save_every": 3,
        "learning_rate": 1e-2,
        "lora_rank": 4,
        "max_length": 64,
        "eval_examples": 12,
        "eval_max_tokens": 6,
        "gate_metric": "teacher_kl",
        "gate_margin": 0.0,
        "gate_max_nll_increase": None,
        "gate_min_gap_closed": 0.05,
        **overrides,
    }


def _run(config: dict[str, Any], instance: dg.DagsterInstance, **kwargs: Any) -> dg.ExecuteInProcessResult:
    return _job("distillation_job").execute_in_process(
        run_config=config, instance=instance, raise_on_error=False, **kwargs
    )


def _failure(result: dg.ExecuteInProcessResult) -> tuple[str, str]:
    event = next(e for e in result.all_events if e.is_step_failure)
    assert event.step_failure_data is not None
    error = event.step_failure_data.error
    while (
        error is not None
        and error.cause is not None
        and error.cls_name
        and error.cls_name.startswith("Dagster")
    ):
        error = error.cause
    return event.step_key or "", error.message if error else ""


def _materialized(result: dg.ExecuteInProcessResult) -> set[str]:
    return {e.asset_key.path[-1] for e in result.get_asset_materialization_events() if e.asset_key}


def _metrics(checkpoints: CheckpointsManifest) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(checkpoints.metrics_path).read_text().splitlines()]


def test_on_policy_from_the_defaults(shared_store: str, tiny_model_dir: Path) -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        result = _run(tiny_config(tiny_model_dir), instance)
    assert result.success, _failure(result)
    assert _materialized(result) == set(KINDS)

    teacher = read_manifest(_key("teacher_model"))
    assert isinstance(teacher, TeacherManifest)
    assert teacher.name == DEFAULT_TEACHER and teacher.mode == "on_policy" and teacher.same_tokenizer
    assert teacher.registered_version == f"models:/{DEFAULT_TEACHER_NAME}/1"
    for kind in ("teacher_samples", "datums"):  # the static graph's off-policy assets cost nothing here
        manifest = read_manifest(_key(kind))
        assert isinstance(manifest, NotUsedManifest) and "on_policy" in manifest.reason

    checkpoints = read_manifest(_key("checkpoints"))
    assert isinstance(checkpoints, CheckpointsManifest) and checkpoints.steps == 6
    steps = _metrics(checkpoints)
    for step in steps:
        m = step["metrics"]
        assert {
            "teacher_kl",
            "optim/kl_sample_train_v1",
            "optim/kl_sample_train_v2",
            "optim/entropy",
        } <= m.keys()
        # on-policy, the sampler's logprobs are the trainer's: no sample/train mismatch
        assert abs(m["optim/kl_sample_train_v1"]) < 1e-4
        # 8 prompts x 2 samples, each 1 to 6 completion tokens
        assert m["env/all/total_episodes"] == 16 and 16 <= m["env/all/total_ac_tokens"] <= 96
        assert step["trained_tokens"] == m["env/all/total_ac_tokens"]
        # importance_sampling at ratio 1 without discount: loss per completion token = kl_coef * teacher_kl
        assert m["loss"] == pytest.approx(m["teacher_kl"], abs=1e-4)
    assert [s["policy_version"] for s in steps] == list(range(6))  # every step sampled the latest weights

    report = read_manifest(_key("eval_report"))
    assert isinstance(report, EvalManifest) and report.gate_passed
    saved = json.loads(Path(report.report_path).read_text())
    assert saved["reference_label"] == "teacher" and saved["reference"]["teacher_kl"] == 0.0
    for column in (saved["base"], saved["trained"], saved["reference"]):
        assert {"nll", "exact_match", "f1", "teacher_kl"} <= column.keys()
    assert saved["trained"]["teacher_kl"] < saved["base"]["teacher_kl"]
    assert saved["gate"]["settings"]["min_gap_closed"] == 0.05
    assert {"base", "trained", "teacher"} <= saved["generations"][0].keys()
    assert saved["higher_is_better"]["teacher_kl"] is False

    registered = read_manifest(_key("registered_model"))
    assert isinstance(registered, RegisteredModelManifest) and registered.gate_passed
    from mlflow import MlflowClient

    tags = MlflowClient(shared_store).get_model_version(registered.name, registered.version).tags
    assert tags["kitchen.workflow"] == "distillation"
    assert tags["kitchen.teacher_model.registered_version"] == teacher.registered_version
    assert tags["kitchen.teacher_model.content_hash"] == teacher.content_hash
    assert tags["kitchen.teacher_model.name"] == DEFAULT_TEACHER


def _prompts_file(path: Path, rows: int) -> Path:
    """``messages`` rows of four kinds in turn: a user turn with an answer column, a system and a user turn,
    a user turn with a reply (ignored, counted), and no user turn at all (skipped, counted)."""
    lines = []
    for i in range(rows):
        user = {"role": "user", "content": f"What is {i} + {i + 3}?"}
        kind = i % 4
        if kind == 0:
            row: dict[str, Any] = {"messages": [user], "answer": str(2 * i + 3)}
        elif kind == 1:
            row = {"messages": [{"role": "system", "content": "Reply with only the number."}, user]}
        elif kind == 2:
            row = {"messages": [user, {"role": "assistant", "content": str(2 * i + 3)}]}
        else:
            row = {
                "messages": [{"role": "system", "content": f"s{i}"}, {"role": "assistant", "content": "a"}]
            }
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_off_policy_from_a_prompts_file(shared_store: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = _prompts_file(tmp_path / "prompts.jsonl", 80)
    config = tiny_config(
        tiny_model_dir,
        mode="off_policy",
        dataset=str(prompts),
        max_rows=None,
        test_size=0.2,
        batch_size=8,
        max_steps=8,
        max_tokens=8,
        temperature=0.7,
    )
    with dg.DagsterInstance.ephemeral() as instance:
        result = _run(config, instance)
        assert result.success, _failure(result)
        assert _materialized(result) == set(KINDS)

        samples = read_manifest(_key("teacher_samples"))
        assert isinstance(samples, TeacherSamplesManifest) and not samples.reused
        assert samples.sampling == {"max_tokens": 8, "temperature": 0.7, "samples_per_prompt": 1, "seed": 0}
        assert samples.teacher == f"models:/{DEFAULT_TEACHER_NAME}/1"
        # 80 rows, one in four with no user turn (skipped); of the 60 prompts, 20 came with a reply
        dataset = read_manifest(_key("dataset"))
        assert isinstance(dataset, DatasetManifest) and dataset.schema_found == "messages"
        assert dataset.skipped_rows == {"no_user_turn": 20}
        assert samples.replies_ignored == 20
        assert samples.prompts == dataset.train_rows == 48
        assert samples.train_rows + sum(samples.dropped.values()) == 48

        datums = read_manifest(_key("datums"))
        assert isinstance(datums, DatumsManifest) and datums.num_datums == samples.train_rows
        checkpoints = read_manifest(_key("checkpoints"))
        assert isinstance(checkpoints, CheckpointsManifest) and checkpoints.steps == samples.train_rows // 8
        assert all("teacher_kl" not in s["metrics"] and s["loss"] > 0 for s in _metrics(checkpoints))

        report = read_manifest(_key("eval_report"))
        assert isinstance(report, EvalManifest) and report.gate_passed
        assert report.trained["teacher_kl"] < report.base["teacher_kl"]
        assert isinstance(read_manifest(_key("registered_model")), RegisteredModelManifest)

        # A student rerun (another learning rate) finds the teacher's samples instead of resampling.
        again = _run({**config, "learning_rate": 5e-3}, instance, asset_selection=[_key("teacher_samples")])
        assert again.success
        reused = read_manifest(_key("teacher_samples"))
        assert isinstance(reused, TeacherSamplesManifest) and reused.reused
        assert reused.content_hash == samples.content_hash and reused.path == samples.path

        # Fewer steps than the prompts fill: the teacher answers only the first 3 x 8 = 24 (a new sample set).
        fewer = _run({**config, "max_steps": 3}, instance, asset_selection=[_key("teacher_samples")])
        assert fewer.success
        cut = read_manifest(_key("teacher_samples"))
        assert isinstance(cut, TeacherSamplesManifest) and not cut.reused and cut.prompts == 24
        assert cut.train_rows + sum(cut.dropped.values()) == 24
        first_prompts = [r["messages"] for r in load_saved_dataset(dataset.path)["train"].select(range(24))]
        sampled = [r["messages"][:-1] for r in load_saved_dataset(cut.path)["train"]]
        assert all(p in first_prompts for p in sampled)


def test_a_teacher_with_another_tokenizer_is_refused_on_policy_before_sampling(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    other = build_tiny_model(tmp_path / "other-vocab", vocab_size=300, seed=2)
    with dg.DagsterInstance.ephemeral() as instance:
        result = _run(tiny_config(tiny_model_dir, teacher=str(other)), instance)
        assert not result.success
        step, message = _failure(result)
        assert step == "distillation__teacher_model"
        assert "tokenize prompts differently" in message and "vocabulary" in message
        assert "--mode off_policy" in message and "\n" not in message.strip()
        assert not {"teacher_samples", "checkpoints"} & _materialized(result)

        # Opting into text-level distillation accepts the pair (and records that they differ).
        selection = [_key("base_model"), _key("dataset"), _key("teacher_model")]
        result = _run(
            tiny_config(tiny_model_dir, teacher=str(other), mode="off_policy"),
            instance,
            asset_selection=selection,
        )
        assert result.success
        teacher = read_manifest(_key("teacher_model"))
        assert isinstance(teacher, TeacherManifest) and not teacher.same_tokenizer
        assert any("vocabulary" in d for d in teacher.tokenizer_differences)


def test_an_unresolvable_teacher_and_prompts_without_a_user_turn_fail_in_one_line(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        result = _run(tiny_config(tiny_model_dir, teacher=str(tmp_path / "no-such-teacher")), instance)
        step, message = _failure(result)
        assert step == "distillation__teacher_model" and "could not be resolved" in message
        assert "no-such-teacher" in message and "make run" not in message

        # The default teacher, in a store where nothing is registered: say what makes it.
        result = _run(tiny_config(tiny_model_dir), instance)
        step, message = _failure(result)
        assert step == "distillation__teacher_model" and DEFAULT_TEACHER in message
        assert "`make run`" in message and "kitchen run supervised" in message

        bad = tmp_path / "no-user.jsonl"
        bad.write_text(
            "".join(
                json.dumps(
                    {
                        "messages": [
                            {"role": "system", "content": f"s{i}"},
                            {"role": "assistant", "content": "a"},
                        ]
                    }
                )
                + "\n"
                for i in range(5)
            )
        )
        result = _run(tiny_config(tiny_model_dir, dataset=str(bad)), instance)
        step, message = _failure(result)
        assert step == "distillation__dataset" and "no_user_turn: 5" in message
        assert not {"teacher_samples", "checkpoints"} & _materialized(result)


def test_cli_distill_alias_refuses_at_launch_naming_the_command_that_makes_the_default_teacher(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster")}
    help_text = subprocess.run(
        [sys.executable, "-m", "kitchen.cli", "run", "distill", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert help_text.returncode == 0
    for flag in (
        "--teacher",
        "--mode",
        "--group-size",
        "--kl-coef",
        "--kl-discount",
        "--gate-min-gap-closed",
    ):
        assert flag in help_text.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "kitchen.cli", "run", "distill", "--model", str(tiny_model_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    # refused at launch (the preflight resolves every models:/ reference), before any asset runs
    line = proc.stderr.strip().splitlines()[-1]  # after MLflow's own INFO lines creating the store
    assert line.startswith(f"kitchen: --teacher {DEFAULT_TEACHER}: ")
    assert "`make run`" in line and "kitchen run supervised" in line
    assert "Traceback" not in proc.stderr + proc.stdout
