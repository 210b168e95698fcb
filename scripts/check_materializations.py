"""Check, in the Dagster instance at ``$DAGSTER_HOME``, that the latest run of a group materialised it all.

    python scripts/check_materializations.py supervised

Passes when the instance's latest run succeeded, materialised every asset of the group, and every asset
check it ran passed; prints what it found either way (run it right after the materialisation). A failed
quality gate fails this check (registration did not happen), which is what a CI gate should say.
"""

import argparse
import sys

import dagster as dg

from kitchen_assets.definitions import defs


def check(instance: dg.DagsterInstance, group: str) -> list[str]:
    """Problems found (empty when the instance's latest run materialised the whole group, checks green)."""
    keys = sorted(defs.resolve_asset_graph().asset_keys_for_group(group), key=lambda k: k.to_user_string())
    if not keys:
        return [f"no assets in group {group!r}"]
    runs = instance.get_runs(limit=1)
    if not runs:
        return [f"no runs in the instance at {instance.root_directory}"]
    run = runs[0]
    print(f"run {run.run_id} ({run.job_name}): {run.status.value}")
    problems = (
        [] if run.status == dg.DagsterRunStatus.SUCCESS else [f"run {run.run_id} is {run.status.value}"]
    )
    for key in keys:
        event = instance.get_latest_materialization_event(key)
        found = (
            "missing" if event is None else "ok" if event.run_id == run.run_id else f"from run {event.run_id}"
        )
        print(f"  {key.to_user_string():40} {found}")
        if found != "ok":
            problems.append(f"{key.to_user_string()} was not materialised by run {run.run_id} ({found})")
    for record in instance.get_records_for_run(
        run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
    ).records:
        dagster_event = record.event_log_entry.dagster_event
        assert dagster_event is not None
        evaluation = dagster_event.asset_check_evaluation_data
        name = evaluation.asset_check_key.to_user_string()
        print(f"  {name:40} {'passed' if evaluation.passed else 'FAILED'}")
        if not evaluation.passed:
            problems.append(f"check {name} failed: {evaluation.description}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("group", help="asset group, e.g. supervised")
    group = parser.parse_args().group
    with dg.DagsterInstance.get() as instance:
        problems = check(instance, group)
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    if not problems:
        print(f"OK: group {group!r} fully materialised by its latest run, every check passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
