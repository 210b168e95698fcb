"""Base-model resolution: the packaged GGUF (dequantized once), local directories, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kitchen.models.base import DEFAULT_MODEL, ModelResolutionError, resolve_base_model


def test_local_directory_resolves_with_content_hash(tiny_model_dir: Path) -> None:
    manifest = resolve_base_model(str(tiny_model_dir))
    assert manifest.source == "local"
    assert manifest.backend_model == str(tiny_model_dir.resolve())
    assert manifest.architecture == "LlamaForCausalLM"
    assert len(manifest.content_hash) == 64
    assert resolve_base_model(str(tiny_model_dir)).content_hash == manifest.content_hash


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelResolutionError, match="not a Hugging Face model directory"):
        resolve_base_model(str(tmp_path))


def test_missing_path_names_it() -> None:
    with pytest.raises(ModelResolutionError, match=r"'\./no-such-model': no such file or directory"):
        resolve_base_model("./no-such-model")


def test_unreachable_hub_names_model_and_what_was_tried() -> None:
    # conftest sets HF_HUB_OFFLINE=1: the Hub path must fail at once with a clear message.
    with pytest.raises(ModelResolutionError) as info:
        resolve_base_model("meta-llama/Llama-3.1-8B")
    message = str(info.value)
    assert "meta-llama/Llama-3.1-8B" in message
    assert "not a packaged model" in message and "not a local path" in message
    assert "could not be reached" in message


def test_empty_name_is_rejected() -> None:
    with pytest.raises(ModelResolutionError, match="empty"):
        resolve_base_model("  ")


def test_packaged_default_is_dequantized_once_and_cached(kitchen_home: Path) -> None:
    pytest.importorskip("gguf")
    first = resolve_base_model(DEFAULT_MODEL)
    model_dir = Path(first.backend_model)
    assert first.source == "packaged-gguf"
    assert model_dir.parent == kitchen_home / "models"
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert first.num_parameters == 134_515_008
    weights = model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = resolve_base_model("smollm2")  # an alias, served from the cache
    assert again.content_hash == first.content_hash
    assert weights.stat().st_mtime_ns == mtime
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
