"""Declarative automation: new weights are evaluated; registration follows only a passing eval gate.

Ticks are evaluated with ``dg.evaluate_automation_conditions`` against a real instance, and each requested
run is executed the way the automation sensor launches it (the implicit asset job, the requested assets
and every check on them, default config).
"""

from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from jobs.automation import follows, with_automation
from kitchen_assets.definitions import build_definitions
from tests.test_supervised_workflow import tiny_run_config

WEIGHTS = dg.AssetKey(["supervised", "trained_weights"])
CHECKPOINTS = dg.AssetKey(["supervised", "checkpoints"])
REPORT = dg.AssetKey(["supervised", "eval_report"])
REGISTERED = dg.AssetKey(["supervised", "registered_model"])
_TRAINING_FIELDS = {"batch_size", "max_steps", "save_every", "learning_rate", "lora_rank"}


def _requested(result: Any, keys: list[dg.AssetKey]) -> dict[str, int]:
    return {key.path[-1]: result.get_num_requested(key) for key in keys}


def test_new_weights_are_evaluated_and_the_gate_decides_registration(tiny_model_dir: Path) -> None:
    defs = build_definitions("local")
    graph_keys = defs.resolve_asset_graph().get_all_asset_keys()
    if REGISTERED not in graph_keys:
        pytest.fail("supervised/registered_model is not defined: the gate has nothing to guard")
    assets_job = defs.resolve_implicit_global_asset_job_def()
    keys = [REPORT, REGISTERED]
    with dg.DagsterInstance.ephemeral() as instance:
        # A full workflow run evaluates (and gates) its own weights: nothing follows it.
        full = defs.resolve_job_def("supervised_job").execute_in_process(
            run_config=tiny_run_config(tiny_model_dir), instance=instance
        )
        assert full.success
        tick = dg.evaluate_automation_conditions(defs, instance)
        assert tick.total_requested == 0

        # Training re-run alone (new seed): the eval report and, behind its gate, registration follow.
        train_config = {k: v for k, v in tiny_run_config(tiny_model_dir).items() if k in _TRAINING_FIELDS}
        retrain = assets_job.execute_in_process(
            asset_selection=[CHECKPOINTS, WEIGHTS],
            run_config={"ops": {"supervised__train": {"config": {**train_config, "seed": 1}}}},
            instance=instance,
        )
        assert retrain.success
        tick = dg.evaluate_automation_conditions(defs, instance, cursor=tick.cursor)
        assert _requested(tick, keys) == {"eval_report": 1, "registered_model": 1}

        # The run the sensor launches: both assets, the eval report's checks ride along. The tiny model
        # cannot beat its base by the default margin, so the blocking gate fails and stops registration.
        followed = assets_job.execute_in_process(
            asset_selection=keys, instance=instance, raise_on_error=False
        )
        materialised = {e.asset_key for e in followed.get_asset_materialization_events()}
        assert materialised == {REPORT}
        (gate,) = followed.get_asset_check_evaluations()
        assert gate.check_name == "quality_gate" and not gate.passed
        report_event = instance.get_latest_materialization_event(REPORT)
        assert report_event is not None and report_event.run_id == followed.run_id

        # A failed gate is not retried into registration on later ticks.
        tick = dg.evaluate_automation_conditions(defs, instance, cursor=tick.cursor)
        assert tick.total_requested == 0

        # Re-evaluated with a gate the trained model passes (held-out NLL, no margin): registration follows.
        passing = {"gate_metric": "nll", "gate_margin": 0.0, "gate_max_nll_increase": 0.0}
        regated = assets_job.execute_in_process(
            asset_selection=[REPORT],
            run_config={"ops": {"supervised__eval_report": {"config": passing}}},
            instance=instance,
        )
        (gate,) = regated.get_asset_check_evaluations()
        assert regated.success and gate.passed
        tick = dg.evaluate_automation_conditions(defs, instance, cursor=tick.cursor)
        assert _requested(tick, keys) == {"eval_report": 0, "registered_model": 1}


def test_an_asset_keeps_its_own_condition() -> None:
    own = dg.AutomationCondition.on_cron("0 * * * *")

    @dg.asset(key=REPORT, automation_condition=own)
    def report() -> None: ...

    @dg.asset(key=REGISTERED)
    def registered() -> None: ...

    mapped = {a.key: a for a in with_automation([report, registered], ["supervised"])}
    assert mapped[REPORT].automation_conditions_by_key[REPORT] == own
    assert mapped[REGISTERED].automation_conditions_by_key[REGISTERED] == follows(REPORT)
