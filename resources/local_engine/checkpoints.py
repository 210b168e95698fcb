"""On-disk checkpoints: training state (weights + optimizer) and sampler weights, written atomically.

Layout under the engine root::

    <root>/<session_id>/state/<name>/    adapter.safetensors, optimizer.pt, rng.pt, kitchen_state.json
    <root>/<session_id>/sampler/<name>/  adapter_config.json, adapter_model.safetensors, kitchen_sampler.json
    <root>/<session_id>/run.json         the session's run record (base model, rank, user_metadata)

Every checkpoint is assembled in a hidden staging directory beside its target and renamed into place
only when complete; its manifest is written last and records a SHA-256 of every file, which loading
verifies. A crash mid-save leaves at most a hidden staging directory, never a checkpoint a load
would trust.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kitchen import atomic
from kitchen.hashing import hash_file

STATE_MANIFEST = "kitchen_state.json"
SAMPLER_MANIFEST = "kitchen_sampler.json"
ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
STATE_FORMAT = "kitchen-local-state/1"
SAMPLER_FORMAT = "kitchen-local-sampler/1"


class CheckpointError(ValueError):
    """A checkpoint exists but cannot be trusted or does not fit: the message says why."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, a read-only or unwritable home): names its path."""


def _write_failed(target: Path, error: BaseException) -> CheckpointWriteError:
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    failure = CheckpointWriteError(
        f"cannot write checkpoint {target}: {reason or type(error).__name__}; if that disk is full or "
        "KITCHEN_HOME is not writable there, fix it and rerun: training resumes from the last checkpoint"
    )
    failure.errno = error.errno if isinstance(error, OSError) else None
    return failure


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """``kitchen.atomic.atomic_directory`` for a checkpoint: it replaces an existing one (a reader sees the
    old checkpoint, briefly nothing, then the new one: never a mixture), fsyncs what it wrote, and raises
    any failure to write (the writers report a full disk without a file name) as ``CheckpointWriteError``
    naming ``target``."""
    try:
        with atomic.atomic_directory(target, replace=True, durable=True) as staging:
            yield staging
    except CheckpointError:
        raise
    except Exception as error:
        raise _write_failed(target, error) from error


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class StateInfo:
    """What ``kitchen_state.json`` records besides file hashes: enough to rebuild the client."""

    base_model: str
    rank: int
    lora_alpha: int
    seed: int
    step: int
    session_id: str
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = False
    """Which layers carry LoRA (the SDK's ``train_*``); checkpoints written before these were recorded
    adapted attention and MLP layers only, which the defaults say."""


@dataclass(frozen=True)
class LoadedState:
    info: StateInfo
    directory: Path
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    rng: dict[str, Any] | None


def write_training_state(
    target: Path,
    info: StateInfo,
    adapter: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    rng: dict[str, Any],
) -> None:
    with atomic_directory(target) as staging:
        save_file(adapter, str(staging / ADAPTER_FILE))
        torch.save(optimizer, staging / OPTIMIZER_FILE)
        torch.save(rng, staging / RNG_FILE)
        files = {name: hash_file(staging / name) for name in (ADAPTER_FILE, OPTIMIZER_FILE, RNG_FILE)}
        manifest = {
            "format": STATE_FORMAT,
            **asdict(info),
            "content_hash": files[ADAPTER_FILE],
            "files": files,
        }
        _write_json(staging / STATE_MANIFEST, manifest)


def read_state_info(directory: Path) -> StateInfo:
    """The manifest of a training-state checkpoint (files not yet verified)."""
    return _state_info(
        directory, _read_manifest(directory, STATE_MANIFEST, STATE_FORMAT, other=SAMPLER_MANIFEST)
    )


def _state_info(directory: Path, manifest: dict[str, Any]) -> StateInfo:
    missing = [f.name for f in fields(StateInfo) if f.default is MISSING and f.name not in manifest]
    if missing:
        raise CheckpointError(f"checkpoint {directory}: {STATE_MANIFEST} lacks {missing}")
    return StateInfo(**{f.name: manifest[f.name] for f in fields(StateInfo) if f.name in manifest})


def read_training_state(directory: Path, *, with_optimizer: bool) -> LoadedState:
    """Load a training-state checkpoint after checking every file against its recorded hash."""
    manifest = _read_manifest(directory, STATE_MANIFEST, STATE_FORMAT, other=SAMPLER_MANIFEST)
    info = _state_info(directory, manifest)
    _verify_files(directory, manifest.get("files"))
    adapter = load_file(str(directory / ADAPTER_FILE))
    optimizer = rng = None
    if with_optimizer:
        optimizer = torch.load(directory / OPTIMIZER_FILE, weights_only=True, map_location="cpu")
        rng = torch.load(directory / RNG_FILE, weights_only=True, map_location="cpu")
    return LoadedState(info=info, directory=directory, adapter=adapter, optimizer=optimizer, rng=rng)


