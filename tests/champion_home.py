"""A Kitchen home holding one registered tiny supervised champion, shared by a test module's tests
(publishing, serving and feedback all start from a registered version)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
from test_supervised_workflow import tiny_run_config

from kitchen_assets.definitions import build_definitions


def home_with_tiny_champion(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, label: str
) -> Path:
    """Run ``supervised_job`` on the tiny config in a fresh home; its version 1 is the champion."""
    root = tmp_path_factory.mktemp(label) / "kitchen-home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KITCHEN_HOME", str(root))
        job = build_definitions("local").resolve_job_def("supervised_job")
        with dg.DagsterInstance.ephemeral() as instance:
            assert job.execute_in_process(
                run_config=tiny_run_config(tiny_model_dir), instance=instance
            ).success
    return root
