"""Shared fixtures: an isolated Kitchen home and a tiny real model built from a config."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Telemetry: JSONL and the Dagster sink only; MLflow (a fresh SQLite store per test home costs seconds) and
# OpenTelemetry are exercised by tests/test_telemetry*.py, which select sinks explicitly.
os.environ.setdefault("KITCHEN_TELEMETRY_SINKS", "jsonl,dagster")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with a ChatML tokenizer, saved like any Hub checkpoint."""
    from kitchen.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(autouse=True)
def kitchen_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test gets its own KITCHEN_HOME so nothing leaks between tests or into ~/.kitchen."""
    home = tmp_path / "kitchen-home"
    monkeypatch.setenv("KITCHEN_HOME", str(home))
    yield home
