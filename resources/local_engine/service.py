"""``LocalServiceClient``: the entry point, standing in for ``tinker.ServiceClient``.

Its creation calls take the SDK's keywords (``train_mlp``/``train_attn``/``train_unembed``,
``user_metadata``, ``record_stability_info``, ...). The SDK's constructor, context-manager use, ``close``
future and REST client are the drop-in's (``resources.local_engine.dropin``), which wraps this class.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kitchen.hashing import hash_file
from kitchen.home import home_dir
from kitchen.memory import release_freed_memory
from resources.futures import EngineFuture, run_now
from resources.local_engine.checkpoints import PEFT_WEIGHTS_FILE, STATE_MANIFEST, read_sampler
from resources.local_engine.runtime import EngineRuntime, check_model_dir, resolve_device, resolve_dtype
from resources.local_engine.sampling import LocalSamplingClient, open_sampling_client
from resources.local_engine.training import LocalTrainingClient, LoraTargets
from resources.local_engine.uris import path_from_uri, uri_for_path


class LocalServiceClient:
    """Makes training and sampling clients that run in this process with PyTorch and PEFT.

    A base model is named by the path of a local Hugging Face model directory. Checkpoints go under
    ``root`` (default ``KITCHEN_HOME/engine``) and are addressed by ``file://`` URIs.
    ``max_batch_tokens`` bounds the padded tokens of one forward pass (training micro-batches and
    prompt scoring), which bounds the memory the logits take.
    """

    def __init__(
        self,
        root: Path | None = None,
        device: str = "auto",
        dtype: str = "auto",
        num_threads: int | None = None,
        max_sampling_batch: int = 32,
        max_batch_tokens: int = 8192,
    ) -> None:
        if num_threads is not None:
            if num_threads < 1:
                raise ValueError(f"num_threads must be >= 1, got {num_threads}")
            torch.set_num_threads(num_threads)
        if max_sampling_batch < 1:
            raise ValueError(f"max_sampling_batch must be >= 1, got {max_sampling_batch}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        resolved_root = Path(root).expanduser().resolve() if root is not None else home_dir("engine")
        resolved_root.mkdir(parents=True, exist_ok=True)
        resolved_device = resolve_device(device)
        self.runtime = EngineRuntime(
            root=resolved_root,
            device=resolved_device,
            dtype=resolve_dtype(dtype, resolved_device),
            max_sampling_batch=max_sampling_batch,
            max_batch_tokens=max_batch_tokens,
        )

    @property
    def root(self) -> Path:
        return self.runtime.root

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = False,
        user_metadata: Mapping[str, str] | None = None,
        optimizer: Any = None,
    ) -> EngineFuture[LocalTrainingClient]:
        """LoRA on the attention and MLP layers by default; ``train_unembed=True`` adds the unembedding
        (the SDK's default, which the drop-in ``ServiceClient`` keeps). The optimizer is AdamW."""

        def create() -> LocalTrainingClient:
            _check_optimizer(optimizer)
            targets = LoraTargets(attn=train_attn, mlp=train_mlp, unembed=train_unembed)
            return LocalTrainingClient(
                self.runtime, check_model_dir(base_model), rank, seed, targets, user_metadata
            )

        return run_now(create)

    def create_training_client_from_state(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: Mapping[str, str] | None = None,
        weights_access_token: str | None = None,
        optimizer: Any = None,
    ) -> EngineFuture[LocalTrainingClient]:
        """A new session holding a checkpoint's weights, with a fresh optimizer."""

        def create() -> LocalTrainingClient:
            _check_optimizer(optimizer)
            return self._from_state(path, base_model, user_metadata, with_optimizer=False)

        return run_now(create)

    def create_training_client_from_state_with_optimizer(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: Mapping[str, str] | None = None,
        weights_access_token: str | None = None,
    ) -> EngineFuture[LocalTrainingClient]:
        """A new session resuming a checkpoint exactly: weights, optimizer, step and RNG state."""
        return run_now(lambda: self._from_state(path, base_model, user_metadata, with_optimizer=True))

    def create_sampling_client(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: Any = None,
        record_stability_info: bool = False,
    ) -> EngineFuture[LocalSamplingClient]:
        return run_now(
            lambda: open_sampling_client(
                self.runtime,
                model_path=model_path,
                base_model=base_model,
                record_stability_info=record_stability_info,
            )
        )

    def _from_state(
        self,
        path: str,
        base_model: str | None,
        user_metadata: Mapping[str, str] | None,
        *,
        with_optimizer: bool,
    ) -> LocalTrainingClient:
        client = LocalTrainingClient.from_state(
            self.runtime, path, with_optimizer=with_optimizer, user_metadata=user_metadata
        )
        if base_model is not None and check_model_dir(base_model) != client.base_model:
            raise ValueError(f"checkpoint {path} was trained on {client.base_model}, not {base_model}")
        return client

    def close(self, status: str = "success", detail: str | None = None) -> None:
        """Clients free their threads and tensors when garbage-collected; what they freed is handed back to
        the operating system here (``kitchen.memory.release_freed_memory``), so the evaluation that
        follows a training run does not start from training's high-water mark."""
        release_freed_memory()

    def import_adapter(self, sampler_path: str) -> str:
        """A weights-only training state holding a saved adapter, so training can start from it (a
        registered model trained elsewhere). Not part of the contract: on Tinker the registered version's
        own state path serves. Idempotent per adapter content."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        directory = path_from_uri(sampler_path)
        info = read_sampler(directory)
        content = hash_file(directory / PEFT_WEIGHTS_FILE)
        target = self.root / "imports" / content[:16] / "state" / "start"
        if (target / STATE_MANIFEST).is_file():
            return uri_for_path(target)
        client = LocalTrainingClient(self.runtime, check_model_dir(info.base_model), info.rank, seed=0)
        set_peft_model_state_dict(client.peft_model, load_file(str(directory / PEFT_WEIGHTS_FILE)))
        client.save_state_to(target)
        return uri_for_path(target)


def _check_optimizer(optimizer: Any) -> None:
    """The SDK's ``optimizer`` (an ``OptimizerConfig``): the local engine's is AdamW, so only that."""
    if optimizer is not None and getattr(optimizer, "type", None) != "adamw":
        raise ValueError(f"the local engine's optimizer is AdamW; got optimizer config {optimizer!r}")
