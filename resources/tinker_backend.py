"""``TinkerBackend``: the training contract on the Tinker service, for real-sized models.

The same assets run on it as on the local engine; only the resource bound as ``training`` changes.
Three things keep it from ever hanging or leaking:

- ``preflight()`` checks before any work: no ``TINKER_API_KEY`` fails at once; the service's reachability
  is probed in a daemon thread bounded by ``probe_timeout_s``, because the SDK itself retries
  unreachable hosts for up to two hours. A refused connection or a failed DNS lookup fails at once.
- Every future this backend hands out is awaited with ``request_timeout_s`` as its default bound, and
  once one request of a session has timed out the session counts as dead, so the training loop's
  clean-up does not wait out the bound again for each outstanding request.
- The API key is only ever passed to the SDK: it is a ``dg.EnvVar`` in the resource config (the UI shows
  the variable's name), hidden from the resource's repr, and redacted from any error crossing this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import dagster as dg
from pydantic import Field, PrivateAttr
from tinker import types

from kitchen.contract import CustomLossFn, ResultFuture
from kitchen.hashing import hash_json
from kitchen.manifests import BaseModelManifest
from resources.futures import run_now
from resources.training import BackendUnavailableError, TrainingBackend

API_KEY_ENV = "TINKER_API_KEY"
BASE_URL_ENV = "TINKER_BASE_URL"
PROBE_TIMEOUT_ENV = "KITCHEN_TINKER_PROBE_TIMEOUT_S"
REQUEST_TIMEOUT_ENV = "KITCHEN_TINKER_REQUEST_TIMEOUT_S"
DEFAULT_PROBE_TIMEOUT_S = 20.0
DEFAULT_REQUEST_TIMEOUT_S = 1800.0
# A successful probe is reused this long, so preflight, model resolution and each asset's service client
# cost one round trip per run rather than one each.
_PROBE_CACHE_TTL_S = 300.0
_REDACTED = "tml-***"

T = TypeVar("T")


class TinkerUnavailableError(BackendUnavailableError):
    """Tinker cannot be used from here: no key, a malformed key, or the service did not answer."""


class TinkerRequestTimeout(TimeoutError):
    """A Tinker request did not finish within ``request_timeout_s``; the step is retried from a checkpoint."""


class TinkerRequestError(RuntimeError):
    """An SDK error whose text contained the API key, re-raised with the key redacted."""


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, _REDACTED) if secret else text


def tokenizer_id_for(model_name: str) -> str:
    """The Hugging Face tokenizer id for a Tinker model name, by the tinker SDK's own rule.

    Llama 3 repositories are gated on the Hub, so Thinking Machines publishes their tokenizer ungated; a
    ``org/model/variant`` name uses ``org/model``'s tokenizer.
    """
    name = model_name.split(":")[0]
    if name.startswith("meta-llama/Llama-3"):
        return "thinkingmachineslabinc/meta-llama-3-instruct-tokenizer"
    if name.count("/") == 2:
        org, model, _variant = name.split("/", 2)
        return f"{org}/{model}"
    return name


def _architecture(model_name: str) -> str | None:
    """The model family, from the name: it picks the exponent of the default learning-rate rule."""
    family = model_name.split("/")[-1].lower()
    if family.startswith("llama"):
        return "LlamaForCausalLM"
    if family.startswith("qwen3"):
        return "Qwen3ForCausalLM"
    return None


# -- probing ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OfferedModel:
    name: str
    trainable: bool
    sampleable: bool
    max_context_length: int | None


@dataclass(frozen=True)
class ServiceProbe:
    """What a successful probe learned: the service answers, accepts the key, and offers these models."""

    base_url: str
    models: tuple[OfferedModel, ...]
    seconds: float


_PROBES: dict[tuple[str, str], tuple[float, ServiceProbe]] = {}
_PROBES_LOCK = threading.Lock()


def _resolve_base_url(base_url: str | None) -> str:
    from tinker.lib.base_url import resolve_base_url

    return resolve_base_url(base_url)


def probe_service(api_key: str, base_url: str | None, timeout_s: float) -> ServiceProbe:
    """Ask the service for its models, failing within ``timeout_s`` however the network behaves.

    Two requests race in daemon threads (a stuck SDK retry loop cannot keep the process alive): the SDK's
    ``get_server_capabilities``, which proves the key works and lists the models, and one plain HTTP
    request to the health endpoint, whose connection error (refused, no DNS) ends the wait at once.
    """
    url = _resolve_base_url(base_url)
    cache_key = (url, hashlib.sha256(api_key.encode()).hexdigest())
    with _PROBES_LOCK:
        cached = _PROBES.get(cache_key)
    if cached is not None and time.monotonic() - cached[0] < _PROBE_CACHE_TTL_S:
        return cached[1]

    finished = threading.Event()
    outcome: dict[str, Any] = {}
    started = time.perf_counter()

    def ask_sdk() -> None:
        import tinker
        from tinker.lib.internal_client_holder import InternalClientHolder

        holder = None
        try:
            # A holder of our own: ``RestClient(base_url=..., api_key=...)`` builds its shared one under a
            # process-wide lock, so one probe stuck retrying would block every later probe in the process.
            holder = InternalClientHolder(base_url=url, api_key=api_key, _skip_session=True)
            outcome["capabilities"] = tinker.RestClient(_holder=holder).get_server_capabilities().result()
        except BaseException as err:  # reported to the waiting thread
            outcome["error"] = err
        finally:
            finished.set()
            if holder is not None:
                holder.close()

    def connect_directly() -> None:
        import httpx

        try:
            httpx.get(f"{url}/api/v1/healthz", timeout=timeout_s)
        except httpx.ConnectError as err:
            outcome["connect_error"] = err
            finished.set()
        except Exception:  # only a definite connection failure ends the wait early
            pass

    for target, name in ((ask_sdk, "kitchen-tinker-probe"), (connect_directly, "kitchen-tinker-connect")):
        threading.Thread(target=target, name=name, daemon=True).start()
    finished.wait(timeout_s)
    seconds = time.perf_counter() - started
    hint = f"Check the network and {BASE_URL_ENV}, or train on this machine with --backend local."

    if "capabilities" in outcome:
        probe = ServiceProbe(url, _offered(outcome["capabilities"]), seconds)
        with _PROBES_LOCK:
            _PROBES[cache_key] = (time.monotonic(), probe)
        return probe
    if "error" in outcome:
        err = outcome["error"]
        detail = redact(f"{type(err).__name__}: {err}", api_key)
        raise TinkerUnavailableError(f"the Tinker service at {url} refused the probe ({detail})") from None
    if "connect_error" in outcome:
        detail = redact(str(outcome["connect_error"]), api_key)
        raise TinkerUnavailableError(
            f"cannot connect to the Tinker service at {url} ({detail}) after {seconds:.1f}s. {hint}"
        ) from None
    raise TinkerUnavailableError(
        f"the Tinker service at {url} did not answer within {timeout_s:g}s "
        f"(probe_timeout_s; set {PROBE_TIMEOUT_ENV} to wait longer). {hint}"
    )


def _offered(capabilities: types.GetServerCapabilitiesResponse) -> tuple[OfferedModel, ...]:
    return tuple(
        OfferedModel(
            name=m.model_name,
            trainable=m.trainable is not False,
            sampleable=m.sampleable is not False,
            max_context_length=m.max_context_length,
        )
        for m in capabilities.supported_models
        if m.model_name
    )


def clear_probe_cache() -> None:
    with _PROBES_LOCK:
        _PROBES.clear()


# -- the contract on the SDK -----------------------------------------------------------------------------


class _Session:
    """Shared by every client made from one service client: the bound, the key to redact, and liveness."""

    def __init__(self, request_timeout_s: float, secret: str) -> None:
        self.request_timeout_s = request_timeout_s
        self.secret = secret
        self.dead_reason: str | None = None

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run a blocking SDK call (client creation opens connections and may retry) under the bound."""
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = fn()
            except BaseException as err:  # re-raised in the caller's thread
                box["error"] = err

        thread = threading.Thread(target=run, name=f"kitchen-tinker-{what}", daemon=True)
        thread.start()
        thread.join(self.request_timeout_s)
        if thread.is_alive():
            raise self.timed_out(what)
        if "error" in box:
            raise self.scrub(box["error"])
        return box["value"]

    def timed_out(self, what: str) -> TinkerRequestTimeout:
        self.dead_reason = self.dead_reason or f"{what} timed out"
        return TinkerRequestTimeout(
            f"Tinker {what} did not finish within {self.request_timeout_s:g}s (request_timeout_s, "
            f"{REQUEST_TIMEOUT_ENV}); a retried run resumes from its last checkpoint"
        )

    def scrub(self, err: BaseException) -> BaseException:
        if self.secret and self.secret in str(err):
            return TinkerRequestError(redact(f"{type(err).__name__}: {err}", self.secret))
        return err


