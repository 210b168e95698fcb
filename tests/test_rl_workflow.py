"""The RL workflow on the tiny model: the plan on the local engine, resume after a kill, the whole asset
group, and the command line (good runs and bad input)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import pytest

from kitchen.data import save_dataset
from kitchen.manifests import DatasetManifest, EvalManifest, RegisteredModelManifest, RolloutsManifest
from kitchen.models.base import resolve_base_model
from kitchen.training.loop import TrainingResult, TrainingSpec, read_metrics, run_training
from kitchen.workflows import PlanContext, get_workflow
from kitchen.workflows.rl import build_plan, load_problems
from kitchen.workflows.rl.config import RLDatasetSection, RLTrainSection
from kitchen_assets.definitions import build_definitions
from kitchen_assets.io import read_manifest
from resources.local_engine import LocalServiceClient

REPO = Path(__file__).resolve().parents[1]
COOKBOOK_KEYS = (
    "env/all/reward/total",
    "env/all/correct",
    "env/all/format",
    "env/all/ac_tokens_per_turn",
    "env/all/by_group/frac_mixed",
    "env/all/by_group/frac_all_good",
    "env/all/by_group/frac_all_bad",
    "optim/kl_sample_train_v1",
    "optim/kl_sample_train_v2",
    "optim/entropy",
)


def _dataset(**settings: Any) -> DatasetManifest:
    section = RLDatasetSection(**{"max_rows": 48, **settings})
    loaded = load_problems(section)
    return loaded.manifest(save_dataset(loaded))


def _train(tiny_model_dir: Path, root: Path, *, steps: int = 3, **settings: Any) -> TrainingResult:
    dataset = _dataset(**{k: settings.pop(k) for k in ("reward",) if k in settings})
    config = RLTrainSection(
        **{"group_size": 4, "groups_per_batch": 3, "max_tokens": 4, "max_steps": steps, **settings}
    )
    service = LocalServiceClient(root=root / "engine")
    base = resolve_base_model(str(tiny_model_dir))
    plan = build_plan(
        PlanContext(config=config, base_model=base, inputs={"dataset": dataset}, service=service, log=print)
    )
    spec = TrainingSpec(
        base_model=base.backend_model,
        lora_rank=4,
        learning_rate=2e-2,
        lr_schedule="constant",
        warmup_steps=0,
        save_every=0,
        seed=0,
    )
    return run_training(service, spec, plan, root / "run", key="k")


def _rollouts(run_dir: Path) -> list[dict[str, Any]]:
    return [
        row
        for path in sorted((run_dir / "rollouts").glob("step-*.parquet"))
        for row in pq.read_table(path).to_pylist()
    ]


def test_an_on_policy_step_trains_on_the_policys_own_logprobs(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = _train(tiny_model_dir, tmp_path, steps=3)
    assert [m.step for m in result.metrics] == [1, 2, 3]
    for m in result.metrics:
        assert set(COOKBOOK_KEYS) <= m.metrics.keys()
        # The sampler's logprobs are the trainer's: sample/train KL is ~0 at every on-policy step.
        assert abs(m.metrics["optim/kl_sample_train_v1"]) < 1e-5
        assert m.metrics["optim/kl_sample_train_v2"] < 1e-9
        assert m.policy_version == m.step - 1 and m.metrics["sampling_client/step_mean"] == m.step - 1

    rows = _rollouts(tmp_path / "run")
    assert len(rows) == 3 * 3 * 4
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["step"], row["group"]), []).append(row)
        assert row["staleness"] == 0 and row["policy_version"] == row["step"] - 1
        assert len(row["tokens"]) == len(row["logprobs"]) > 0 and row["trained"]
        fmt = float(row["stop_reason"] == "stop")
        assert row["format"] == fmt
        assert row["reward"] == pytest.approx(row["correct"] + 0.1 * (fmt - 1), abs=1e-6)
        assert row["question"].startswith("What is ") and int(row["answer"]) >= 0
    for group in groups.values():
        mean = sum(r["reward"] for r in group) / len(group)
        assert [r["advantage"] for r in group] == pytest.approx([r["reward"] - mean for r in group], abs=1e-6)
    step1 = [r for r in rows if r["step"] == 1]
    reward = sum(r["reward"] for r in step1) / len(step1)
    assert result.metrics[0].metrics["env/all/reward/total"] == pytest.approx(reward, abs=1e-6)
    tokens = sum(len(r["tokens"]) for r in step1) / len(step1)
    assert result.metrics[0].metrics["env/all/ac_tokens_per_turn"] == pytest.approx(tokens)


def test_off_policy_rollouts_record_their_staleness(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = _train(tiny_model_dir, tmp_path, steps=4, max_steps_off_policy=1)
    staleness = {(r["step"], r["staleness"], r["policy_version"]) for r in _rollouts(tmp_path / "run")}
    # The loop refreshes the policy once it is more than one step old: weights of steps 0, 0, 2, 2.
    assert staleness == {(1, 0, 0), (2, 1, 0), (3, 0, 2), (4, 1, 2)}
    assert [m.policy_version for m in result.metrics] == [0, 0, 2, 2]


@pytest.mark.parametrize("loss", ["ppo", "cispo"])
def test_clipped_losses_take_their_thresholds(tiny_model_dir: Path, tmp_path: Path, loss: str) -> None:
    result = _train(
        tiny_model_dir, tmp_path, steps=1, loss=loss, clip_low_threshold=0.5, clip_high_threshold=1.5
    )
    assert abs(result.metrics[0].metrics["optim/kl_sample_train_v1"]) < 1e-5


KILL_SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_rl_workflow import _train_for_kill
_train_for_kill(Path({model!r}), Path({root!r}), pause_after={pause})
"""


