"""``LocalTrainingClient``: Tinker's ``TrainingClient`` as a PEFT LoRA session in this process.

Every call is validated where it is made (bad input raises at once) and then queued on the client's
single worker thread, which runs the work in submission order and resolves the returned future.
That is what lets the training loop pipeline: it submits ``forward_backward`` and ``optim_step``
for the next batch before awaiting the current one, exactly as it does against the Tinker service.
``forward_backward_custom`` and ``save_weights_and_get_sampling_client`` are queued the same way, so a
snapshot taken after step N's ``optim_step`` holds the weights after step N.

Methods take the tinker SDK's keywords too (``ttl_seconds``, ``user_metadata``, ``record_stability_info``,
``retry_config``, ...), and every future is an ``EngineFuture``: awaitable, like the SDK's, as well as a
``concurrent.futures.Future``, so programs written for the SDK run on this client unchanged.
"""

from __future__ import annotations

import functools
import math
import secrets
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tinker import types

from kitchen.contract import CustomLossFn
from resources.futures import EngineFuture, run_now, submit
from resources.local_engine.checkpoints import (
    CheckpointError,
    RunRecord,
    SamplerInfo,
    StateInfo,
    read_state_info,
    read_training_state,
    write_run_record,
    write_sampler,
    write_training_state,
)
from resources.local_engine.losses import Config, LossConfig, LossFn, combine_metrics, get_loss_fn
from resources.local_engine.overlay import lora_sum, snapshot_peft
from resources.local_engine.runtime import (
    EngineRuntime,
    base_model_view,
    check_model_dir,
    load_tokenizer,
    shared_base_model,
    vocab_size,
)
from resources.local_engine.sampling import LocalSamplingClient, open_sampling_client
from resources.local_engine.scoring import target_logprobs, token_budget_chunks
from resources.local_engine.stability import SequenceRecord, recorded_sampling_logprobs
from resources.local_engine.uris import check_checkpoint_name, path_from_uri, uri_for_path

LORA_ALPHA = 32
#: The shortest checkpoint TTL the service accepts (one hour).
MIN_TTL_SECONDS = 3600


@dataclass(frozen=True)
class LoraTargets:
    """Which layers get LoRA: the SDK's ``train_attn`` / ``train_mlp`` / ``train_unembed``.

    The engine's default adapts every linear layer but the unembedding (what Kitchen's workflows were
    tuned with); the SDK's own default, which the drop-in ``ServiceClient`` uses, adds the unembedding.
    """

    attn: bool = True
    mlp: bool = True
    unembed: bool = False

    def __post_init__(self) -> None:
        if not (self.attn or self.mlp or self.unembed):
            raise ValueError(
                "train_attn, train_mlp and train_unembed are all False: nothing would be trained"
            )


@dataclass(frozen=True)
class PreparedDatum:
    """A validated datum: input tokens and its per-token loss inputs as CPU tensors."""

    tokens: list[int]
    inputs: dict[str, torch.Tensor]