class BoundedFuture(Generic[T]):
    """An SDK future whose ``result()`` waits at most ``request_timeout_s`` unless told otherwise; ``convert``
    wraps the SDK's value (a sampling client becomes a bounded one)."""

    def __init__(
        self,
        inner: ResultFuture[Any],
        session: _Session,
        what: str,
        convert: Callable[[Any], T] | None = None,
    ) -> None:
        self._inner, self._session, self._what, self._convert = inner, session, what, convert

    def result(self, timeout: float | None = None) -> T:
        if timeout is None:
            # A dead session answers at once: waiting the full bound again per request would turn one
            # outage into max_in_flight outages.
            timeout = 0.0 if self._session.dead_reason else self._session.request_timeout_s
        try:
            value = self._inner.result(timeout)
        except TimeoutError:
            raise self._session.timed_out(self._what) from None
        except Exception as err:
            scrubbed = self._session.scrub(err)
            if scrubbed is err:
                raise
            raise scrubbed from None
        return self._convert(value) if self._convert is not None else value


class TinkerSamplingClient:
    """The SDK's sampling client with bounded futures."""

    def __init__(self, inner: Any, session: _Session) -> None:
        self._inner, self._session = inner, session

    def sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
    ) -> BoundedFuture[types.SampleResponse]:
        future = self._inner.sample(
            prompt, num_samples, sampling_params, include_prompt_logprobs=include_prompt_logprobs
        )
        return BoundedFuture(future, self._session, "sample")

    def compute_logprobs(self, prompt: types.ModelInput) -> BoundedFuture[list[float | None]]:
        return BoundedFuture(self._inner.compute_logprobs(prompt), self._session, "compute_logprobs")

    def get_tokenizer(self) -> Any:
        return self._inner.get_tokenizer()


