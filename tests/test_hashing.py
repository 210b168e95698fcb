"""The trained weights' content hash: what it covers, how it reads file URIs, and what it refuses."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from kitchen.hashing import weights_content_hash


def _expected(directory: Path) -> str:
    """sha256 of the JSON {file name: sha256 of its bytes} of the two PEFT adapter files, by hand."""
    digests = {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
        for name in ("adapter_config.json", "adapter_model.safetensors")
    }
    return hashlib.sha256(json.dumps(digests, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _adapter(directory: Path, weights: bytes, session: str) -> Path:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text('{"r": 4}')
    (directory / "adapter_model.safetensors").write_bytes(weights)
    (directory / "kitchen_sampler.json").write_text(json.dumps({"session_id": session, "step": 3}))
    return directory


def test_a_percent_encoded_path_hashes_the_adapter_bytes(tmp_path: Path) -> None:
    directory = _adapter(tmp_path / "my runs" / "sampler #1", b"weights", "session-a")
    uri = directory.as_uri()
    assert "%20" in uri and "%23" in uri
    assert weights_content_hash(uri) == _expected(directory)
    assert weights_content_hash(uri) != hashlib.sha256(b"").hexdigest()


def test_the_hash_ignores_the_session_record_and_follows_the_weights(tmp_path: Path) -> None:
    first = _adapter(tmp_path / "a", b"weights", "session-a")
    second = _adapter(tmp_path / "b", b"weights", "session-b")
    changed = _adapter(tmp_path / "c", b"weightz", "session-a")
    assert weights_content_hash(first.as_uri()) == weights_content_hash(second.as_uri())
    assert weights_content_hash(first.as_uri()) != weights_content_hash(changed.as_uri())


def test_missing_weights_are_an_error_not_the_hash_of_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="do not exist"):
        weights_content_hash((tmp_path / "gone dir").as_uri())
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"lack adapter_model\.safetensors"):
        weights_content_hash(partial.as_uri())


def test_remote_and_unknown_addresses() -> None:
    tinker = "tinker://run-1/sampler_weights/final"
    assert weights_content_hash(tinker) == weights_content_hash(tinker)
    assert weights_content_hash(tinker) != weights_content_hash(tinker + "x")
    with pytest.raises(ValueError, match="expected a file:// or tinker:// URI"):
        weights_content_hash("s3://bucket/adapter")
    with pytest.raises(ValueError, match="names host"):
        weights_content_hash("file://otherhost/tmp/adapter")


def test_two_engine_sessions_saving_the_same_weights_hash_alike(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The local engine's sampler directory holds a per-session id; the hash must not see it."""
    from resources.local_engine import LocalServiceClient

    service = LocalServiceClient(root=tmp_path / "engine root with spaces")
    paths: list[str] = []
    for _ in range(2):
        trainer: Any = service.create_lora_training_client(str(tiny_model_dir), rank=4, seed=0).result()
        paths.append(trainer.save_weights_for_sampler("final").result().path)
    assert paths[0] != paths[1]
    records = [
        json.loads((Path(p.removeprefix("file://").replace("%20", " ")) / "kitchen_sampler.json").read_text())
        for p in paths
    ]
    assert records[0]["session_id"] != records[1]["session_id"]
    assert weights_content_hash(paths[0]) == weights_content_hash(paths[1])
    directory = Path(paths[0].removeprefix("file://").replace("%20", " "))
    assert weights_content_hash(paths[0]) == _expected(directory)