def prepare_datums(
    data: Sequence[types.Datum], loss: LossFn, vocab: int, recorded: SequenceRecord | None = None
) -> list[PreparedDatum]:
    """Check every datum against what ``loss`` needs; errors name the datum index. A loss that needs
    provenance reads the sampler's logprobs from ``recorded`` (what samplers recorded at sampling time)."""
    if not data:
        raise ValueError("no data: forward/forward_backward needs at least one datum")
    prepared = []
    for index, datum in enumerate(data):
        where = f"datum {index}"
        try:
            tokens = [int(t) for t in datum.model_input.to_ints()]
        except ValueError as exc:
            raise ValueError(f"{where}: model_input must be token chunks only: {exc}") from exc
        if not tokens:
            raise ValueError(f"{where}: model_input is empty")
        given = set(datum.loss_fn_inputs)
        missing = [key for key in loss.inputs if key not in given]
        unexpected = sorted(given - set(loss.inputs))
        if missing or unexpected:
            raise ValueError(
                f"{where}: loss {loss.name!r} takes loss_fn_inputs {list(loss.inputs)}; "
                f"missing {missing}, unexpected {unexpected}"
            )
        inputs: dict[str, torch.Tensor] = {}
        for key in loss.inputs:
            tensor = datum.loss_fn_inputs[key].to_torch()
            if tensor.ndim != 1 or tensor.shape[0] != len(tokens):
                raise ValueError(
                    f"{where}: {key} has shape {list(tensor.shape)} but model_input has "
                    f"{len(tokens)} tokens; per-token inputs need exactly one entry per input token"
                )
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{where}: {key} contains non-finite values")
            inputs[key] = tensor
        targets = inputs["target_tokens"]
        if targets.is_floating_point():
            raise ValueError(f"{where}: target_tokens must be integers, got {targets.dtype}")
        for name, ids in (("model_input", torch.as_tensor(tokens)), ("target_tokens", targets)):
            if int(ids.min()) < 0 or int(ids.max()) >= vocab:
                raise ValueError(f"{where}: {name} has token ids outside the vocabulary [0, {vocab})")
        if loss.check_inputs is not None and (problem := loss.check_inputs(inputs)) is not None:
            raise ValueError(f"{where}: {problem}")
        if loss.needs_provenance:
            if recorded is None:
                raise ValueError(f"loss {loss.name!r} needs the sequences its samplers recorded")
            inputs["logprobs"] = recorded_sampling_logprobs(
                where, datum, targets, inputs["logprobs"], recorded
            )
        prepared.append(PreparedDatum(tokens=tokens, inputs=inputs))
    return prepared


