"""The deployment examples (``deploy/``) are valid: each ``dagster.yaml`` against Dagster's instance schema
(its run queue included) and its run launcher's own config schema, the workspace file against the
workspace schema, and the Dockerfile's code server pointing at the code location that loads. No container
runtime is needed (none is on CI); with one, ``docker run IMAGE dagster definitions validate -m
kitchen_assets.definitions`` checks the built image (README: Deployment)."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ENV = {
    "DAGSTER_POSTGRES_HOST": "postgres",
    "DAGSTER_POSTGRES_USER": "dagster",
    "DAGSTER_POSTGRES_PASSWORD": "secret",
    "DAGSTER_POSTGRES_DB": "dagster",
    "KITCHEN_CODE_LOCATION_IMAGE": "kitchen-code-location:latest",
}


def _configurable(section: dict[str, Any]) -> None:
    """A ``module``/``class``/``config`` entry: the class imports and accepts its config."""
    cls = getattr(importlib.import_module(section["module"]), section["class"])
    result = process_config(cls.config_type(), section.get("config") or {})
    assert result.success, [e.message for e in result.errors or []]


@pytest.mark.parametrize("launcher", ["docker", "k8s"])
def test_instance_files_validate(launcher: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    shutil.copy(DEPLOY / launcher / "dagster.yaml", tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))  # raises naming the key on a schema error
    raw = yaml.safe_load((tmp_path / "dagster.yaml").read_text())
    _configurable(raw["run_launcher"])
    assert config["storage"]["postgres"]["postgres_db"]["hostname"] == {"env": "DAGSTER_POSTGRES_HOST"}
    limits = config["run_queue"]["tag_concurrency_limits"]
    assert {k: limits[0][k] for k in ("key", "value")} == {
        "key": "dagster/backfill",
        "value": {"applyLimitPerUniqueValue": True},
    }


def test_a_misspelt_launcher_setting_is_caught() -> None:
    raw = yaml.safe_load((DEPLOY / "docker" / "dagster.yaml").read_text())
    raw["run_launcher"]["config"]["imag"] = raw["run_launcher"]["config"].pop("image")
    with pytest.raises(AssertionError):
        _configurable(raw["run_launcher"])


def test_the_image_serves_the_code_location_the_workspace_loads() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.M)
    assert cmd is not None
    argv = yaml.safe_load(cmd.group(1))
    assert argv[:3] == ["dagster", "code-server", "start"]
    module = argv[argv.index("-m") + 1]
    assert importlib.util.find_spec(module) is not None
    port = int(argv[argv.index("-p") + 1])
    workspace = yaml.safe_load((DEPLOY / "docker" / "workspace.yaml").read_text())
    server = workspace["load_from"][0]["grpc_server"]
    assert server["port"] == port and server["location_name"] == "kitchen"
    # every package the project ships is copied into the image
    shipped = re.findall(r"include = \[(.*)\]", (DEPLOY.parent / "pyproject.toml").read_text())[0]
    for package in re.findall(r'"(\w+)\*"', shipped):
        assert f"COPY {package} ./{package}" in dockerfile, package
