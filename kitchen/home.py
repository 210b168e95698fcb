"""Where Kitchen keeps what it makes: one root, ``KITCHEN_HOME`` (default ``~/.kitchen``)."""

from __future__ import annotations

import os
from pathlib import Path


def kitchen_home() -> Path:
    """The root for caches, datasets, datums, checkpoints and the Dagster instance."""
    root = Path(os.environ.get("KITCHEN_HOME") or Path.home() / ".kitchen").expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def home_dir(*parts: str) -> Path:
    """A subdirectory of the Kitchen home, created on first use."""
    path = kitchen_home().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


#: The Dagster instance settings Kitchen uses (``make ui``, ``kitchen run``, CI): written to
#: ``$DAGSTER_HOME/dagster.yaml`` when that file does not exist yet (edit the copy to change them).
DAGSTER_INSTANCE_SETTINGS = """\
# Written by Kitchen when this Dagster home was created; edit freely.
run_retries:
  enabled: true # a workflow job retries a run that died without a step failing, once (jobs/workflow_jobs.py)
run_queue:
  max_concurrent_runs: 1 # the local engine trains on this machine's cores: one run at a time
telemetry:
  enabled: false
"""


def prepare_dagster_home() -> Path:
    """``$DAGSTER_HOME`` (default ``$KITCHEN_HOME/dagster``), created with Kitchen's instance settings, and
    exported so the Dagster instance in this process uses it."""
    home = Path(os.environ.get("DAGSTER_HOME") or kitchen_home() / "dagster").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    settings = home / "dagster.yaml"
    if not settings.exists():
        tmp = home / f".dagster.yaml.{os.getpid()}.tmp"
        tmp.write_text(DAGSTER_INSTANCE_SETTINGS)
        os.replace(tmp, settings)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


if __name__ == "__main__":  # `python -m kitchen.home`: prepare $DAGSTER_HOME (make ui, CI) and print it
    print(prepare_dagster_home())