class LocalTrainingClient:
    """One LoRA training session on one base model."""

    def __init__(
        self,
        runtime: EngineRuntime,
        base_model: Path,
        rank: int,
        seed: int | None,
        targets: LoraTargets | None = None,
        user_metadata: Mapping[str, str] | None = None,
    ) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
        self.base_model = base_model
        self.rank = rank
        self.targets = targets or LoraTargets()
        self.user_metadata = dict(user_metadata or {})
        """The run's ``user_metadata`` (the SDK's), answered by the REST client for its checkpoints."""
        self.seed = seed if seed is not None else secrets.randbits(63)
        """Recorded in every checkpoint, so an unseeded session can still be replayed."""
        self.session_id = uuid.uuid4().hex
        self._runtime = runtime
        self._model = _lora_model(base_model, rank, self.seed, runtime, self.targets)
        self._params = [(name, p) for name, p in self._model.named_parameters() if p.requires_grad]
        # Hyperparameters are set from each optim_step's AdamParams; these are placeholders.
        # foreach: each of AdamW's dozen operations runs once over all ~400 LoRA tensors instead of once per
        # tensor, bit for bit the result of the per-tensor loop (fused=True would round differently).
        self._optimizer = torch.optim.AdamW(
            [p for _, p in self._params], lr=0.0, weight_decay=0.0, foreach=True
        )
        self._generator = torch.Generator().manual_seed(self.seed)
        """Handed to loss functions for any randomness they need; saved and restored with the state."""
        self._step = 0
        self._vocab = vocab_size(self._model)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kitchen-train")

    @classmethod
    def from_state(
        cls,
        runtime: EngineRuntime,
        uri: str,
        *,
        with_optimizer: bool,
        user_metadata: Mapping[str, str] | None = None,
    ) -> LocalTrainingClient:
        """A new session holding a ``save_state`` checkpoint: its weights, and with ``with_optimizer`` its
        AdamW moments, step counter and RNG state too (training then resumes bit for bit)."""
        directory = path_from_uri(uri)
        info = read_state_info(directory)
        targets = LoraTargets(attn=info.train_attn, mlp=info.train_mlp, unembed=info.train_unembed)
        client = cls(runtime, check_model_dir(info.base_model), info.rank, info.seed, targets, user_metadata)
        client._load(directory, with_optimizer)
        return client

    @property
    def session_dir(self) -> Path:
        return self._runtime.root / self.session_id

    # -- contract ----------------------------------------------------------------------------------

    def forward(
        self, data: list[types.Datum], loss_fn: str, loss_fn_config: Mapping[str, float | str] | None = None
    ) -> EngineFuture[types.ForwardBackwardOutput]:
        loss, config, datums = self._prepare(data, loss_fn, loss_fn_config)
        return submit(self._executor, self._run_loss, loss, config, datums, False)

    def forward_backward(
        self, data: list[types.Datum], loss_fn: str, loss_fn_config: Mapping[str, float | str] | None = None
    ) -> EngineFuture[types.ForwardBackwardOutput]:
        """Accumulates gradients of the summed loss until the next ``optim_step``."""
        loss, config, datums = self._prepare(data, loss_fn, loss_fn_config)
        return submit(self._executor, self._run_loss, loss, config, datums, True)

    def optim_step(
        self, optim_params: types.AdamParams | None = None, *, adam_params: types.AdamParams | None = None
    ) -> EngineFuture[types.OptimStepResponse]:
        if optim_params is not None and adam_params is not None:
            raise ValueError("pass optim_params or adam_params, not both")
        params = optim_params if optim_params is not None else adam_params
        if not isinstance(params, types.AdamParams):
            raise TypeError(
                f"the local engine's optimizer is AdamW and needs AdamParams, got {type(params).__name__}"
            )
        _check_adam(params)
        return submit(self._executor, self._optim_step, params)

    def save_state(
        self,
        name: str,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: Mapping[str, str] | None = None,
    ) -> EngineFuture[types.SaveWeightsResponse]:
        """Weights, optimizer, step and RNG state under ``name``. ``ttl_seconds`` is checked as the service
        checks it and otherwise ignored (local checkpoints stay until deleted); a save replaces an
        existing checkpoint of the same name atomically, ``overwrite`` or not."""
        check_checkpoint_name(name)
        _check_ttl(ttl_seconds)
        return submit(self._executor, self._save_state, name)

    def save_weights_for_sampler(
        self, name: str, ttl_seconds: int | None = None, user_metadata: Mapping[str, str] | None = None
    ) -> EngineFuture[types.SaveWeightsForSamplerResponse]:
        check_checkpoint_name(name)
        _check_ttl(ttl_seconds)
        return submit(self._executor, self._save_sampler, name)

    def forward_backward_custom(
        self, data: list[types.Datum], loss_fn: CustomLossFn, *, loss_type_input: str | None = None
    ) -> EngineFuture[types.ForwardBackwardOutput]:
        """The SDK's semantics: a ``cross_entropy`` forward gives each datum's logprobs, ``loss_fn`` sees
        them as tensors that require grad (with the datums as given), and a ``cross_entropy`` backward with
        ``weights = -dL/dlogprobs`` puts ``dL/dparams`` into the accumulated gradients. Datums need only
        ``target_tokens``; ``weights`` default to zeros, any other inputs are for ``loss_fn`` alone."""
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (data, logprobs) -> (loss, metrics), got {loss_fn!r}")
        if loss_type_input not in (None, "logprobs"):
            raise ValueError(f"loss_type_input must be 'logprobs' or None, got {loss_type_input!r}")
        datums = prepare_datums(_custom_loss_forward_data(data), _CROSS_ENTROPY, self._vocab)
        return submit(self._executor, self._run_custom, list(data), loss_fn, datums)

    def save_weights_and_get_sampling_client(
        self,
        name: str | None = None,
        retry_config: Any = None,
        record_stability_info: bool = False,
        kind: str = "snapshot",
    ) -> EngineFuture[LocalSamplingClient]:
        """A sampler on a copy of the LoRA weights as of this call's turn in the queue, over the shared base
        model: nothing is written and the base is not copied, so it is cheap enough for every RL step.
        ``name`` only labels the client (on Tinker the argument is deprecated and has no effect);
        ``retry_config`` is accepted and unused (nothing here fails transiently)."""
        if name is not None:
            check_checkpoint_name(name)
        if kind != "snapshot":
            raise ValueError(
                f"sampling client kind {kind!r} is not supported by the local engine; use 'snapshot'"
            )
        return submit(self._executor, self._snapshot_sampler, name, bool(record_stability_info))

    def create_sampling_client(
        self, model_path: str, retry_config: Any = None, record_stability_info: bool = False
    ) -> EngineFuture[LocalSamplingClient]:
        return run_now(
            lambda: open_sampling_client(
                self._runtime, model_path=model_path, record_stability_info=record_stability_info
            )
        )

    def get_tokenizer(self) -> Any:
        return load_tokenizer(self.base_model)

    def get_info(self) -> types.GetInfoResponse:
        """The SDK's model info: the base model's directory is its name and its tokenizer id."""
        from tinker.types import ModelData

        return types.GetInfoResponse(
            model_data=ModelData(
                arch=type(self._model.get_base_model()).__name__,
                model_name=str(self.base_model),
                tokenizer_id=str(self.base_model),
            ),
            model_id=self.session_id,
            is_lora=True,
            lora_rank=self.rank,
            model_name=str(self.base_model),
        )

    # -- the SDK's deprecated async variants (still used by its tutorials) --------------------------------

    async def forward_async(
        self, data: list[types.Datum], loss_fn: str, loss_fn_config: Mapping[str, float | str] | None = None
    ) -> EngineFuture[types.ForwardBackwardOutput]:
        return self.forward(data, loss_fn, loss_fn_config)

    async def forward_backward_async(
        self, data: list[types.Datum], loss_fn: str, loss_fn_config: Mapping[str, float | str] | None = None
    ) -> EngineFuture[types.ForwardBackwardOutput]:
        return self.forward_backward(data, loss_fn, loss_fn_config)

    async def forward_backward_custom_async(
        self, data: list[types.Datum], loss_fn: CustomLossFn
    ) -> EngineFuture[types.ForwardBackwardOutput]:
        return self.forward_backward_custom(data, loss_fn)

    async def optim_step_async(
        self, optim_params: types.AdamParams | None = None, *, adam_params: types.AdamParams | None = None
    ) -> EngineFuture[types.OptimStepResponse]:
        return self.optim_step(optim_params, adam_params=adam_params)

    async def save_state_async(
        self, name: str, ttl_seconds: int | None = None
    ) -> EngineFuture[types.SaveWeightsResponse]:
        return self.save_state(name, ttl_seconds)

    async def save_weights_for_sampler_async(
        self, name: str, ttl_seconds: int | None = None
    ) -> EngineFuture[types.SaveWeightsForSamplerResponse]:
        return self.save_weights_for_sampler(name, ttl_seconds)

    async def save_weights_and_get_sampling_client_async(
        self, name: str | None = None, retry_config: Any = None, record_stability_info: bool = False
    ) -> LocalSamplingClient:
        return await self.save_weights_and_get_sampling_client(
            name, record_stability_info=record_stability_info
        )

    async def create_sampling_client_async(
        self, model_path: str, retry_config: Any = None, record_stability_info: bool = False
    ) -> LocalSamplingClient:
        return await self.create_sampling_client(model_path, record_stability_info=record_stability_info)

    # -- worker side -------------------------------------------------------------------------------

    def _prepare(
        self, data: Sequence[types.Datum], loss_fn: str, loss_fn_config: LossConfig | None
    ) -> tuple[LossFn, Config, list[PreparedDatum]]:
        loss = get_loss_fn(loss_fn)
        config = loss.check_config(loss_fn_config)
        return loss, config, prepare_datums(data, loss, self._vocab, self._runtime.recorded)

    def _run_loss(
        self, loss: LossFn, config: Config, datums: list[PreparedDatum], backward: bool
    ) -> types.ForwardBackwardOutput:
        """Micro-batches under the token budget; the loss is a sum, so their gradients just add."""
        device = self._runtime.device
        outputs: list[dict[str, torch.Tensor]] = []
        metrics: list[dict[str, float]] = []
        for chunk in token_budget_chunks([len(d.tokens) for d in datums], self._runtime.max_batch_tokens):
            part = [datums[i] for i in chunk]
            grad_positions = [loss.grad_positions(d.inputs) for d in part]
            # Queued ahead of the forward: a copy to the device from the host is asynchronous then, where
            # one queued after it would wait for the forward to finish.
            inputs = [
                {key: value.to(device, non_blocking=True) for key, value in d.inputs.items()} for d in part
            ]
            with torch.set_grad_enabled(backward):
                logprobs = target_logprobs(
                    self._model,
                    [d.tokens for d in part],
                    [d.inputs["target_tokens"] for d in part],
                    device,
                    None if any(g is None for g in grad_positions) else grad_positions,  # type: ignore[arg-type]
                )
                result = loss.compute(logprobs, inputs, config, self._generator)
                if backward:
                    result.loss.backward()
            outputs.extend(result.outputs)
            metrics.append({key: float(value) for key, value in result.metrics.items()})
        return types.ForwardBackwardOutput(
            loss_fn_output_type="ArrayRecord",
            loss_fn_outputs=[
                {key: types.TensorData.from_torch(value.detach().cpu()) for key, value in out.items()}
                for out in outputs
            ],
            metrics=combine_metrics(metrics),
        )

    def _run_custom(
        self, data: list[types.Datum], loss_fn: CustomLossFn, datums: list[PreparedDatum]
    ) -> types.ForwardBackwardOutput:
        forward = self._run_loss(_CROSS_ENTROPY, {}, datums, backward=False)
        logprobs = [o["logprobs"].to_torch().clone().requires_grad_(True) for o in forward.loss_fn_outputs]
        loss, user_metrics = loss_fn(data, logprobs)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise ValueError(
                "forward_backward_custom: loss_fn must return a scalar tensor computed from the logprobs, "
                f"got {type(loss).__name__}"
                + (f" of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
            )
        loss.backward()
        weighted = []
        for index, (datum, lp) in enumerate(zip(datums, logprobs, strict=True)):
            if lp.grad is None or not bool(torch.isfinite(lp.grad).all()):
                problem = "no gradient" if lp.grad is None else "a non-finite gradient"
                raise ValueError(f"forward_backward_custom: the loss gave datum {index}'s logprobs {problem}")
            inputs = {"target_tokens": datum.inputs["target_tokens"], "weights": -lp.grad}
            weighted.append(PreparedDatum(tokens=datum.tokens, inputs=inputs))
        output = self._run_loss(_CROSS_ENTROPY, {}, weighted, backward=True)
        surrogate = output.metrics.pop("loss:sum")
        output.metrics.update({key: float(value) for key, value in user_metrics.items()})
        output.metrics["loss:sum"] = float(loss.detach())
        output.metrics["surrogate_loss:sum"] = surrogate
        return output

    def _snapshot_sampler(self, name: str | None, record_stability_info: bool = False) -> LocalSamplingClient:
        overlay = snapshot_peft(self._model)
        base = shared_base_model(self.base_model, self._runtime.device, self._runtime.dtype)
        label = f"{self.session_id}/snapshot/{name or f'step-{self._step}'}"
        return LocalSamplingClient(
            base,
            self.get_tokenizer(),
            self._runtime,
            label=label,
            overlay=overlay,
            base_model=str(self.base_model),
            record_stability_info=record_stability_info,
        )

    def _optim_step(self, adam: types.AdamParams) -> types.OptimStepResponse:
        params = [p for _, p in self._params]
        grads = [p.grad for p in params if p.grad is not None]
        if adam.grad_clip_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, adam.grad_clip_norm)
        elif grads:
            norm = torch.nn.utils.get_total_norm(grads)
        else:
            norm = torch.zeros(())
        for group in self._optimizer.param_groups:
            group["lr"] = adam.learning_rate
            group["betas"] = (adam.beta1, adam.beta2)
            group["eps"] = adam.eps
            group["weight_decay"] = adam.weight_decay
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        self._step += 1
        return types.OptimStepResponse(metrics={"grad_norm": float(norm)})

    @property
    def peft_model(self) -> Any:
        """The PEFT model (for importing adapter weights before any step; not for use mid-training)."""
        return self._model

    def save_state_to(self, target: Path) -> None:
        """Write this session's state to ``target`` (synchronously, on the caller's thread)."""
        self._executor.submit(self._write_state, target).result()

    def _save_state(self, name: str) -> types.SaveWeightsResponse:
        target = self.session_dir / "state" / name
        self._write_state(target)
        self._record_run()
        return types.SaveWeightsResponse(path=uri_for_path(target))

    def _record_run(self) -> None:
        """The session's run record (what ``RestClient.get_training_run`` answers), beside its checkpoints."""
        write_run_record(
            self.session_dir,
            RunRecord(
                training_run_id=self.session_id,
                base_model=str(self.base_model),
                lora_rank=self.rank,
                user_metadata=self.user_metadata,
            ),
        )

    def _write_state(self, target: Path) -> None:
        write_training_state(
            target,
            StateInfo(
                base_model=str(self.base_model),
                rank=self.rank,
                lora_alpha=LORA_ALPHA,
                seed=self.seed,
                step=self._step,
                session_id=self.session_id,
                train_attn=self.targets.attn,
                train_mlp=self.targets.mlp,
                train_unembed=self.targets.unembed,
            ),
            adapter={n: p.detach().cpu().contiguous() for n, p in self._params},
            optimizer=self._optimizer.state_dict(),
            rng={"generator": self._generator.get_state()},
        )

    def _load(self, directory: Path, with_optimizer: bool) -> None:
        """Before the client is handed out (``from_state``), so nothing is queued yet."""
        state = read_training_state(directory, with_optimizer=with_optimizer)
        names = [name for name, _ in self._params]
        if sorted(state.adapter) != sorted(names):
            raise CheckpointError(
                f"checkpoint {directory}: adapter tensors do not match this model's LoRA layers"
            )
        with torch.no_grad():
            for name, param in self._params:
                param.copy_(state.adapter[name])
        if with_optimizer:
            assert state.optimizer is not None and state.rng is not None
            self._optimizer.load_state_dict(state.optimizer)
            self._generator.set_state(state.rng["generator"])
            self._step = state.info.step

    def _save_sampler(self, name: str) -> types.SaveWeightsForSamplerResponse:
        target = self.session_dir / "sampler" / name
        info = SamplerInfo(
            base_model=str(self.base_model), rank=self.rank, step=self._step, session_id=self.session_id
        )
        # The LoRA weights only: with an adapted unembedding PEFT would also save the (frozen, tied) base
        # embedding, which samplers take from the base model.
        write_sampler(
            target,
            info,
            lambda directory: self._model.save_pretrained(str(directory), save_embedding_layers=False),
        )
        self._record_run()
        return types.SaveWeightsForSamplerResponse(path=uri_for_path(target))