def _train_for_kill(model: Path, root: Path, pause_after: int | None) -> None:
    """Runs in a child process: 6 RL steps, checkpoint every 2; with ``pause_after`` it announces that
    step and then waits to be killed (the parent sends SIGKILL)."""
    from kitchen.training.loop import BaseObserver

    class Pause(BaseObserver):
        def on_step(self, metrics: Any, total_steps: int) -> None:
            if pause_after is not None and metrics.step == pause_after:
                (root / "paused").write_text(str(metrics.step))
                time.sleep(600)

    os.environ["KITCHEN_HOME"] = str(root / "home")
    dataset = _dataset()
    config = RLTrainSection(group_size=4, groups_per_batch=3, max_tokens=4, max_steps=6)
    service = LocalServiceClient(root=root / "engine")
    base = resolve_base_model(str(model))
    plan = build_plan(
        PlanContext(config=config, base_model=base, inputs={"dataset": dataset}, service=service, log=print)
    )
    spec = TrainingSpec(
        base_model=base.backend_model,
        lora_rank=4,
        learning_rate=2e-2,
        lr_schedule="constant",
        warmup_steps=0,
        save_every=2,
        seed=0,
    )
    result = run_training(service, spec, plan, root / "run", key="k", observer=Pause())
    (root / "done").write_text(result.sampler_path)


def _child(model: Path, root: Path, pause: int | None) -> subprocess.Popen[str]:
    script = KILL_SCRIPT.format(tests=str(REPO / "tests"), model=str(model), root=str(root), pause=pause)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, text=True)