@dataclass(frozen=True)
class SamplerInfo:
    """What ``kitchen_sampler.json`` records: which base the adapter applies to, and at what step."""

    base_model: str
    rank: int
    step: int
    session_id: str


def write_sampler(target: Path, info: SamplerInfo, save_adapter: Any) -> None:
    """``save_adapter(directory)`` writes the PEFT files (``PeftModel.save_pretrained``)."""
    with atomic_directory(target) as staging:
        save_adapter(staging)
        for required in (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE):
            if not (staging / required).is_file():
                raise CheckpointError(f"adapter save wrote no {required}")
        files = {name: hash_file(staging / name) for name in (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE)}
        manifest = {
            "format": SAMPLER_FORMAT,
            **asdict(info),
            "content_hash": files[PEFT_WEIGHTS_FILE],
            "files": files,
        }
        _write_json(staging / SAMPLER_MANIFEST, manifest)


def read_sampler(directory: Path) -> SamplerInfo:
    """The manifest of a sampler checkpoint, after verifying its adapter files."""
    manifest = _read_manifest(directory, SAMPLER_MANIFEST, SAMPLER_FORMAT, other=STATE_MANIFEST)
    _verify_files(directory, manifest.get("files"))
    try:
        return SamplerInfo(**{key: manifest[key] for key in SamplerInfo.__dataclass_fields__})
    except KeyError as exc:
        raise CheckpointError(f"checkpoint {directory}: {SAMPLER_MANIFEST} lacks {exc}") from exc


def _read_manifest(directory: Path, name: str, expected_format: str, *, other: str) -> dict[str, Any]:
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint {directory} does not exist")
    path = directory / name
    if not path.is_file():
        kind = "sampler" if name == SAMPLER_MANIFEST else "training-state"
        found = f"; it holds {other}, the other kind of checkpoint" if (directory / other).is_file() else ""
        raise CheckpointError(f"{directory} is not a Kitchen {kind} checkpoint (no {name}){found}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {directory}: unreadable {name}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != expected_format:
        raise CheckpointError(f"checkpoint {directory}: {name} is not format {expected_format!r}")
    return manifest


def _verify_files(directory: Path, files: Any) -> None:
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"checkpoint {directory}: manifest lists no file hashes")
    for name, expected in files.items():
        if not isinstance(name, str) or Path(name).name != name:
            raise CheckpointError(f"checkpoint {directory}: manifest names a file outside it: {name!r}")
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory} is incomplete: {name} is missing")
        actual = hash_file(path)
        if actual != expected:
            raise CheckpointError(
                f"checkpoint {directory} is corrupt: {name} has sha256 {actual[:12]}…, "
                f"manifest records {str(expected)[:12]}…"
            )


# -- the run record ------------------------------------------------------------------------------------

RUN_RECORD = "run.json"
RUN_FORMAT = "kitchen-local-run/1"


@dataclass(frozen=True)
class RunRecord:
    """A training session as the SDK's REST client describes it (``tinker.types.TrainingRun``)."""

    training_run_id: str
    base_model: str
    lora_rank: int
    user_metadata: dict[str, str] = field(default_factory=dict)


def write_run_record(session_dir: Path, record: RunRecord) -> None:
    """Written (atomically) beside the session's checkpoints, so it lives and goes with them."""
    session_dir.mkdir(parents=True, exist_ok=True)
    target = session_dir / RUN_RECORD
    staging = session_dir / f".{RUN_RECORD}.{uuid.uuid4().hex[:8]}"
    _write_json(staging, {"format": RUN_FORMAT, **asdict(record)})
    os.replace(staging, target)


def read_run_record(session_dir: Path) -> RunRecord | None:
    """The session's run record, or ``None`` when it has none (sessions older than the record)."""
    path = session_dir / RUN_RECORD
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable run record {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != RUN_FORMAT:
        raise CheckpointError(f"{path} is not a Kitchen run record (format {RUN_FORMAT!r})")
    return RunRecord(
        training_run_id=str(payload["training_run_id"]),
        base_model=str(payload["base_model"]),
        lora_rank=int(payload["lora_rank"]),
        user_metadata={str(k): str(v) for k, v in (payload.get("user_metadata") or {}).items()},
    )