class TinkerTrainingClient:
    """The SDK's training client with bounded futures; ``create_sampling_client`` comes back resolved.

    Checkpoints load through the service (``create_training_client_from_state[_with_optimizer]``): the
    SDK deprecated ``TrainingClient.load_state*`` in 0.38, so this wrapper does not offer them."""

    def __init__(self, inner: Any, session: _Session) -> None:
        self._inner, self._session = inner, session

    def _bound(self, what: str, future: ResultFuture[T]) -> BoundedFuture[T]:
        return BoundedFuture(future, self._session, what)

    def forward(
        self, data: list[types.Datum], loss_fn: str, loss_fn_config: Mapping[str, float | str] | None = None
    ) -> BoundedFuture[types.ForwardBackwardOutput]:
        return self._bound("forward", self._inner.forward(data, loss_fn, loss_fn_config))

    def forward_backward(
        self, data: list[types.Datum], loss_fn: str, loss_fn_config: Mapping[str, float | str] | None = None
    ) -> BoundedFuture[types.ForwardBackwardOutput]:
        return self._bound("forward_backward", self._inner.forward_backward(data, loss_fn, loss_fn_config))

    def forward_backward_custom(
        self, data: list[types.Datum], loss_fn: CustomLossFn
    ) -> BoundedFuture[types.ForwardBackwardOutput]:
        return self._bound("forward_backward_custom", self._inner.forward_backward_custom(data, loss_fn))

    def optim_step(
        self, optim_params: types.AdamParams | None = None, *, adam_params: types.AdamParams | None = None
    ) -> BoundedFuture[types.OptimStepResponse]:
        return self._bound("optim_step", self._inner.optim_step(optim_params, adam_params=adam_params))

    def save_state(self, name: str) -> BoundedFuture[types.SaveWeightsResponse]:
        return self._bound("save_state", self._inner.save_state(name))

    def save_weights_for_sampler(self, name: str) -> BoundedFuture[types.SaveWeightsForSamplerResponse]:
        return self._bound("save_weights_for_sampler", self._inner.save_weights_for_sampler(name))

    def save_weights_and_get_sampling_client(
        self, name: str | None = None
    ) -> BoundedFuture[TinkerSamplingClient]:
        """Not awaited here: the SDK orders the snapshot after every request submitted before it."""
        return BoundedFuture(
            self._inner.save_weights_and_get_sampling_client(name),
            self._session,
            "save_weights_and_get_sampling_client",
            lambda sdk_client: TinkerSamplingClient(sdk_client, self._session),
        )

    def create_sampling_client(self, model_path: str) -> Future[TinkerSamplingClient]:
        return run_now(
            lambda: TinkerSamplingClient(
                self._session.call(
                    "create_sampling_client", lambda: self._inner.create_sampling_client(model_path).result()
                ),
                self._session,
            )
        )

    def get_tokenizer(self) -> Any:
        return self._inner.get_tokenizer()


