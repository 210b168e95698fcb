"""Declarative automation: new trained weights are evaluated, and a passing evaluation is registered.

A re-run of training alone (``supervised/checkpoints`` + ``supervised/trained_weights`` from the UI, or a
retry) leaves the eval report describing older weights. ``follows(trained_weights)`` on the eval report
requests it when the weights were updated by a run that did *not* also target the report, so a full
workflow run, which evaluates anyway, triggers nothing. Registration ``follows(eval_report)`` with
``all_deps_blocking_checks_passed``: it is requested in the same run as the eval report, whose blocking
gate check then stops it in that run when it fails, and it is never requested on its own while the
latest gate result is a failure. The checks ride along because automation runs include every check of
their assets.

``kitchen_automation_sensor`` evaluates these conditions every ``KITCHEN_AUTOMATION_INTERVAL`` seconds
(default 30). It starts running (``KITCHEN_AUTOMATION_SENSOR=stopped`` to change): it only requests work
when new weights appear outside a full run. Runs it launches are tagged ``kitchen/trigger=new-weights``
and use each asset's default config (the eval report's ``eval_examples``/``eval_max_tokens``).
"""

from collections.abc import Sequence

import dagster as dg

from jobs.sensors import TRIGGER_TAG, env_number, env_status

AutomationCondition = dg.AutomationCondition


def follows(upstream: dg.AssetKey) -> dg.AutomationCondition:
    """True once after ``upstream`` is updated by a run that did not target this asset too, when every
    dependency exists, none is being materialised, and all their blocking checks passed (or run now)."""
    updated_elsewhere = AutomationCondition.any_deps_match(
        (AutomationCondition.newly_updated() & ~AutomationCondition.executed_with_root_target())
        | AutomationCondition.will_be_requested()
    ).allow(dg.AssetSelection.assets(upstream))
    return (
        updated_elsewhere.since_last_handled()
        & ~AutomationCondition.any_deps_missing()
        & ~AutomationCondition.any_deps_in_progress()
        & ~AutomationCondition.in_progress()
        & AutomationCondition.all_deps_blocking_checks_passed()
    ).with_label(f"follows {upstream.to_user_string()}")


def workflow_conditions(workflow: str) -> dict[dg.AssetKey, dg.AutomationCondition]:
    """Eval report after new weights; registration after the eval report (behind its gate)."""
    weights, report = dg.AssetKey([workflow, "trained_weights"]), dg.AssetKey([workflow, "eval_report"])
    return {report: follows(weights), dg.AssetKey([workflow, "registered_model"]): follows(report)}


def with_automation(
    assets: Sequence[dg.AssetsDefinition], workflows: Sequence[str]
) -> list[dg.AssetsDefinition]:
    """``assets`` with ``workflow_conditions`` set on the specs that have no condition of their own."""
    conditions = {key: cond for workflow in workflows for key, cond in workflow_conditions(workflow).items()}

    def apply(spec: dg.AssetSpec) -> dg.AssetSpec:
        if spec.key not in conditions or spec.automation_condition is not None:
            return spec
        return spec.replace_attributes(automation_condition=conditions[spec.key])

    return [a.map_asset_specs(apply) if any(k in conditions for k in a.keys) else a for a in assets]


def automation_sensor(workflows: Sequence[str]) -> dg.AutomationConditionSensorDefinition:
    return dg.AutomationConditionSensorDefinition(
        name="kitchen_automation_sensor",
        target=dg.AssetSelection.groups(*workflows),
        default_status=env_status("KITCHEN_AUTOMATION_SENSOR", dg.DefaultSensorStatus.RUNNING),
        minimum_interval_seconds=int(env_number("KITCHEN_AUTOMATION_INTERVAL", 30)),
        run_tags={TRIGGER_TAG: "new-weights"},
        description="Evaluates new trained weights (and registers them behind the eval gate).",
    )