def test_a_killed_run_resumes_to_the_same_weights_and_rollouts(tiny_model_dir: Path, tmp_path: Path) -> None:
    """SIGKILL after step 3 (checkpoint at 2): the rerun resumes at step 2, redoes 3..6 and ends with the
    weights, metrics and rollouts of an uninterrupted run."""
    from safetensors.torch import load_file

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _child(tiny_model_dir, straight, None).wait(timeout=600) == 0

    child = _child(tiny_model_dir, killed, 3)
    deadline = time.time() + 600
    while not (killed / "paused").exists():
        assert child.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.5)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    ledger = json.loads((killed / "run" / "ledger.json").read_text())
    assert [c["step"] for c in ledger["checkpoints"]] == [2] and not ledger["complete"]
    assert len(list((killed / "run" / "rollouts").glob("*.parquet"))) == 3

    assert _child(tiny_model_dir, killed, None).wait(timeout=600) == 0

    def weights(root: Path) -> dict[str, Any]:
        uri = (root / "done").read_text()
        return load_file(str(Path(uri.removeprefix("file://")) / "adapter_model.safetensors"))

    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    metrics_a, metrics_b = (
        read_metrics(straight / "run" / "metrics.jsonl"),
        read_metrics(killed / "run" / "metrics.jsonl"),
    )
    assert [m.step for m in metrics_b] == [1, 2, 3, 4, 5, 6]
    assert [m.metrics["env/all/reward/total"] for m in metrics_a] == [
        m.metrics["env/all/reward/total"] for m in metrics_b
    ]
    drop = ("logprobs",)  # float32 logprobs may differ in the last bit; tokens and rewards may not
    rows_a = [{k: v for k, v in r.items() if k not in drop} for r in _rollouts(straight / "run")]
    rows_b = [{k: v for k, v in r.items() if k not in drop} for r in _rollouts(killed / "run")]
    assert rows_a == rows_b


# -- the asset group and the command line ----------------------------------------------------------


def _run_job(run_config: dict[str, Any]) -> dg.ExecuteInProcessResult:
    job = build_definitions("local").resolve_job_def("rl_job")
    with dg.DagsterInstance.ephemeral() as instance:
        return job.execute_in_process(run_config=run_config, instance=instance, raise_on_error=False)


def test_rl_job_materialises_every_asset_and_registers(tiny_model_dir: Path) -> None:
    rl = get_workflow("rl")
    assert rl.smoke_config is not None
    result = _run_job(rl.smoke_config(str(tiny_model_dir)))
    assert result.success
    materialised = {
        tuple(e.asset_key.path) for e in result.get_asset_materialization_events() if e.asset_key is not None
    }
    kinds = ("base_model", "dataset", "checkpoints", "trained_weights", "rollouts", "eval_report")
    assert materialised == {("rl", k) for k in (*kinds, "registered_model")}

    rollouts = read_manifest(dg.AssetKey(["rl", "rollouts"]))
    assert isinstance(rollouts, RolloutsManifest)
    config = rl.smoke_config(str(tiny_model_dir))
    assert rollouts.steps == config["max_steps"]
    assert rollouts.rows == config["max_steps"] * config["groups_per_batch"] * config["group_size"]
    assert {"prompt_tokens", "tokens", "logprobs", "reward", "advantage", "staleness"} <= set(
        rollouts.columns
    )
    meta = next(
        e.materialization.metadata
        for e in result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey(["rl", "rollouts"])
    )
    table = next(v.value for k, v in meta.items() if k.startswith("last_step_rollouts"))
    assert "| group | question | answer | completion | reward | advantage | stop |" in table

    report = read_manifest(dg.AssetKey(["rl", "eval_report"]))
    assert isinstance(report, EvalManifest) and report.gate_passed
    assert set(report.base) == {"accuracy", "format", "reward", "completion_tokens"}
    assert report.trained["accuracy"] > report.base["accuracy"]
    saved = json.loads(Path(report.report_path).read_text())
    assert saved["gate"]["settings"]["max_nll_increase"] is None and saved["reward"] == config["reward"]
    (gate,) = result.get_asset_check_evaluations()
    assert gate.passed

    registered = read_manifest(dg.AssetKey(["rl", "registered_model"]))
    assert isinstance(registered, RegisteredModelManifest) and registered.primary_metric == "accuracy"
    lineage = next(
        e.materialization.metadata["lineage"].value
        for e in result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey(["rl", "registered_model"])
    )
    hyper = json.loads(lineage["kitchen.hyperparameters"])  # the reward function and environment
    assert hyper["reward"] == config["reward"] and hyper["environment"] == "kitchen/addition"
    assert hyper["loss_fn"] == "importance_sampling" and hyper["group_size"] == config["group_size"]
    assert lineage["kitchen.rollouts.content_hash"] == rollouts.content_hash