_CROSS_ENTROPY = get_loss_fn("cross_entropy")


def _custom_loss_forward_data(data: Sequence[types.Datum]) -> list[types.Datum]:
    """What the SDK sends for a custom loss's forward: ``target_tokens`` and ``weights`` (zeros if absent)."""
    forward = []
    for index, datum in enumerate(data):
        targets = datum.loss_fn_inputs.get("target_tokens")
        if targets is None:
            raise ValueError(f"datum {index}: forward_backward_custom needs loss_fn_inputs['target_tokens']")
        weights = datum.loss_fn_inputs.get("weights")
        if weights is None:
            weights = types.TensorData.from_torch(torch.zeros(targets.to_torch().shape, dtype=torch.float32))
        forward.append(
            types.Datum(
                model_input=datum.model_input, loss_fn_inputs={"target_tokens": targets, "weights": weights}
            )
        )
    return forward


def _check_ttl(ttl_seconds: int | None) -> None:
    if ttl_seconds is None:
        return
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds < MIN_TTL_SECONDS:
        raise ValueError(
            f"ttl_seconds must be None or an integer >= {MIN_TTL_SECONDS} (one hour), got {ttl_seconds!r}"
        )


def _check_adam(adam: types.AdamParams) -> None:
    checks = {
        "learning_rate": adam.learning_rate >= 0,
        "beta1": 0 <= adam.beta1 < 1,
        "beta2": 0 <= adam.beta2 < 1,
        "eps": adam.eps >= 0,
        "weight_decay": adam.weight_decay >= 0,
        "grad_clip_norm": adam.grad_clip_norm >= 0,
    }
    for field, ok in checks.items():
        value = getattr(adam, field)
        if not ok or not math.isfinite(value):
            raise ValueError(f"AdamParams.{field}={value} is out of range")