class TinkerServiceClient:
    """``kitchen.contract.ServiceClient`` on ``tinker.ServiceClient``.

    The SDK's creation methods return futures of clients; these await them (bounded) and return clients,
    as the contract and the local engine do.
    """

    def __init__(self, inner: Any, session: _Session) -> None:
        self._inner, self._session = inner, session

    def _training(self, what: str, create: Callable[[], Any]) -> Future[TinkerTrainingClient]:
        return run_now(lambda: TinkerTrainingClient(self._session.call(what, create), self._session))

    def create_lora_training_client(
        self, base_model: str, rank: int = 32, seed: int | None = None
    ) -> Future[TinkerTrainingClient]:
        return self._training(
            "create_lora_training_client",
            lambda: self._inner.create_lora_training_client(base_model, rank=rank, seed=seed).result(),
        )

    def create_training_client_from_state(self, path: str) -> Future[TinkerTrainingClient]:
        return self._training(
            "create_training_client_from_state",
            lambda: self._inner.create_training_client_from_state(path).result(),
        )

    def create_training_client_from_state_with_optimizer(self, path: str) -> Future[TinkerTrainingClient]:
        return self._training(
            "create_training_client_from_state_with_optimizer",
            lambda: self._inner.create_training_client_from_state_with_optimizer(path).result(),
        )

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None
    ) -> Future[TinkerSamplingClient]:
        return run_now(
            lambda: TinkerSamplingClient(
                self._session.call(
                    "create_sampling_client",
                    lambda: self._inner.create_sampling_client(
                        model_path=model_path, base_model=base_model
                    ).result(),
                ),
                self._session,
            )
        )

    def close(self, status: str = "success", detail: str | None = None) -> None:
        """Finish the Tinker session (bounded, never raising: a run's outcome is already decided)."""
        with contextlib.suppress(Exception):
            self._session.call("close", lambda: self._inner.close(status, detail=detail).result())


# -- the resource ----------------------------------------------------------------------------------------


def _transient_sdk_error(error: BaseException) -> bool:
    import tinker

    if isinstance(error, tinker.APIConnectionError):
        return True
    if isinstance(error, tinker.APIStatusError):
        return error.status_code in (408, 409, 429) or 500 <= error.status_code < 600
    if isinstance(error, tinker.RequestFailedError):
        return str(error.category).lower() != "user"
    return False


def _resolved(value: str | None) -> str | None:
    """A config value, resolving an ``EnvVar`` Dagster has not (outside a run, e.g. the CLI's preflight)."""
    return value.get_value() if isinstance(value, dg.EnvVar) else value


