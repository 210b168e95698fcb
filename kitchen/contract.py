"""The training-client contract: the port every training backend implements.

It is the surface of the ``tinker`` SDK (0.38) that Kitchen's workflows use: ``ServiceClient`` /
``TrainingClient`` / ``SamplingClient``, taking and returning ``tinker.types``. Workflow code is written
once against these protocols; the local PyTorch engine (``resources.local_engine``) and the Tinker service
(``resources.tinker_backend``) implement them, and one test suite (``tests/test_contract.py``) holds every
implementation to it.

As in the SDK, every call that does work returns a future at once, creation calls included
(``create_lora_training_client(...).result()``); ``.result()`` waits. Requests on one training client run
in submission order, so submitting several calls before awaiting the first is how the training loop
pipelines, and a ``save_weights_and_get_sampling_client`` submitted after step N's ``optim_step`` samples
from the weights after step N.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, runtime_checkable

from tinker import types

if TYPE_CHECKING:
    import torch

T_co = TypeVar("T_co", covariant=True)

#: Tinker's built-in losses (``tinker.types.LossFnType``); all are per-token and sum-reduced.
BUILTIN_LOSSES: tuple[str, ...] = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro")

#: ``forward_backward_custom``'s loss: per-datum logprob tensors (``requires_grad``) in, a scalar loss and
#: float metrics out. The SDK's ``CustomLossFnV1``.
CustomLossFn = Callable[[list[types.Datum], list["torch.Tensor"]], tuple["torch.Tensor", dict[str, float]]]

SessionStatus = Literal["success", "errored", "interrupted"]


class BackendUnavailableError(RuntimeError):
    """The backend cannot be used (missing credentials, unreachable service); raised before any work."""


class ResultFuture(Protocol[T_co]):
    """What ``tinker``'s ``APIFuture`` and ``concurrent.futures.Future`` share."""

    def result(self, timeout: float | None = None) -> T_co: ...


@runtime_checkable
class SamplingClient(Protocol):
    """Samples from, and scores with, one fixed set of weights."""

    def sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
    ) -> ResultFuture[types.SampleResponse]: ...

    def compute_logprobs(self, prompt: types.ModelInput) -> ResultFuture[list[float | None]]: ...

    def get_tokenizer(self) -> Any: ...


#: ``sample_streaming``'s listener: (choice index, token id), called once per token as it is generated.
TokenListener = Callable[[int, int], None]


@runtime_checkable
class StreamingSamplingClient(SamplingClient, Protocol):
    """An optional capability beyond Tinker's surface: ``sample`` that also reports each token the moment
    it is generated, for streaming replies (``kitchen serve``). The local engine has it, its generation
    loop being Kitchen's own; Tinker's SDK returns whole sequences only, so its clients do not.

    The future's response is exactly what ``sample`` returns; the listener sees each sequence's tokens
    in order, all before the future resolves, from a worker thread, and must return quickly."""

    def sample_streaming(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        on_token: TokenListener,
    ) -> ResultFuture[types.SampleResponse]: ...


@runtime_checkable
class TrainingClient(Protocol):
    """One LoRA training session on one base model."""

    def forward(
        self,
        data: list[types.Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, float | str] | None = None,
    ) -> ResultFuture[types.ForwardBackwardOutput]: ...

    def forward_backward(
        self,
        data: list[types.Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, float | str] | None = None,
    ) -> ResultFuture[types.ForwardBackwardOutput]: ...

    def forward_backward_custom(
        self, data: list[types.Datum], loss_fn: CustomLossFn
    ) -> ResultFuture[types.ForwardBackwardOutput]:
        """The SDK's semantics: a ``cross_entropy`` forward for logprobs, ``loss_fn`` on them as torch
        tensors, then a weighted backward with ``weights = -dL/dlogprobs``. ``metrics`` carry the custom
        loss's metrics and its value as ``loss:sum``."""
        ...

    def optim_step(
        self, optim_params: types.AdamParams | None = None, *, adam_params: types.AdamParams | None = None
    ) -> ResultFuture[types.OptimStepResponse]: ...

    def save_state(self, name: str) -> ResultFuture[types.SaveWeightsResponse]: ...

    def save_weights_for_sampler(self, name: str) -> ResultFuture[types.SaveWeightsForSamplerResponse]: ...

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> ResultFuture[SamplingClient]:
        """A sampling client on a snapshot of the weights as of this call (after every step submitted
        before it). Cheap enough to call every RL step."""
        ...

    def create_sampling_client(self, model_path: str) -> ResultFuture[SamplingClient]: ...

    def get_tokenizer(self) -> Any: ...


@runtime_checkable
class ServiceClient(Protocol):
    """Entry point: makes training and sampling clients; ``close`` ends the session."""

    def create_lora_training_client(
        self, base_model: str, rank: int = 32, seed: int | None = None
    ) -> ResultFuture[TrainingClient]: ...

    def create_training_client_from_state(self, path: str) -> ResultFuture[TrainingClient]:
        """A new session holding a checkpoint's weights, with a fresh optimizer."""
        ...

    def create_training_client_from_state_with_optimizer(self, path: str) -> ResultFuture[TrainingClient]:
        """A new session resuming a checkpoint exactly: weights and optimizer state."""
        ...

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None
    ) -> ResultFuture[SamplingClient]: ...

    def close(self, status: SessionStatus = "success", detail: str | None = None) -> None:
        """End the session and release its resources (Tinker sessions are billed while open)."""
        ...


def datum_tokens(datum: types.Datum) -> list[int]:
    """The input token ids of a datum (text chunks only)."""
    return list(datum.model_input.to_ints())


def datum_array(datum: types.Datum, key: str) -> Sequence[Any]:
    """A ``loss_fn_inputs`` entry as a plain list."""
    return list(datum.loss_fn_inputs[key].tolist())
