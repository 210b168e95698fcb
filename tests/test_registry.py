"""The model registry on the embedded SQLite store: lineage, idempotence, promotion, concurrency, loading."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from test_registry_support import UPSTREAM, fake_trained_model, register

from kitchen.manifests import BaseModelManifest, DatasetManifest, EvalManifest
from kitchen.registry import (
    CHALLENGER,
    CHAMPION,
    GateResult,
    InvalidModelName,
    ModelRegistry,
    RegistryError,
    decide_promotion,
    derive_model_name,
    eval_gate,
    parse_model_ref,
    sampler_path,
    validate_model_name,
)
from kitchen.registry.lineage import TrainedModel

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    """One SQLite store for the module (creating MLflow's tables costs about two seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    return ModelRegistry(f"sqlite:///{root / 'mlflow.db'}", artifact_root=(root / "artifacts").as_uri())


# -- names ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("team/sft", "cannot contain '/' or ':'"),
        ("sft:v2", "cannot contain '/' or ':'"),
        ("sft@best", "cannot contain '@'"),
        ("", "must not be empty"),
        ("..", "must not resolve to another one"),
        (" sft", "whitespace"),
        ("x" * 257, "at most 256 characters"),
    ],
)
def test_invalid_names_are_rejected_naming_the_rule(name: str, rule: str) -> None:
    with pytest.raises(InvalidModelName, match=rule.replace("(", r"\(")):
        validate_model_name(name)