class TinkerBackend(TrainingBackend):
    """LoRA training and sampling on the Tinker service (``--backend tinker``).

    Bind the key as ``dg.EnvVar("TINKER_API_KEY")`` (``from_env`` does): a literal key would be shown in
    the UI's resource config.
    """

    api_key: str | None = Field(
        default=None, repr=False, description="The Tinker API key: bind dg.EnvVar('TINKER_API_KEY')."
    )
    base_url: str | None = Field(
        default=None, description="The Tinker API URL; default $TINKER_BASE_URL, then the production service."
    )
    probe_timeout_s: float = Field(
        default=DEFAULT_PROBE_TIMEOUT_S, gt=0, le=600, description="How long preflight waits for the service."
    )
    request_timeout_s: float = Field(
        default=DEFAULT_REQUEST_TIMEOUT_S, gt=0, description="Longest wait for one request's result."
    )
    _probe: ServiceProbe | None = PrivateAttr(default=None)

    @classmethod
    def from_env(cls) -> TinkerBackend:
        """The resource as ``--backend tinker`` binds it: key and URL as ``EnvVar``s, timeouts from env."""
        kwargs: dict[str, Any] = {}
        if os.environ.get(API_KEY_ENV):
            kwargs["api_key"] = dg.EnvVar(API_KEY_ENV)
        if os.environ.get(BASE_URL_ENV):
            kwargs["base_url"] = dg.EnvVar(BASE_URL_ENV)
        timeouts = (("probe_timeout_s", PROBE_TIMEOUT_ENV), ("request_timeout_s", REQUEST_TIMEOUT_ENV))
        for field, env in timeouts:
            if raw := os.environ.get(env):
                try:
                    kwargs[field] = float(raw)
                except ValueError:
                    raise ValueError(f"{env} must be a number of seconds, got {raw!r}") from None
        return cls(**kwargs)

    @property
    def backend_name(self) -> str:
        return "tinker"

    def _key(self) -> str:
        key = (_resolved(self.api_key) or "").strip()
        if not key:
            raise TinkerUnavailableError(
                f"{API_KEY_ENV} is not set: the Tinker backend needs an API key "
                f"(create one in the Tinker console, then `export {API_KEY_ENV}=tml-...`), "
                "or train on this machine with --backend local"
            )
        if not key.startswith(("tml-", "eyJ")):
            raise TinkerUnavailableError(f"{API_KEY_ENV} is not a Tinker API key (they start with 'tml-')")
        return key

    def preflight(self) -> None:
        """Fail before any work: at once without a key, within ``probe_timeout_s`` if the service is away."""
        self._probe = probe_service(self._key(), _resolved(self.base_url), self.probe_timeout_s)

    def offered_models(self) -> tuple[OfferedModel, ...]:
        if self._probe is None:
            self.preflight()
        assert self._probe is not None
        return self._probe.models

    def resolve_base_model(self, name: str) -> BaseModelManifest:
        """A Tinker base-model name, checked against the models the service offers."""
        from kitchen.models.base import ModelResolutionError

        offered = {m.name: m for m in self.offered_models()}
        listing = ", ".join(sorted(offered)) or "(none)"
        model = offered.get(name.strip())
        if model is None:
            near = [n for n in offered if n.lower() == name.strip().lower()]
            did_you_mean = f" (did you mean {near[0]!r}?)" if near else ""
            raise ModelResolutionError(
                f"model {name!r} is not a Tinker base model{did_you_mean}; with --backend tinker, --model "
                f"names one of the models the service offers: {listing}"
            )
        if not model.trainable:
            trainable = ", ".join(sorted(n for n, m in offered.items() if m.trainable)) or "(none)"
            raise ModelResolutionError(f"Tinker offers {name!r} for sampling only; trainable: {trainable}")
        tokenizer = tokenizer_id_for(model.name)
        return BaseModelManifest(
            name=name,
            source="tinker",
            backend_model=model.name,
            tokenizer_path=tokenizer,
            content_hash=hash_json({"tinker_model": model.name, "tokenizer": tokenizer}),
            architecture=_architecture(model.name),
        )

    def starting_state(self, sampler_path: str, state_path: str | None, base_model: BaseModelManifest) -> str:
        """The registered version's Tinker training state (``tinker://.../weights/...``)."""
        if not state_path or not state_path.startswith("tinker://"):
            raise TinkerUnavailableError(
                f"the registered weights {sampler_path} have no Tinker training state to start from "
                f"(recorded: {state_path or 'none'}); register a model trained with --backend tinker"
            )
        return state_path

    def service_client(self) -> TinkerServiceClient:
        """A new Tinker session; probes first (cheap when preflight just ran) so a retry never hangs."""
        import tinker

        key = self._key()
        self._probe = probe_service(key, _resolved(self.base_url), self.probe_timeout_s)
        session = _Session(self.request_timeout_s, key)
        inner = tinker.ServiceClient(api_key=key, base_url=self._probe.base_url, display_name="kitchen")
        return TinkerServiceClient(inner, session)

    def is_transient(self, error: BaseException) -> bool:
        return super().is_transient(error) or _transient_sdk_error(error)
