"""The persistent Dagster instance ``kitchen run``, ``make ui`` and CI share, made ready once.

python -m kitchen.cli.instance     # prepare $DAGSTER_HOME (default $KITCHEN_HOME/dagster), print it
"""

from __future__ import annotations

import os
from pathlib import Path

from kitchen.home import dagster_home
from kitchen.locks import once

#: Kitchen's instance settings, written to ``$DAGSTER_HOME/dagster.yaml`` when it has none (the file is
#: then the user's to edit). Embedded, so an installed wheel gets them too.
DAGSTER_INSTANCE_SETTINGS = """\
# Written by Kitchen when this Dagster home was created; edit freely.
run_retries:
  enabled: true # a workflow job retries a run that died without a step failing, once (jobs/workflow_jobs.py)
run_queue:
  max_concurrent_runs: 1 # the local engine trains on this machine's cores: one run at a time
telemetry:
  enabled: false
"""
_INSTANCE_READY = ".kitchen-instance-ready"


def prepare_dagster_home(settings: str | None = DAGSTER_INSTANCE_SETTINGS) -> Path:
    """Make the persistent Dagster instance ready and point ``DAGSTER_HOME`` at it; returns its path.

    On first use: creates the directory, installs ``settings`` as ``dagster.yaml`` if it has none, and
    opens the instance once so its SQLite storages (runs, event-log index, schedules) exist. That happens
    under a file lock in the directory, because two processes creating the same SQLite tables at once fail
    one of them (``table runs already exists``); later calls see the marker and return at once.
    """
    home = dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    marker = home / _INSTANCE_READY

    def create() -> None:
        config = home / "dagster.yaml"
        if settings is not None and not config.exists():
            staging = home / ".dagster.yaml.tmp"
            staging.write_text(settings)
            staging.replace(config)
        import dagster as dg

        with dg.DagsterInstance.get() as instance:
            instance.get_runs(limit=1)
        marker.write_text(
            "the Dagster instance here was created by kitchen.cli.instance.prepare_dagster_home\n"
        )

    once(marker.is_file, create, home / ".kitchen-instance.lock")
    return home


if __name__ == "__main__":
    print(prepare_dagster_home())