def _lora_model(base_model: Path, rank: int, seed: int, runtime: EngineRuntime, targets: LoraTargets) -> Any:
    """The base model with LoRA on the linear layers ``targets`` selects, initialised on the CPU under
    ``seed`` (so the init does not depend on the device), on the engine's device. The base weights are
    the process's shared, frozen ones (``base_model_view``): training adds only the adapter and its
    optimizer state to memory."""
    from peft import LoraConfig, get_peft_model

    model = base_model_view(base_model, runtime.device, runtime.dtype)
    config = LoraConfig(
        r=rank,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=_target_modules(model, targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    _fuse_lora_layers(peft_model)
    peft_model.to(runtime.device)
    peft_model.train()
    return peft_model


def _fuse_lora_layers(peft_model: Any) -> None:
    """Run each plain LoRA ``Linear`` through ``lora_sum`` (same values and gradients as PEFT's forward,
    two fewer passes over every adapted layer's output). Anything else PEFT does (adapters disabled or
    merged, several adapters, dropout, a dtype cast) goes through PEFT's own forward."""
    from peft.tuners.lora import Linear as LoraLinear

    for module in peft_model.modules():
        if type(module) is LoraLinear:
            module.forward = functools.partial(_fused_lora_forward, module)  # type: ignore[method-assign]


def _fused_lora_forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    adapters = layer.active_adapters
    if args or kwargs or layer.disable_adapters or layer.merged or len(adapters) != 1 or layer.lora_variant:
        return type(layer).forward(layer, x, *args, **kwargs)
    name = adapters[0]
    if name not in layer.lora_A or name not in layer.lora_B:
        return type(layer).forward(layer, x, *args, **kwargs)
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    plain = (
        lora_a.bias is None
        and lora_b.bias is None
        and isinstance(layer.lora_dropout[name], torch.nn.Identity)
        and x.dtype == lora_a.weight.dtype
    )
    if not plain:
        return type(layer).forward(layer, x, *args, **kwargs)
    output = layer.base_layer(x)
    if output.dtype != x.dtype:
        return type(layer).forward(layer, x, *args, **kwargs)
    return lora_sum(output, x, lora_a.weight, lora_b.weight, layer.scaling[name])


_ATTENTION_PARTS = ("attn", "attention")
_MLP_PARTS = ("mlp", "feed_forward", "ffn")


def _target_modules(model: Any, targets: LoraTargets) -> str | list[str]:
    """PEFT's ``target_modules``: ``"all-linear"`` (every linear layer but the unembedding) for the default,
    else the names of the attention, MLP and unembedding layers asked for, told apart by the module path
    (``...self_attn.q_proj`` vs ``...mlp.up_proj``) as in every Hugging Face decoder."""
    if targets == LoraTargets():
        return "all-linear"
    output = model.get_output_embeddings()
    names: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        parts = name.lower().split(".")
        if module is output:
            chosen = targets.unembed
        elif any(key in part for part in parts for key in _ATTENTION_PARTS):
            chosen = targets.attn
        elif any(key in part for part in parts for key in _MLP_PARTS):
            chosen = targets.mlp
        else:
            raise ValueError(
                f"cannot tell whether layer {name!r} is attention or MLP; train_attn/train_mlp need "
                "both set for this model"
            )
        if chosen:
            names.append(name)
    if not names:
        raise ValueError(f"the model has no linear layers matching {targets}")
    return names
