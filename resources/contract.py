"""The training-client contract every backend honours.

It is the surface of the ``tinker`` SDK's ``ServiceClient`` / ``TrainingClient`` / ``SamplingClient``,
taking and returning ``tinker.types``. Workflow code is written once against these protocols, so the
local PyTorch engine and the Tinker service are interchangeable (a real ``tinker.ServiceClient``
satisfies them structurally).

Every call that does work returns a future immediately; ``.result()`` waits. Submitting several calls
before awaiting the first is how the training loop pipelines requests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from tinker import types

T_co = TypeVar("T_co", covariant=True)

LOSS_FNS_SUPPORTED_LOCALLY: tuple[str, ...] = ("cross_entropy",)


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

    def optim_step(
        self, optim_params: types.AdamParams | None = None, *, adam_params: types.AdamParams | None = None
    ) -> ResultFuture[types.OptimStepResponse]: ...

    def save_state(self, name: str) -> ResultFuture[types.SaveWeightsResponse]: ...

    def load_state(self, path: str) -> ResultFuture[types.LoadWeightsResponse]: ...

    def load_state_with_optimizer(self, path: str) -> ResultFuture[types.LoadWeightsResponse]: ...

    def save_weights_for_sampler(self, name: str) -> ResultFuture[types.SaveWeightsForSamplerResponse]: ...

    def create_sampling_client(self, model_path: str) -> SamplingClient: ...

    def get_tokenizer(self) -> Any: ...


@runtime_checkable
class ServiceClient(Protocol):
    """Entry point: makes training and sampling clients."""

    def create_lora_training_client(
        self, base_model: str, rank: int = 32, seed: int | None = None
    ) -> TrainingClient: ...

    def create_training_client_from_state_with_optimizer(self, path: str) -> TrainingClient: ...

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None
    ) -> SamplingClient: ...


def datum_tokens(datum: types.Datum) -> list[int]:
    """The input token ids of a datum (text chunks only)."""
    return list(datum.model_input.to_ints())


def datum_array(datum: types.Datum, key: str) -> Sequence[Any]:
    """A ``loss_fn_inputs`` entry as a plain list."""
    return list(datum.loss_fn_inputs[key].tolist())
