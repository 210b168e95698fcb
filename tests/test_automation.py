"""New weights are evaluated with the gate in force; registration follows only a passing gate.

Each sensor tick is evaluated against a real instance, and each requested run is executed as the daemon
would launch it: the requested job with the request's run config.
"""

from pathlib import Path
from typing import Any

import dagster as dg

from jobs.automation import WEIGHTS_RUN_TAG
from jobs.sensors import FAILED_ASSETS_TAG, FAILURE_TAG
from kitchen_assets.definitions import build_definitions
from tests.test_supervised_workflow import tiny_run_config

WEIGHTS = dg.AssetKey(["supervised", "trained_weights"])
CHECKPOINTS = dg.AssetKey(["supervised", "checkpoints"])
REPORT = dg.AssetKey(["supervised", "eval_report"])
REGISTERED = dg.AssetKey(["supervised", "registered_model"])
_TRAINING_FIELDS = {"batch_size", "max_steps", "save_every", "learning_rate", "lora_rank"}


def test_new_weights_are_evaluated_with_the_teams_gate_which_decides_registration(
    tiny_model_dir: Path,
) -> None:
    defs = build_definitions("local")
    sensor = defs.resolve_sensor_def("supervised_new_weights_sensor")
    evaluation = defs.resolve_job_def("supervised_evaluation_job")
    assets_job = defs.resolve_implicit_global_asset_job_def()
    repository = defs.get_repository_def()
    # The team's gate: held-out NLL must drop by 0.01 (the default gate, exact match, would judge
    # a tiny random model differently).
    team_config = tiny_run_config(tiny_model_dir)
    train_config = {k: v for k, v in team_config.items() if k in _TRAINING_FIELDS}

    with dg.DagsterInstance.ephemeral() as instance:
        cursor: str | None = None

        def tick() -> Any:
            nonlocal cursor
            context = dg.build_sensor_context(instance=instance, cursor=cursor, repository_def=repository)
            results = list(sensor(context) or [])  # an asset sensor yields at most one result
            cursor = context.cursor
            assert len(results) <= 1
            return results[0] if results else None

        def train_alone(**overrides: Any) -> str:
            run = assets_job.execute_in_process(
                asset_selection=[CHECKPOINTS, WEIGHTS],
                run_config={"ops": {"supervised__train": {"config": {**train_config, **overrides}}}},
                instance=instance,
            )
            assert run.success
            return run.run_id

        def launch(request: dg.RunRequest) -> dg.ExecuteInProcessResult:
            return evaluation.execute_in_process(
                run_config=request.run_config, instance=instance, tags=request.tags, raise_on_error=False
            )

        # A full workflow run evaluates (and gates) the weights it trains: nothing follows it.
        full = defs.resolve_job_def("supervised_job").execute_in_process(
            run_config=team_config, instance=instance
        )
        assert full.success
        skipped = tick()
        assert isinstance(skipped, dg.SkipReason) and "evaluates the weights it trained" in str(
            skipped.skip_message
        )

        # Training alone barely moves the weights (learning rate 1e-9): they are evaluated with the team's
        # eval config, miss its 0.01 NLL margin, and the blocking gate stops registration in that run.
        bad_run = train_alone(learning_rate=1e-9, seed=1)
        request = tick()
        assert isinstance(request, dg.RunRequest)
        assert request.tags[WEIGHTS_RUN_TAG] == bad_run and request.run_key == f"weights-from-{bad_run}"
        eval_config = request.run_config["ops"]["supervised__eval_report"]["config"]
        assert (eval_config["gate_metric"], eval_config["gate_margin"]) == ("nll", 0.01)
        followed = launch(request)
        assert {e.asset_key for e in followed.get_asset_materialization_events()} == {REPORT}
        (gate,) = followed.get_asset_check_evaluations()
        assert gate.check_name == "quality_gate" and not gate.passed
        # The run fails at the gate, and the failure sensor says so on the run.
        failure = dg.build_run_status_sensor_context(
            sensor_name="kitchen_run_failure_sensor",
            dagster_event=followed.get_run_failure_event(),
            dagster_instance=instance,
            dagster_run=followed.dagster_run,
        ).for_run_failure()
        defs.resolve_sensor_def("kitchen_run_failure_sensor")(failure)
        failed_run = instance.get_run_by_id(followed.run_id)
        assert failed_run is not None
        assert failed_run.tags[FAILED_ASSETS_TAG] == "supervised/eval_report:quality_gate"
        assert "blocking asset check failed" in failed_run.tags[FAILURE_TAG]
        # Nothing new: no second evaluation, no registration behind the gate's back.
        assert isinstance(tick(), dg.SkipReason)

        # Training alone again, properly: evaluated, the gate passes, the new weights are registered.
        good_run = train_alone(seed=2)
        request = tick()
        assert isinstance(request, dg.RunRequest) and request.tags[WEIGHTS_RUN_TAG] == good_run
        followed = launch(request)
        (gate,) = followed.get_asset_check_evaluations()
        assert gate.passed, gate.description
        assert {e.asset_key for e in followed.get_asset_materialization_events()} == {REPORT, REGISTERED}
        registered = instance.get_latest_materialization_event(REGISTERED)
        assert registered is not None and registered.run_id == followed.run_id


def test_evaluation_job_is_the_report_its_gate_and_registration() -> None:
    job = build_definitions("local").resolve_job_def("supervised_evaluation_job")
    assert set(job.asset_layer.executable_asset_keys) == {REPORT, REGISTERED}
    assert {key.name for key in job.asset_layer.asset_graph.asset_check_keys} >= {"quality_gate"}