def test_derived_name_names_workflow_base_and_dataset() -> None:
    base = BaseModelManifest(
        name="/home/me/models/tiny-llama",
        source="local",
        backend_model="x",
        tokenizer_path="x",
        content_hash="h",
    )
    hub_base = base.model_copy(update={"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "source": "hub"})
    data = DatasetManifest(
        name="data/chats.jsonl",
        source="jsonl",
        path="p",
        content_hash="h",
        schema_found="messages",
        train_rows=1,
        test_rows=1,
    )
    builtin = data.model_copy(update={"name": "kitchen/arithmetic", "source": "builtin"})
    assert derive_model_name("supervised", base, data) == "supervised-tiny-llama-chats"
    assert derive_model_name("supervised", hub_base, builtin) == (
        "supervised-huggingfacetb-smollm2-135m-instruct-kitchen-arithmetic"
    )


def test_model_refs_parse_alias_version_and_uri() -> None:
    assert parse_model_ref("m@champion").alias == "champion"
    assert parse_model_ref("models:/m/3").version == "3"
    assert parse_model_ref("models:/m@champion").uri == "models:/m@champion"
    assert parse_model_ref("m") == parse_model_ref("models:/m")
    with pytest.raises(ValueError, match="positive integer"):
        parse_model_ref("m/latest-ish")


# -- the rule ---------------------------------------------------------------------------------------------


def _decide(value: float, champion_value: float | None, *, passed: bool = True, lower: bool = False) -> str:
    return decide_promotion(
        version="2",
        metric="m",
        value=value,
        lower_is_better=lower,
        gate=GateResult(passed, "test"),
        champion_version="1",
        champion_value=champion_value,
    ).alias


def test_promotion_rule_both_ways() -> None:
    assert _decide(0.6, 0.5) == CHAMPION
    assert _decide(0.5, 0.5) == CHALLENGER  # a tie does not displace the champion
    assert _decide(0.4, 0.5) == CHALLENGER
    assert _decide(0.9, 0.5, passed=False) == CHALLENGER
    assert _decide(1.0, 2.0, lower=True) == CHAMPION
    assert _decide(math.nan, 0.5) == CHALLENGER
    assert _decide(0.9, None) == CHALLENGER  # a champion with no number is not displaced blindly
    first = decide_promotion(
        version="1",
        metric="m",
        value=0.1,
        lower_is_better=False,
        gate=GateResult(True, "t"),
        champion_version=None,
        champion_value=None,
    )
    assert first.promoted and "no champion yet" in first.reason


def test_eval_gate_applies_the_one_rule_to_the_saved_report(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text(
        json.dumps(
            {
                "higher_is_better": {"exact_match": True, "nll": False},
                "gate": {"settings": {"metric": "exact_match", "margin": 0.05, "max_nll_increase": 0.0}},
            }
        )
    )
    report = EvalManifest(
        report_path=str(path),
        primary_metric="exact_match",
        base={"exact_match": 0.4, "nll": 2.0},
        trained={"exact_match": 0.5, "nll": 1.9},
        num_examples=1,
        seconds=0.0,
        gate_passed=False,  # what the manifest claims does not decide: the rule on the numbers does
    )
    verdict = eval_gate(report)
    assert verdict.passed and verdict.source.startswith("quality gate: trained exact_match 0.5 vs base 0.4")
    worse_nll = report.model_copy(update={"trained": {"exact_match": 0.5, "nll": 2.1}})
    assert not eval_gate(worse_nll).passed and "NLL regressed" in eval_gate(worse_nll).source
    too_small = report.model_copy(update={"trained": {"exact_match": 0.42, "nll": 1.9}})
    assert not eval_gate(too_small).passed
    missing = report.model_copy(update={"report_path": str(tmp_path / "gone.json")})
    assert not eval_gate(missing).passed and "missing" in eval_gate(missing).source


# -- registration -----------------------------------------------------------------------------------------


def test_registration_records_lineage_run_and_champion(registry: ModelRegistry, tmp_path: Path) -> None:
    model = fake_trained_model(tmp_path, seed=1, exact_match=0.5)
    result = register(registry, model, "run-lineage-1", name="lineage")
    m = result.manifest
    assert (m.version, m.created, m.alias) == ("1", True, CHAMPION)
    assert m.model_uri == "models:/lineage/1" and m.source.endswith("/artifacts/model")

    version = registry.version("lineage", "1")
    tags = version.tags
    for asset in UPSTREAM:
        assert tags[f"kitchen.upstream.supervised/{asset}"] == "run-lineage-1"
    assert tags["kitchen.base_model.content_hash"] == "b" * 64
    assert (
        tags["kitchen.dataset"] == "kitchen/arithmetic" and tags["kitchen.dataset.content_hash"] == "d" * 64
    )
    assert tags["kitchen.datums.content_hash"] == "t" * 64
    assert model.weights.sampler_path in tags["kitchen.checkpoints"]
    assert tags["kitchen.weights.sampler_path"] == model.weights.sampler_path
    assert json.loads(tags["kitchen.config"])["max_rows"] == 48
    assert tags["kitchen.code.git_commit"]  # this checkout is a git repository
    assert tags["dagster.run_id"] == "run-lineage-1" and tags["dagster.run_url"].endswith(
        "/runs/run-lineage-1"
    )
    assert (
        float(tags["kitchen.eval.exact_match"]) == 0.5 and float(tags["kitchen.eval.base.exact_match"]) == 0.1
    )
    assert tags["kitchen.promotion.alias"] == CHAMPION

    run = registry.client.get_run(str(version.run_id))
    assert run.info.status == "FINISHED" and run.data.tags["dagster.run_id"] == "run-lineage-1"
    assert run.data.params["learning_rate"] == "0.005" and run.data.params["base_model"].startswith("Hugging")
    assert [m.step for m in registry.client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    assert run.data.metrics["eval/trained/exact_match"] == 0.5
    artifacts = {
        a.path
        for folder in ("eval", "training", "model")
        for a in registry.client.list_artifacts(run.info.run_id, folder)
    }
    assert {
        "eval/report.json",
        "eval/report.png",
        "training/metrics.jsonl",
        "model/adapter",
        "model/tokenizer",
        "model/kitchen_model.json",
    } <= artifacts
    assert not any("hf-datasets" in path for path in artifacts)  # the evaluation's caches stay out


def test_the_telemetry_sinks_run_for_the_dagster_run_is_reused(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    """One Dagster run, one MLflow run: live training metrics and the registration land together."""
    from mlflow.entities import Metric

    experiment = registry.experiment_id("kitchen-supervised")
    started = registry.client.create_run(
        experiment, run_name="supervised-live", tags={"dagster.run_id": "run-live"}
    )
    registry.client.log_batch(started.info.run_id, metrics=[Metric("train/loss", 3.0, 0, 1)])
    result = register(
        registry, fake_trained_model(tmp_path, seed=4, exact_match=0.5), "run-live", name="live"
    )
    assert result.manifest.run_id == started.info.run_id
    run = registry.client.get_run(started.info.run_id)
    assert run.info.run_name == "supervised-live" and run.data.tags["kitchen.datums.content_hash"] == "t" * 64
    assert len(registry.client.get_metric_history(run.info.run_id, "train/loss")) == 1  # not logged twice


def test_same_weights_register_once(registry: ModelRegistry, tmp_path: Path) -> None:
    model = fake_trained_model(tmp_path, seed=2, exact_match=0.5)
    first = register(registry, model, "run-idem-1", name="idem")
    again = register(registry, model, "run-idem-2", name="idem")
    assert (again.manifest.version, again.manifest.created) == (first.manifest.version, False)
    assert again.manifest.alias == CHAMPION and "already the champion" in again.decision.reason
    assert len(registry.versions("idem")) == 1


def test_champion_moves_only_to_a_better_version_that_passed_the_gate(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    name = "promo"
    assert register(
        registry, fake_trained_model(tmp_path, seed=10, exact_match=0.5), "r1", name
    ).manifest.alias == (CHAMPION)
    worse = register(registry, fake_trained_model(tmp_path, seed=11, exact_match=0.4), "r2", name)
    assert worse.manifest.alias == CHALLENGER
    assert (worse.decision.previous_champion, worse.decision.previous_champion_value) == ("1", 0.5)
    assert registry.aliases(name) == {CHAMPION: "1", CHALLENGER: "2"}

    better = register(registry, fake_trained_model(tmp_path, seed=12, exact_match=0.7), "r3", name)
    assert better.manifest.alias == CHAMPION and "beats champion v1" in better.decision.reason
    assert registry.aliases(name) == {CHAMPION: "3", CHALLENGER: "2"}

    gated = fake_trained_model(tmp_path, seed=13, exact_match=0.9, gate_passed=False)
    with pytest.raises(RegistryError, match=r"refusing to register .* failed the quality gate"):
        register(registry, gated, "r4", name)
    assert registry.aliases(name) == {CHAMPION: "3", CHALLENGER: "2"}  # nothing registered, nothing moved
    assert len(registry.versions(name)) == 3


def _preference_model(tmp_path: Path, seed: int, started_from: str | None) -> TrainedModel:
    """A DPO-like version: gated on ``reward_accuracy`` (which an SFT champion never records), base column
    0.4 and trained 0.7 on the same held-out pairs, started from ``started_from``."""
    model = fake_trained_model(tmp_path, seed=seed, exact_match=0.0)
    report = Path(model.eval_report.report_path)
    report.write_text(
        json.dumps(
            {
                "trained": {"reward_accuracy": 0.7},
                "higher_is_better": {"reward_accuracy": True},
                "gate": {
                    "settings": {
                        "metric": "reward_accuracy",
                        "margin": 0.0,
                        "max_nll_increase": None,
                        "min_gap_closed": None,
                    }
                },
            }
        )
    )
    evaluation = model.eval_report.model_copy(
        update={
            "primary_metric": "reward_accuracy",
            "base": {"reward_accuracy": 0.4},
            "trained": {"reward_accuracy": 0.7},
        }
    )
    base = model.base_model.model_copy(update={"registered_version": started_from})
    return replace(model, workflow="dpo", eval_report=evaluation, base_model=base)


def test_a_version_trained_from_the_champion_is_compared_with_it_head_to_head(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    """The champion records no value for the newcomer's metric (SFT before DPO on feedback): trained from
    the champion, the newcomer is compared with the report's base column (the champion on the same pairs);
    trained from anything else, the champion stays."""
    name = "cross"
    assert register(
        registry, fake_trained_model(tmp_path, seed=60, exact_match=0.5), "x1", name
    ).decision.promoted
    elsewhere = register(registry, _preference_model(tmp_path / "b", 61, None), "x2", name)
    assert (
        elsewhere.manifest.alias == CHALLENGER and "records no reward_accuracy" in elsewhere.decision.reason
    )
    older = register(registry, _preference_model(tmp_path / "c", 62, f"models:/{name}/2"), "x3", name)
    assert older.manifest.alias == CHALLENGER  # v2 is not the champion
    dpo = register(registry, _preference_model(tmp_path / "d", 63, f"models:/{name}/1"), "x4", name)
    assert dpo.manifest.alias == CHAMPION, dpo.decision.reason
    assert (dpo.decision.previous_champion, dpo.decision.previous_champion_value) == ("1", 0.4)
    assert "measured as this run's starting model" in dpo.decision.reason
    assert registry.aliases(name)[CHAMPION] == dpo.manifest.version == "4"


def test_a_duplicate_from_a_concurrent_machine_is_removed(
    registry: ModelRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another machine registered the same weights between our check and our create (no shared lock)."""
    model = fake_trained_model(tmp_path, seed=3, exact_match=0.5)
    register(registry, model, "run-dup-1", name="dup")
    real = ModelRegistry.versions_with_weights
    calls: list[str] = []

    def not_yet_visible(self: ModelRegistry, name: str, weights_hash: str) -> list:  # type: ignore[type-arg]
        calls.append(name)
        return [] if len(calls) == 1 else real(self, name, weights_hash)

    monkeypatch.setattr(ModelRegistry, "versions_with_weights", not_yet_visible)
    again = register(registry, model, "run-dup-2", name="dup")
    assert (again.manifest.version, again.manifest.created) == ("1", False)
    assert [v.number for v in registry.versions("dup")] == ["1"]
    assert registry.aliases("dup") == {CHAMPION: "1"}


def test_tinker_weights_point_at_the_tinker_path(registry: ModelRegistry, tmp_path: Path) -> None:
    model = fake_trained_model(tmp_path, seed=20, exact_match=0.5, tinker=True)
    result = register(registry, model, "run-tinker", name="tinker-sft")
    assert result.manifest.source == "tinker://session-20/sampler_weights/final"
    assert sampler_path(registry, "tinker-sft@champion")[0] == result.manifest.source
    files = {a.path for a in registry.client.list_artifacts(str(result.manifest.run_id), "model")}
    assert "model/kitchen_model.json" in files and "model/adapter" not in files  # the weights stay on Tinker


def test_champion_loads_back_as_the_registered_adapter(registry: ModelRegistry, tmp_path: Path) -> None:
    model = fake_trained_model(tmp_path, seed=30, exact_match=0.5)
    register(registry, model, "run-load", name="loadable")
    uri, view = sampler_path(registry, "models:/loadable@champion")
    local = Path(uri.removeprefix("file://"))
    original = Path(model.weights.sampler_path.removeprefix("file://"))
    assert local != original and view.aliases == (CHAMPION,)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (local / name).read_bytes() == (original / name).read_bytes()
    descriptor = json.loads((local.parent / "kitchen_model.json").read_text())
    assert descriptor["adapter_config"]["r"] == 4 and descriptor["tokenizer"]["files"] == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]

    (local / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(RegistryError, match="does not match the registered weights hash"):
        sampler_path(registry, "loadable/1")


def test_unknown_model_and_alias_fail_naming_what_exists(registry: ModelRegistry, tmp_path: Path) -> None:
    register(registry, fake_trained_model(tmp_path, seed=40, exact_match=0.5), "run-known", name="known")
    with pytest.raises(RegistryError, match="no registered model 'nope'"):
        registry.resolve("nope@champion")
    with pytest.raises(RegistryError, match=r"no alias 'prod' \(aliases: champion -> v1\)"):
        registry.resolve("known@prod")


def test_two_processes_registering_at_once_both_land(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"  # fresh: both race MLflow's table creation too
    (tmp_path / "fresh").mkdir()
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from test_registry_support import register_in_subprocess as r; "
                f"r({uri!r}, {str(tmp_path)!r}, {seed}, {em}, 'run-{seed}')",
            ],
            cwd=TESTS,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**__import__("os").environ, "PYTHONPATH": f"{TESTS}:{TESTS.parent}"},
        )
        for seed, em in ((50, 0.5), (51, 0.6))
    ]
    outputs = [w.communicate(timeout=120) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err[-2000:] for _, err in outputs]
    versions = sorted(json.loads(out.strip().splitlines()[-1])["version"] for out, _ in outputs)
    assert versions == ["1", "2"]
    registry = ModelRegistry(uri, artifact_root=(tmp_path / "artifacts").as_uri())
    for view in registry.versions("sft-smol"):
        assert view.tags["kitchen.weights.hash"] and view.version.run_id
        assert registry.client.get_run(view.version.run_id).info.status == "FINISHED"
    assert registry.aliases("sft-smol")[CHAMPION] in versions


# -- bad input --------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_tracking_server_fails_preflight_fast() -> None:
    registry = ModelRegistry(f"http://user:secret@127.0.0.1:{_closed_port()}", timeout_s=3)
    started = time.perf_counter()
    with pytest.raises(RegistryError, match="is unreachable") as err:
        registry.preflight()
    assert time.perf_counter() - started < 5
    assert "secret" not in str(err.value) and "***@127.0.0.1" in str(err.value)


def test_registry_writes_survive_a_concurrent_insert_of_the_same_row() -> None:
    """MLflow's SQL store can answer a tag/alias write racing another writer with a unique-constraint error
    (seen against a real server in CI); the write is idempotent, so it is retried. Other errors are not."""
    from mlflow.exceptions import MlflowException

    from kitchen.registry.register import _race_safe

    calls: list[tuple[str, ...]] = []

    def flaky(*args: str) -> None:
        calls.append(args)
        if len(calls) == 1:
            raise MlflowException(
                "BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint failed: model_version_tags"
            )

    _race_safe(flaky, "m", "1", "k", "v")
    assert calls == [("m", "1", "k", "v")] * 2

    def broken(*args: str) -> None:
        calls.append(args)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: no version 9")

    calls.clear()
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST"):
        _race_safe(broken, "m", "9", "k", "v")
    assert len(calls) == 1