def _cli(args: list[str], tmp_path: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster")}
    return subprocess.run(
        [sys.executable, "-m", "kitchen.cli", "run", "rl", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_rejects_bad_settings_before_any_work(tmp_path: Path) -> None:
    proc = _cli(["--group-size", "1", "--advantage-norm", "group"], tmp_path)
    assert (
        proc.returncode == 2 and "--group-size" in proc.stderr and "use --group-size 2 or more" in proc.stderr
    )
    proc = _cli(["--reward", "no_such_module:check"], tmp_path)
    assert proc.returncode == 2 and "cannot import module 'no_such_module'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "dagster").exists()


def test_cli_names_the_problem_with_a_dataset_without_answers(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "no_answers.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "response": "r"}) + "\n" for i in range(8)))
    proc = _cli(["--model", str(tiny_model_dir), "--dataset", str(data)], tmp_path)
    assert proc.returncode == 1
    assert "No recognised row schema in columns ['question', 'response']" in proc.stderr
    assert "question/answer (question, answer)" in proc.stderr
    assert "Traceback" not in proc.stderr


def _gsm8k_dir(root: Path) -> Path:
    """A GSM8K-format Parquet directory (``question``, ``answer`` ending ``#### N``), one split a file,
    with one row whose final answer math-verify cannot parse."""
    import pyarrow as pa

    def rows(n: int, offset: int) -> list[dict[str, str]]:
        return [
            {
                "question": f"Tom has {10 + i + offset} apples and eats all but one. How many are left?",
                "answer": f"He eats {9 + i + offset}, so 1 apple is left.\n#### 1",
            }
            for i in range(n)
        ]

    root.mkdir(parents=True)
    bad = [{"question": "What is the answer?", "answer": "Nobody knows.\n#### ???"}]
    pq.write_table(pa.Table.from_pylist(rows(24, 0) + bad), root / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows(8, 100)), root / "test-00000-of-00001.parquet")
    return root


def test_cli_runs_rl_on_gsm8k_parquet_with_math_verify(
    tiny_model_dir: Path, tmp_path: Path, kitchen_home: Path
) -> None:
    """Trains, evaluates and gates. A random tiny model answers nothing right before or after, so the
    accuracy gate refuses it and nothing is registered, as it should (the smoke job shows a passing gate
    and registration)."""
    data = _gsm8k_dir(tmp_path / "gsm8k")
    args = ["--model", str(tiny_model_dir), "--dataset", str(data), "--reward", "math_verify"]
    args += ["--group-size", "4", "--groups-per-batch", "4", "--max-steps", "2", "--max-tokens", "6"]
    args += ["--lora-rank", "4", "--eval-examples", "4", "--eval-max-tokens", "6"]
    proc = _cli(args, tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "✓ rl/checkpoints" in proc.stdout and "2/2" in proc.stdout  # the training step, rollouts too
    rollouts = json.loads((kitchen_home / "manifests" / "rl" / "rollouts.json").read_text())["data"]
    assert rollouts["steps"] == 2 and rollouts["rows"] == 2 * 4 * 4
    assert "held-out evaluation (n=4" in proc.stdout and "accuracy" in proc.stdout
    assert "quality gate: FAILED - trained accuracy 0 vs base 0" in proc.stdout
    assert "quality_gate" in proc.stderr and "Traceback" not in proc.stderr
    dataset = json.loads((kitchen_home / "manifests" / "rl" / "dataset.json").read_text())["data"]
    assert dataset["schema_found"] == "question/answer" and dataset["skipped_rows"] == {
        "answer_unparseable": 1
    }
    assert dataset["train_rows"] == 24 and dataset["test_rows"] == 8
    assert not (kitchen_home / "manifests" / "rl" / "registered_model.json").exists()
