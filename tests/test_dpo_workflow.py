"""The DPO workflow on the tiny model: the engine invariants of the loss, the plan's batching, and the whole
``dpo`` group on the built-in pairs, an hh-rlhf JSONL, an UltraFeedback parquet directory and a registered
supervised champion, through the job and the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
import numpy as np
import pytest
import torch
from tinker import types

from kitchen.manifests import (
    CheckpointsManifest,
    EvalManifest,
    Manifest,
    RegisteredModelManifest,
    WeightsManifest,
)
from kitchen.registry import ModelRegistry, default_tracking_uri
from kitchen.workflows import get_workflow
from kitchen.workflows.dpo import load_preference_dataset
from kitchen.workflows.dpo.comparisons import Pairs, render_pairs
from kitchen.workflows.dpo.config import PreferenceDatasetSection
from kitchen.workflows.dpo.manifests import ReferenceLogprobsManifest
from kitchen.workflows.dpo.plan import DPOPlan, dpo_loss_fn
from kitchen.workflows.dpo.reference import target_logprobs
from kitchen_assets.definitions import build_definitions
from kitchen_assets.io import read_manifest
from resources.local_engine import LocalServiceClient, LocalTrainingClient
from tests.test_dpo_data import ultrafeedback_directory

REPO = Path(__file__).resolve().parents[1]
BETA = 0.1


# -- the loss on the engine ------------------------------------------------------------------------------


def hh_rows(n: int) -> list[dict[str, str]]:
    """hh-rlhf-style transcripts with a preference a tiny model learns in a few steps (a helpful reply
    against a curt one), with prompts of varied length so batches are padded."""
    topics = ["cats", "rivers", "the moon", "bread", "old maps and their makers", "music", "tea", "rain"]
    rows = []
    for i in range(n):
        topic = topics[i % len(topics)]
        prompt = f"\n\nHuman: Tell me about {topic}, please ({i})." + " Thanks!" * (i % 3)
        rows.append(
            {
                "chosen": f"{prompt}\n\nAssistant: Happy to help: {topic} are a lovely subject to learn.",
                "rejected": f"{prompt}\n\nAssistant: No.",
            }
        )
    return rows


def _pairs(tiny_model_dir: Path, rows: list[dict[str, Any]], tmp_path: Path) -> Pairs:
    from transformers import AutoTokenizer

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_preference_dataset(PreferenceDatasetSection(dataset=str(path), test_size=0.1))
    return render_pairs(loaded.dataset["train"], AutoTokenizer.from_pretrained(tiny_model_dir), 96)


def _plan(pairs: Pairs, reference: list[np.ndarray], batch_size: int, loss_type: str = "sigmoid") -> DPOPlan:
    return DPOPlan.build(
        pairs.datums,
        reference,
        beta=BETA,
        loss_type=loss_type,
        batch_size=batch_size,
        epochs=2,
        seed=3,
        max_steps=None,
        identity={},
    )


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_at_step_zero_the_policy_is_the_reference(
    tiny_model_dir: Path, tmp_path: Path, loss_type: str
) -> None:
    """A new adapter leaves the model unchanged, so every log-ratio is 0: loss ln 2 (sigmoid), (1/(2β))²
    (ipo) or 1 (hinge); accuracy 0; margin and rewards 0, though the reference comes from the sampler's
    compute_logprobs (other batching, other padding) and the policy from the training forward."""
    pairs = _pairs(tiny_model_dir, hh_rows(24), tmp_path)
    service = LocalServiceClient()
    reference = target_logprobs(
        service.create_sampling_client(base_model=str(tiny_model_dir)).result(), pairs.datums
    )
    plan = _plan(pairs, reference, batch_size=8, loss_type=loss_type)
    client = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=0).result()
    expected = {"sigmoid": math.log(2), "ipo": (1 / (2 * BETA)) ** 2, "hinge": 1.0}[loss_type]
    for step in range(2):  # forward_backward_custom without optim_step: the weights stay the initial ones
        batch = plan.prepare(step, None)
        metrics = plan.metrics(batch, plan.submit(client, batch).result())
        assert metrics["loss"] == metrics["dpo_loss"] == pytest.approx(expected, abs=1e-4)
        assert metrics["accuracy"] == 0.0
        for name in ("margin", "chosen_reward", "rejected_reward"):
            assert abs(metrics[name]) < 1e-6
        assert metrics["num_pairs"] == 8 and metrics["num_tokens"] == batch.tokens


def _grads(client: LocalTrainingClient) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in client._params if p.grad is not None}


def test_the_gradient_through_forward_backward_custom_is_direct_autograds(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    pairs = _pairs(tiny_model_dir, hh_rows(12), tmp_path)
    service = LocalServiceClient()
    reference = target_logprobs(
        service.create_sampling_client(base_model=str(tiny_model_dir)).result(), pairs.datums
    )
    plan = _plan(pairs, reference, batch_size=4)
    engine, direct = (
        service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=7).result() for _ in range(2)
    )
    warmup = plan.prepare(0, None)
    for client in (engine, direct):  # one identical step, so the LoRA B matrices are not zero
        plan.submit(client, warmup).result()
        client.optim_step(types.AdamParams(learning_rate=5e-2)).result()
        client._model.zero_grad(set_to_none=True)

    batch = plan.prepare(1, None)
    output = plan.submit(engine, batch).result()

    model = direct._model
    sequence = []
    for datum in batch.datums:
        logits = model(input_ids=torch.tensor([datum.model_input.to_ints()])).logits[0].float()
        targets = datum.loss_fn_inputs["target_tokens"].to_torch().long()
        token_lp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
        sequence.append((datum.loss_fn_inputs["weights"].to_torch() * token_lp).sum())
    ref = [
        float(np.dot(d.loss_fn_inputs["weights"].to_numpy(), reference[pairs.datums.index(d)]))
        for d in batch.datums
    ]
    d = [(sequence[i] - ref[i]) - (sequence[i + 1] - ref[i + 1]) for i in range(0, len(sequence), 2)]
    loss = torch.stack([-torch.nn.functional.logsigmoid(BETA * x) for x in d]).mean()
    loss.backward()
    assert output.metrics["dpo_loss"] == pytest.approx(loss.item(), rel=1e-5)
    want, have = _grads(direct), _grads(engine)
    assert want.keys() == have.keys() and want
    for name in want:
        torch.testing.assert_close(have[name], want[name], atol=1e-6, rtol=1e-4)


def test_pairs_are_never_split_across_steps(tiny_model_dir: Path, tmp_path: Path) -> None:
    pairs = _pairs(tiny_model_dir, hh_rows(30), tmp_path)
    reference = [np.zeros(d.model_input.length, dtype=np.float32) for d in pairs.datums]
    plan = _plan(pairs, reference, batch_size=4)
    partner = {id(d): pairs.datums[i ^ 1] for i, d in enumerate(pairs.datums)}
    chosen = {id(d) for d in pairs.datums[0::2]}
    per_epoch = len(pairs) // 4
    assert plan.total_steps == 2 * per_epoch
    seen: list[int] = []
    for step in range(plan.total_steps):
        batch = plan.prepare(step, None)
        assert len(batch.datums) == 8
        for first, second in zip(batch.datums[0::2], batch.datums[1::2], strict=True):
            assert id(first) in chosen and partner[id(first)] is second
        seen += [id(d) for d in batch.datums[0::2]]
        if step == per_epoch - 1:
            assert len(set(seen)) == len(seen) == 4 * per_epoch  # each pair at most once an epoch
    assert plan.prepare(0, None).datums != plan.prepare(per_epoch, None).datums  # reshuffled


def test_the_custom_loss_sees_the_reference_of_its_own_pairs(tiny_model_dir: Path, tmp_path: Path) -> None:
    pairs = _pairs(tiny_model_dir, hh_rows(8), tmp_path)
    reference = [
        np.full(d.model_input.length, -float(i), dtype=np.float32) for i, d in enumerate(pairs.datums)
    ]
    plan = _plan(pairs, reference, batch_size=2)
    batch = plan.prepare(0, None)
    logprobs = [torch.zeros(d.model_input.length, requires_grad=True) for d in batch.datums]
    _, metrics = dpo_loss_fn(batch.extra, beta=BETA, loss_type="sigmoid")(batch.datums, logprobs)
    index = [pairs.datums.index(d) for d in batch.datums]
    reply = [float(d.loss_fn_inputs["weights"].to_numpy().sum()) for d in batch.datums]
    # policy 0 everywhere, so each log-ratio is minus the reference: i * (reply tokens)
    rewards = [BETA * index[k] * reply[k] for k in range(4)]
    assert metrics["chosen_reward"] == pytest.approx((rewards[0] + rewards[2]) / 2, rel=1e-5)
    assert metrics["rejected_reward"] == pytest.approx((rewards[1] + rewards[3]) / 2, rel=1e-5)


# -- the asset group -------------------------------------------------------------------------------------


def _run(config: dict[str, Any]) -> dg.ExecuteInProcessResult:
    job = build_definitions("local").resolve_job_def("dpo_job")
    with dg.DagsterInstance.ephemeral() as instance:
        return job.execute_in_process(run_config=config, instance=instance, raise_on_error=False)


def _config(tiny_model_dir: Path, **overrides: Any) -> dict[str, Any]:
    smoke = get_workflow("dpo").smoke_config
    assert smoke is not None
    return {**smoke(str(tiny_model_dir)), **overrides}


M = TypeVar("M", bound=Manifest)


def _manifest(kind: str, cls: type[M], workflow: str = "dpo") -> M:
    manifest = read_manifest(dg.AssetKey([workflow, kind]))
    assert isinstance(manifest, cls)
    return manifest


def _materialised(result: dg.ExecuteInProcessResult) -> set[str]:
    return {
        e.asset_key.path[-1] for e in result.get_asset_materialization_events() if e.asset_key is not None
    }


def _metadata(result: dg.ExecuteInProcessResult, kind: str) -> dict[str, Any]:
    return next(
        dict(e.materialization.metadata)
        for e in result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey(["dpo", kind])
    )


def _failure(result: dg.ExecuteInProcessResult) -> str:
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert failure.step_failure_data is not None
    return str(failure.step_failure_data.error)


ALL_ASSETS = {
    "base_model",
    "dataset",
    "comparisons",
    "reference_logprobs",
    "checkpoints",
    "trained_weights",
    "eval_report",
    "registered_model",
}


def test_the_smoke_config_trains_evaluates_gates_and_registers(tiny_model_dir: Path) -> None:
    result = _run(_config(tiny_model_dir))
    assert result.success, _failure(result)
    assert _materialised(result) == ALL_ASSETS
    (gate,) = result.get_asset_check_evaluations()
    assert gate.passed

    checkpoints = _manifest("checkpoints", CheckpointsManifest)
    steps = [json.loads(line) for line in Path(checkpoints.metrics_path).read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    names = {
        "loss",
        "dpo_loss",
        "accuracy",
        "margin",
        "chosen_reward",
        "rejected_reward",
        "num_pairs",
        "num_tokens",
    }
    assert names <= steps[0]["metrics"].keys()
    assert steps[0]["metrics"]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert steps[0]["metrics"]["accuracy"] == 0.0 and steps[0]["metrics"]["num_pairs"] == 4

    report = _manifest("eval_report", EvalManifest)
    assert report.base["preference_accuracy"] == 0.5 and report.base["margin"] == 0.0
    for metrics in (report.base, report.trained):
        assert {
            "preference_accuracy",
            "margin",
            "chosen_logratio",
            "rejected_logratio",
            "nll",
            "exact_match",
        } <= metrics.keys()
    assert report.trained["preference_accuracy"] >= 0.6  # the style is learnt
    saved = json.loads(Path(report.report_path).read_text())
    assert saved["generation_task"] == "kitchen_arithmetic" and saved["dpo_beta"] == 0.1

    # Lineage: the reference model and beta are on the registered version.
    registered = _manifest("registered_model", RegisteredModelManifest)
    tags = ModelRegistry(default_tracking_uri()).version(registered.name, registered.version).tags
    hyper = json.loads(tags["kitchen.hyperparameters"])
    assert (
        hyper["dpo_beta"] == 0.1
        and hyper["dpo_loss"] == "sigmoid"
        and hyper["reference_model"] == str(tiny_model_dir)
    )
    reference = _manifest("reference_logprobs", ReferenceLogprobsManifest)
    assert tags["kitchen.reference_logprobs.content_hash"] == reference.content_hash
    assert "kitchen.comparisons.content_hash" in tags and "kitchen.comparisons.tokenizer_hash" in tags


def test_hh_rlhf_jsonl_and_a_rerun_with_another_beta_reuses_the_reference(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "hh.jsonl"
    bad = [
        {"chosen": hh_rows(1)[0]["chosen"]},  # no rejected
        {"chosen": hh_rows(1)[0]["chosen"], "rejected": hh_rows(1)[0]["chosen"]},  # identical
        {"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hello"},  # no assistant turn
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in [*hh_rows(40), *bad]))
    config = _config(
        tiny_model_dir,
        dataset=str(path),
        max_rows=None,
        test_size=0.25,
        max_length=96,
        max_steps=6,
        batch_size=4,
        learning_rate=2e-2,
        eval_examples=10,
    )
    first = _run(config)
    assert first.success, _failure(first)
    assert _materialised(first) == ALL_ASSETS
    dataset = _metadata(first, "dataset")
    assert dataset["skipped_rows"].value == {"identical_pair": 1, "missing_field": 1, "no_assistant_turn": 1}
    report = _manifest("eval_report", EvalManifest)
    assert report.primary_metric == "preference_accuracy"
    assert report.trained["preference_accuracy"] >= 0.9 and report.trained["margin"] > 0
    assert "exact_match" not in report.trained  # no checkable answers
    assert _metadata(first, "reference_logprobs")["reused"].value is False
    reference = _manifest("reference_logprobs", ReferenceLogprobsManifest)

    second = _run({**config, "dpo_beta": 0.5})
    assert second.success, _failure(second)
    assert _metadata(second, "reference_logprobs")["reused"].value is True
    assert _manifest("reference_logprobs", ReferenceLogprobsManifest) == reference
    weights = _manifest("trained_weights", WeightsManifest)
    assert weights.hyperparameters["dpo_beta"] == 0.5


def test_an_ultrafeedback_parquet_directory(tiny_model_dir: Path, tmp_path: Path) -> None:
    root = ultrafeedback_directory(tmp_path / "uf", n_train=24, n_test=8)
    result = _run(
        _config(
            tiny_model_dir,
            dataset=str(root),
            max_rows=None,
            max_steps=6,
            learning_rate=2e-2,
            eval_examples=8,
        )
    )
    assert result.success, _failure(result)
    assert _materialised(result) == ALL_ASSETS
    assert _metadata(result, "dataset")["test_split"].value == "source"
    assert _metadata(result, "comparisons")["test_pairs"].value == 8


def test_dpo_starts_from_a_registered_supervised_champion(tiny_model_dir: Path) -> None:
    from kitchen.workflows.supervised import smoke_run_config

    job = build_definitions("local").resolve_job_def("supervised_job")
    with dg.DagsterInstance.ephemeral() as instance:
        sft = job.execute_in_process(run_config=smoke_run_config(str(tiny_model_dir)), instance=instance)
    champion = _manifest("registered_model", RegisteredModelManifest, "supervised")
    ref = f"models:/{champion.name}@champion"
    assert sft.success

    result = _run(_config(tiny_model_dir, model=ref))
    assert result.success, _failure(result)
    reference = _manifest("reference_logprobs", ReferenceLogprobsManifest)
    assert reference.reference_model == f"models:/{champion.name}/{champion.version}"
    assert reference.reference_sampler_path  # the champion's adapter
    checkpoints = _manifest("checkpoints", CheckpointsManifest)
    first = json.loads(Path(checkpoints.metrics_path).read_text().splitlines()[0])
    # Training starts from the champion's adapter, which is also the reference: step 0 is ln 2 again.
    assert first["metrics"]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)
    registered = _manifest("registered_model", RegisteredModelManifest)
    tags = ModelRegistry(default_tracking_uri()).version(registered.name, registered.version).tags
    assert tags["kitchen.base_model.registered_version"] == reference.reference_model
    assert json.loads(tags["kitchen.hyperparameters"])["reference_model"] == reference.reference_model


def test_bad_input_fails_in_one_line_before_training(tiny_model_dir: Path, tmp_path: Path) -> None:
    identical = tmp_path / "identical.jsonl"
    identical.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"}) + "\n")
    result = _run(_config(tiny_model_dir, dataset=str(identical), max_rows=None))
    assert not result.success
    assert "all 1 skipped (identical_pair: 1)" in _failure(result)
    assert "checkpoints" not in _materialised(result)

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello"}) + "\n")
    result = _run(_config(tiny_model_dir, dataset=str(chat), max_rows=None))
    assert "No recognised row schema in columns ['chosen', 'prompt']" in _failure(result)

    job = build_definitions("local").resolve_job_def("dpo_job")
    with (
        dg.DagsterInstance.ephemeral() as instance,
        pytest.raises(dg.DagsterConfigMappingFunctionError) as raised,
    ):
        job.execute_in_process(run_config=_config(tiny_model_dir, dpo_beta=0.0), instance=instance)
    assert "dpo_beta\n  Input should be greater than 0" in str(raised.value.__cause__)


def test_cli_refuses_beta_zero_and_runs_dpo(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster")}
    cli = [sys.executable, "-m", "kitchen.cli", "run", "dpo"]
    refused = subprocess.run(
        [*cli, "--dpo-beta", "0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2
    assert "--dpo-beta: Input should be greater than 0" in refused.stderr
    assert not (tmp_path / "dagster").exists()

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in _config(tiny_model_dir, max_steps=2).items()]
    proc = subprocess.run([*cli, *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    for text in (
        "✓ dpo/comparisons",
        "✓ dpo/reference_logprobs",
        "preference_accuracy",
        "quality gate: passed",
    ):
        assert text in proc.stdout
    assert proc.stderr.strip() == ""
