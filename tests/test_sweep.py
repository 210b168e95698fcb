"""``kitchen sweep``: one partition per configuration over training, evaluation and registration, the shared
assets made once, a report that ranks the configurations, and only the best promoted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dagster as dg
import pytest
from cli_runs import cli_flags
from mlflow import MlflowClient

from kitchen.cli import main
from kitchen.registry.store import default_tracking_uri
from kitchen.workflows import get_workflow
from kitchen.workflows.sweep import (
    CONFIGURATIONS_TAG,
    SweepError,
    config_from_key,
    expand,
    partition_key,
    shared_differences,
)


def test_a_key_names_its_configuration_and_reads_back() -> None:
    workflow = get_workflow("supervised")
    config = workflow.config(learning_rate=3e-4, max_steps=20, lr_schedule="cosine", eval_tasks=[])
    key = partition_key(workflow, config)
    assert key == "learning_rate=0.0003,lr_schedule=cosine,max_steps=20"
    shared = workflow.config(dataset="data/a.jsonl", learning_rate=1e-3, gate_max_nll_increase=None)
    assert (
        partition_key(workflow, shared)
        == "learning_rate=0.001,gate_max_nll_increase=none,dataset=data/a.jsonl"
    )
    assert config_from_key(workflow, partition_key(workflow, shared)) == shared
    assert config_from_key(workflow, key) == config
    assert partition_key(workflow, workflow.config()) == "defaults"
    with pytest.raises(SweepError, match="not <setting>=<value>"):
        config_from_key(workflow, "learning_rate=0.0003,warp_speed=9")
    with pytest.raises(SweepError, match="not a configuration's own key"):
        config_from_key(workflow, "max_steps=20,learning_rate=0.0003")  # not in the key's order


def test_every_combination_once_and_shared_settings_compared() -> None:
    workflow = get_workflow("supervised")
    configs = expand(
        workflow, {"max_steps": "20"}, {"learning_rate": ["1e-4", "1e-3"], "lora_rank": ["8", "32"]}
    )
    assert [(c.learning_rate, c.lora_rank, c.max_steps) for c in configs] == [
        (1e-4, 8, 20),
        (1e-4, 32, 20),
        (1e-3, 8, 20),
        (1e-3, 32, 20),
    ]
    with pytest.raises(SweepError, match="same configuration"):
        expand(workflow, {}, {"learning_rate": ["1e-3", "0.001"]})
    made = {kind: {} for kind in ("base_model", "dataset", "datums")}
    assert shared_differences(workflow, configs[0], made) == []
    assert shared_differences(workflow, workflow.config(max_rows=5), made) == [
        "supervised/dataset was made with max_rows=None, this configuration needs 5"
    ]
    assert shared_differences(workflow, configs[0], {**made, "datums": None}) == [
        "supervised/datums has not been materialised"
    ]


def test_every_bad_value_is_named_before_any_work(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["sweep", "supervised", "--learning-rate", "3e-4,abc", "--lora-rank", "0,8", "--epochs", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--learning-rate: Input should be a valid number" in err and "(got 'abc')" in err
    assert "--lora-rank: Input should be greater than or equal to 1 (got '0')" in err
    assert "--epochs: Input should be greater than or equal to 1" in err
    assert main(["sweep", "supervised", "--learning-rate", "1e-3,0.001"]) == 2
    assert "are the same configuration (learning_rate=0.001)" in capsys.readouterr().err


def _champion_tags(tracking_uri: str) -> list[tuple[str, str]]:
    client = MlflowClient(tracking_uri)
    found = []
    for model in client.search_registered_models():
        for version in client.search_model_versions(f"name='{model.name}'"):
            if version.tags.get("kitchen.promotion.alias") == "champion":
                found.append((model.name, str(version.version)))
    return found


def test_a_two_by_two_sweep_ranks_four_partitions_and_promotes_one(
    tiny_model_dir: Path,
    kitchen_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(kitchen_home / "dagster"))  # restored after the test
    monkeypatch.setenv("COLUMNS", "400")  # the table's cells unfolded
    workflow = get_workflow("supervised")
    smoke = workflow.smoke_config
    assert smoke is not None
    fixed = {**smoke(str(tiny_model_dir)), "max_steps": 2, "eval_examples": 3}
    del fixed["learning_rate"], fixed["lora_rank"]
    argv = ["sweep", "supervised", *cli_flags(fixed), "--learning-rate", "5e-3,2e-2", "--lora-rank", "2,4"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out

    expected = {
        partition_key(workflow, workflow.config(**fixed, learning_rate=lr, lora_rank=rank))
        for lr in (5e-3, 2e-2)
        for rank in (2, 4)
    }
    with dg.DagsterInstance.get() as instance:
        for kind in ("trained_weights", "eval_report", "registered_model"):
            made = instance.get_materialized_partitions(dg.AssetKey(["supervised_sweep", kind]))
            assert set(made) == expected, kind
        # the shared assets: one materialisation each, not one per partition
        for kind in ("base_model", "dataset", "datums"):
            records = instance.fetch_materializations(dg.AssetKey(["supervised", kind]), limit=10).records
            assert len(records) == 1, kind
        report_event = instance.get_latest_materialization_event(
            dg.AssetKey(["supervised_sweep", "sweep_report"])
        )
        assert report_event is not None
        sweep_runs = instance.get_runs(dg.RunsFilter(job_name="supervised_sweep_job"))
    assert len(sweep_runs) == 4

    report_path = Path(str(report_event.asset_materialization.metadata["report"].value))
    report = json.loads(report_path.read_text())
    rows = report["rows"]
    assert {r["configuration"] for r in rows} == expected
    # ranked: gate passes first, then lower held-out NLL (the smoke config gates on nll)
    passed = [r for r in rows if r["gate"] == "passed"]
    assert passed, rows
    assert rows[: len(passed)] == passed
    assert [r["nll"] for r in passed] == sorted(r["nll"] for r in passed)
    assert all(math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 for r in rows)
    assert report["best"] == passed[0]["configuration"]
    assert report["promoted"] is True

    champions = _champion_tags(default_tracking_uri())
    assert len(champions) == 1
    name, version = champions[0]
    assert passed[0]["version"] == f"models:/{name}/{version}"
    assert (
        str(MlflowClient(default_tracking_uri()).get_model_version_by_alias(name, "champion").version)
        == version
    )
    assert report["best"] in out and "best first" in out

    # a third learning rate as a Dagster backfill for the daemon: only the two new partitions, then the
    # report, which compares the sweep's six configurations (the run tag the backfill gives its runs)
    wider = [*argv[:-4], "--learning-rate", "5e-3,2e-2,1e-2", "--lora-rank", "2,4", "--backfill"]
    assert main(wider) == 0
    assert "submitted backfill" in capsys.readouterr().out
    new = {
        partition_key(workflow, workflow.config(**fixed, learning_rate=1e-2, lora_rank=rank))
        for rank in (2, 4)
    }
    with dg.DagsterInstance.get() as instance:
        (backfill,) = instance.get_backfills()
        target = backfill.asset_backfill_data.target_subset
        by_key = target.partitions_subsets_by_asset_key
        assert set(by_key[dg.AssetKey(["supervised_sweep", "checkpoints"])].get_partition_keys()) == new
        assert dg.AssetKey(["supervised_sweep", "sweep_report"]) in target.non_partitioned_asset_keys
        assert len(json.loads(backfill.tags[CONFIGURATIONS_TAG])) == 6
        assert len(instance.get_runs(dg.RunsFilter(job_name="supervised_sweep_job"))) == 4  # none run here
    assert len(_champion_tags(default_tracking_uri())) == 1


def test_a_failed_configuration_does_not_stop_the_others_and_only_it_runs_again(
    tiny_model_dir: Path,
    kitchen_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import kitchen_assets.training as training

    monkeypatch.setenv("DAGSTER_HOME", str(kitchen_home / "dagster"))
    monkeypatch.setenv("COLUMNS", "400")
    workflow = get_workflow("supervised")
    smoke = workflow.smoke_config
    assert smoke is not None
    fixed = {**smoke(str(tiny_model_dir)), "max_steps": 1, "eval_examples": 2}
    argv = ["sweep", "supervised", *cli_flags(fixed), "--seed", "0,1"]
    spec = training.training_spec

    def failing_seed_one(config: object, *args: object) -> object:  # a fault in one configuration only
        if getattr(config, "seed", None) == 1:
            raise dg.Failure(description="injected fault", allow_retries=False)
        return spec(config, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(training, "training_spec", failing_seed_one)
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "injected fault" in captured.out and "1 configuration(s) failed" in captured.err
    key = {s: partition_key(workflow, workflow.config(**fixed, seed=s)) for s in (0, 1)}
    done = dg.AssetKey(["supervised_sweep", "registered_model"])
    with dg.DagsterInstance.get() as instance:
        assert set(instance.get_materialized_partitions(done)) == {key[0]}

    monkeypatch.setattr(training, "training_spec", spec)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "done earlier" in out and "up to date, reused" in out  # the shared assets are not made again
    with dg.DagsterInstance.get() as instance:
        assert set(instance.get_materialized_partitions(done)) == {key[0], key[1]}
        runs = instance.get_runs(dg.RunsFilter(job_name="supervised_sweep_job"))
    assert sorted(r.tags["dagster/partition"] for r in runs) == sorted([key[0], key[1], key[1]])

    # a partition whose shared assets were made with other settings refuses to train, naming the setting
    from kitchen_assets.definitions import build_definitions

    other = partition_key(workflow, workflow.config(**{**fixed, "max_rows": 40}))
    job = build_definitions("local").resolve_job_def("supervised_sweep_job")
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("supervised_sweep", [other])
        result = job.execute_in_process(partition_key=other, instance=instance, raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.message
    assert "supervised/dataset was made with max_rows=48, this configuration needs 40" in message


@pytest.mark.parametrize("name", ["supervised", "rl", "distillation", "dpo"])
def test_every_workflow_has_a_sweep_whose_keys_read_back(name: str, tiny_model_dir: Path) -> None:
    from kitchen_assets.definitions import build_definitions

    workflow = get_workflow(name)
    assert workflow.smoke_config is not None
    smoke = workflow.config(**workflow.smoke_config(str(tiny_model_dir)))
    assert config_from_key(workflow, partition_key(workflow, smoke)) == smoke
    graph = build_definitions("local").resolve_asset_graph()
    made = {key.path[-1] for key in graph.asset_keys_for_group(f"{name}_sweep")}
    assert made == {"checkpoints", "trained_weights", *workflow.train_outputs, "eval_report"} | {
        "registered_model",
        "sweep_report",
    }
    train = graph.get(dg.AssetKey([f"{name}_sweep", "trained_weights"]))
    assert (
        train.partitions_def is not None
        and graph.get(dg.AssetKey([name, "trained_weights"])).partitions_def is None
    )
    # training reads the workflow's own, unpartitioned assets before it
    assert {p.path[0] for p in train.parent_keys} == {name}
