"""One rule for secrets: which names hold them, and how URIs, webhooks and free text are shown without them.

Every caller (registry metadata and lineage config, the failure sensor, telemetry) goes through
``kitchen.secrets``; these tests pin the rule and each caller's use of it.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from kitchen.secrets import (
    REDACTED,
    drop_secret_keys,
    is_secret_name,
    redact_text,
    redact_uri,
    redact_webhook,
    secret_values,
)
from kitchen.workflows import get_workflow

CANARY = "kitchen-canary-5e1d9a"


@pytest.mark.parametrize(
    "name",
    [
        "TINKER_API_KEY",
        "HF_TOKEN",
        "hf_token",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "aws_access_key_id",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "KITCHEN_FAILURE_WEBHOOK_URL",
        "apiKey",
        "db_password",
        "Authorization",
    ],
)
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "eval_max_tokens",
        "max_tokens",
        "num_tokens",
        "tokenizer_path",
        "TOKENIZERS_PARALLELISM",
        "asset_key",
        "key",
        "lora_rank",
        "registered_model_name",
        "keyboard",
        "PWD",  # the working directory: redacting it would mangle every path in telemetry
        "OLDPWD",
    ],
)
def test_not_secret_names(name: str) -> None:
    assert not is_secret_name(name)


def test_config_keeps_eval_max_tokens_and_drops_secrets() -> None:
    config = {"eval_max_tokens": 16, "learning_rate": 1e-3, "hf_token": CANARY, "api_key": CANARY}
    assert drop_secret_keys(config) == {"eval_max_tokens": 16, "learning_rate": 1e-3}


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        (f"postgresql://user:{CANARY}@db.internal/mlflow", "postgresql://***@db.internal/mlflow"),
        (f"postgresql+psycopg2://u:{CANARY}@db:5432/m", "postgresql+psycopg2://***@db:5432/m"),
        (f"mysql://{CANARY}@db/m", "mysql://***@db/m"),
        (f"http://user:{CANARY}@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
        (f"https://mlflow.example/api?token={CANARY}&x=1", "https://mlflow.example/api?token=***&x=1"),
        # A password with unescaped separators spills into the port, path or fragment: hide it all.
        (f"postgresql://user:{CANARY}/x@db/mlflow", "postgresql://***"),
        (f"postgresql://user:12#{CANARY}@db/mlflow", "postgresql://***"),
        ("sqlite:////home/me/.kitchen/mlflow.db", "sqlite:////home/me/.kitchen/mlflow.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("models:/name@champion", "models:/name@champion"),
    ],
)
def test_redact_uri(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown
    assert CANARY not in redact_uri(uri)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"https://hooks.slack.com/services/T0/B0/{CANARY}", "https://hooks.slack.com/***"),
        (f"http://127.0.0.1:9/hook?token={CANARY}", "http://127.0.0.1:9/***"),
        (f"hooks.slack.com/services/{CANARY}", "***"),
        ("https://example.com", "https://example.com"),
    ],
)
def test_redact_webhook_shows_only_scheme_and_host(url: str, shown: str) -> None:
    assert redact_webhook(url) == shown


def test_secret_values_include_url_passwords_and_webhooks() -> None:
    env = {
        "MLFLOW_TRACKING_URI": f"postgresql://user:{CANARY}@db/mlflow",
        "KITCHEN_FAILURE_WEBHOOK_URL": f"https://hooks.slack.com/services/T0/B0/{CANARY}x",
        "HF_TOKEN": "short",  # below the length floor: replacing it would mangle ordinary text
        "PATH": "/usr/bin",
    }
    found = secret_values(env)
    assert CANARY in found and env["KITCHEN_FAILURE_WEBHOOK_URL"] in found
    assert "short" not in found and "/usr/bin" not in found
    text = f"posting to {env['KITCHEN_FAILURE_WEBHOOK_URL']} with {CANARY}"
    assert redact_text(text, found) == f"posting to {REDACTED} with {REDACTED}"


def test_telemetry_redacts_by_the_same_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    from kitchen.telemetry.events import _redact, _secret_values

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"postgresql://u:{CANARY}@db/m")
    redacted = _redact(
        {"note": f"store postgresql://u:{CANARY}@db/m", "eval_max_tokens": 16, "hf_token": "x"},
        _secret_values(),
    )
    assert CANARY not in json.dumps(redacted)
    assert redacted["eval_max_tokens"] == 16 and redacted["hf_token"] == REDACTED


# -- callers ------------------------------------------------------------------------------------------


def test_registry_lineage_config_keeps_eval_max_tokens() -> None:
    from kitchen_assets.registry import _run_config

    run_config = {
        "ops": {
            "supervised__eval_report": {"config": {"eval_max_tokens": 32, "eval_examples": 8}},
            "supervised__base_model": {"config": {"model": "m", "hf_token": CANARY}},
        }
    }
    context: Any = SimpleNamespace(run=SimpleNamespace(run_config=run_config), has_partition_key=False)
    assert _run_config(context, get_workflow("supervised")) == {
        "eval_examples": 8,
        "eval_max_tokens": 32,
        "model": "m",
    }


def test_open_in_mlflow_metadata_hides_a_database_password() -> None:
    from kitchen.registry.promotion import PromotionDecision
    from kitchen_assets.registry import _metadata

    uri = f"postgresql://kitchen:{CANARY}@db.internal:5432/mlflow"
    decision = PromotionDecision(
        alias="champion",
        reason="beats no champion",
        metric="exact_match",
        value=0.5,
        lower_is_better=False,
        gate_passed=True,
        gate_source="eval report",
        previous_champion=None,
        previous_champion_value=None,
    )
    manifest = SimpleNamespace(
        name="m", version="1", model_uri="models:/m/1", alias="champion", created=True, run_id="r", source="s"
    )
    manifest.tracking_uri = redact_uri(uri)
    result: Any = SimpleNamespace(
        manifest=manifest, decision=decision, tags={"k": "v"}, run_url=None, version_url=None
    )
    registry: Any = SimpleNamespace(resolved_tracking_uri=lambda: uri)
    metadata = _metadata(result, registry)
    assert (
        metadata["open_in_mlflow"] == "mlflow ui --backend-store-uri postgresql://***@db.internal:5432/mlflow"
    )
    assert CANARY not in json.dumps({k: str(v) for k, v in metadata.items()})


def test_an_unopenable_store_is_one_line_without_its_password() -> None:
    from kitchen.registry.store import ModelRegistry, RegistryError

    registry = ModelRegistry(f"postgresql://kitchen:{CANARY}@127.0.0.1:9/mlflow", timeout_s=3)
    with pytest.raises(RegistryError) as raised:
        registry.preflight()
    message = str(raised.value)
    assert message.startswith("could not reach MLflow store postgresql://***@127.0.0.1:9/mlflow: ")
    assert "\n" not in message and CANARY not in message
    assert raised.value.__cause__ is None and raised.value.__context__ is None
