"""``LocalSamplingClient``: Tinker's ``SamplingClient`` on a local model, with dynamic batching.

Requests queue up and one worker thread serves them: each time it wakes it takes every request
waiting, expands them into rows (one per sample) and generates them together in left-padded batches
of up to ``max_sampling_batch`` rows. Evaluation code submits all its prompts before awaiting any
result (as it must to pipeline against Tinker), so hundreds of prompts become a handful of batches.
``compute_logprobs`` and prompt logprobs are batched the same way through the shared scorer.

Every sampler runs the process's one shared base model; a sampler on trained weights carries them as a
``LoraOverlay`` (a few MB) applied while it runs, never as a copy of the model.
"""

from __future__ import annotations

import functools
import itertools
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tinker import types

from kitchen.contract import TokenListener
from resources.futures import EngineFuture
from resources.local_engine.checkpoints import read_sampler
from resources.local_engine.generation import RowParams, RowResult, check_sampling_params, generate, stop_rule
from resources.local_engine.overlay import LoraOverlay, applied, check_fits, load_adapter
from resources.local_engine.runtime import (
    EngineRuntime,
    check_model_dir,
    context_window,
    load_tokenizer,
    shared_base_model,
    vocab_size,
)
from resources.local_engine.scoring import target_logprobs, token_budget_chunks
from resources.local_engine.uris import path_from_uri

#: How long the worker waits for the next of a run of submissions before it starts generating: longer than
#: the gap between two back-to-back ``sample`` calls, short next to a generation step.
SETTLE_S = 0.005


@dataclass
class _Request:
    future: EngineFuture[Any]
    prompt: list[int]
    rows: list[RowParams]
    """Empty for a scoring-only request (``compute_logprobs``)."""
    score_prompt: bool
    last_n: int | None = None
    """Only the last N prompt logprobs are reported (``prompt_logprobs_last_n``); earlier are None."""


class LocalSamplingClient:
    """Samples from, and scores with, one fixed set of weights: a base model, plus ``overlay`` if given.

    With ``record_stability_info`` every sequence it returns is recorded under its ``sequence_id`` for
    ``stable_reinforce`` (``resources.local_engine.stability``)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        runtime: EngineRuntime,
        *,
        label: str,
        overlay: LoraOverlay | None = None,
        base_model: str | None = None,
        record_stability_info: bool = False,
    ) -> None:
        if overlay is not None:
            check_fits(model, overlay)
        self._model = model
        self._overlay = overlay
        self._tokenizer = tokenizer
        self._runtime = runtime
        self.label = label
        self._base_model = base_model or label
        self._record = runtime.recorded if record_stability_info else None
        self._window = context_window(model)
        self._vocab = vocab_size(model)
        self._eos_ids = _eos_ids(model, tokenizer)
        self._pad_id = _pad_id(tokenizer, self._eos_ids)
        self._queue: deque[_Request] = deque()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kitchen-sampler")
        self._sequence_ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:12]
        self.batch_sizes: list[int] = []
        """Rows per generation batch, in order: lets callers (and tests) see batching happen."""

    def sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: types.TensorData | None = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
    ) -> EngineFuture[types.SampleResponse]:
        unsupported = {
            "topk_prompt_logprobs": topk_prompt_logprobs != 0,
            "topk_sample_logprobs": topk_sample_logprobs != 0,
            "target_prompt_logprobs": target_prompt_logprobs is not None,
            "prompt_alt_tokens_k": prompt_alt_tokens_k != 0,
        }
        if any(unsupported.values()):
            asked = [name for name, used in unsupported.items() if used]
            raise ValueError(f"sample({', '.join(asked)}=...) is not supported by the local engine")
        return self._sample(
            prompt, num_samples, sampling_params, include_prompt_logprobs, prompt_logprobs_last_n
        )

    def sample_streaming(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        on_token: TokenListener,
    ) -> EngineFuture[types.SampleResponse]:
        """``sample``, reporting each token to ``on_token(choice index, token)`` as it is generated
        (``kitchen.contract.StreamingSamplingClient``); same batching, seeds and result."""
        return self._sample(prompt, num_samples, sampling_params, False, None, on_token)

    def _sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool,
        prompt_logprobs_last_n: int | None,
        on_token: TokenListener | None = None,
    ) -> EngineFuture[types.SampleResponse]:
        tokens = self._prompt_tokens(prompt)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        check_sampling_params(sampling_params)
        max_tokens = self._max_tokens(len(tokens), sampling_params.max_tokens)
        stop = stop_rule(sampling_params.stop, self._eos_ids)
        base_seed = sampling_params.seed if sampling_params.seed is not None else secrets.randbits(63)
        rows = [
            RowParams(
                prompt=tokens,
                max_tokens=max_tokens,
                temperature=sampling_params.temperature,
                top_k=sampling_params.top_k,
                top_p=sampling_params.top_p,
                stop=stop,
                seed=_row_seed(base_seed, index),
                on_token=None if on_token is None else functools.partial(on_token, index),
            )
            for index in range(num_samples)
        ]
        last_n = _check_last_n(prompt_logprobs_last_n, len(tokens))
        return self._submit(
            _Request(EngineFuture(), tokens, rows, score_prompt=include_prompt_logprobs, last_n=last_n)
        )

    def compute_logprobs(
        self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> EngineFuture[list[float | None]]:
        """``[None, log p(t1 | t0), log p(t2 | t0 t1), ...]``: the first token has no context. With
        ``prompt_logprobs_last_n`` only the last N are scored, the others ``None`` (as the SDK does)."""
        tokens = self._prompt_tokens(prompt)
        if self._window is not None and len(tokens) > self._window:
            raise ValueError(f"prompt has {len(tokens)} tokens; the model's context window is {self._window}")
        last_n = _check_last_n(prompt_logprobs_last_n, len(tokens))
        return self._submit(_Request(EngineFuture(), tokens, [], score_prompt=True, last_n=last_n))

    def get_tokenizer(self) -> Any:
        return self._tokenizer

    def get_base_model(self) -> str:
        """The base model's directory (the SDK returns the base model's name)."""
        return self._base_model

    async def sample_async(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
    ) -> types.SampleResponse:
        """The SDK's deprecated async variant: ``await client.sample(...)`` is the same."""
        return await self.sample(prompt, num_samples, sampling_params, include_prompt_logprobs)

    async def compute_logprobs_async(
        self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> list[float | None]:
        return await self.compute_logprobs(prompt, prompt_logprobs_last_n)

    # -- worker side -------------------------------------------------------------------------------

    def _submit(self, request: _Request) -> EngineFuture[Any]:
        with self._lock:
            self._queue.append(request)
        self._executor.submit(self._drain)
        return request.future

    def _drain(self) -> None:
        """Serve every request queued so far; later submissions wait for the next drain."""
        self._settle()
        with self._lock:
            requests = [r for r in self._queue if r.future.set_running_or_notify_cancel()]
            self._queue.clear()
        if not requests:
            return
        try:
            self._serve(requests)
        except BaseException as exc:
            for request in requests:
                if not request.future.done():
                    request.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise

    def _settle(self) -> None:
        """Wait while requests are still arriving, so that calls submitted back to back (a batch of prompts,
        all submitted before any is awaited) are generated together: without it the worker wakes at the
        first and generates it alone while the rest queue behind it."""
        seen = 0
        while True:
            with self._lock:
                queued = len(self._queue)
            if queued == seen:
                return
            seen = queued
            time.sleep(SETTLE_S)

    def _serve(self, requests: list[_Request]) -> None:
        prompt_logprobs = self._score([r.prompt for r in requests if r.score_prompt])
        scored = iter(prompt_logprobs)
        by_request = {id(r): _last(next(scored), r.last_n) for r in requests if r.score_prompt}
        for request in requests:
            if not request.rows:
                request.future.set_result(by_request[id(request)])

        rows = [(request, index, row) for request in requests for index, row in enumerate(request.rows)]
        # Similar lengths together means less padding; a row's result does not depend on its batch.
        rows.sort(key=lambda item: len(item[2].prompt))
        finished: dict[int, dict[int, RowResult]] = {id(r): {} for r in requests}
        batch = self._runtime.max_sampling_batch
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            self.batch_sizes.append(len(chunk))
            params = [row for _, _, row in chunk]
            with applied(self._model, self._overlay):
                results = generate(self._model, self._tokenizer, params, self._runtime.device, self._pad_id)
            for (request, index, _), result in zip(chunk, results, strict=True):
                done = finished[id(request)]
                done[index] = result
                if len(done) == len(request.rows):
                    ordered = [done[i] for i in range(len(request.rows))]
                    request.future.set_result(self._response(ordered, by_request.get(id(request))))

    def _response(
        self, results: Sequence[RowResult], prompt_logprobs: list[float | None] | None
    ) -> types.SampleResponse:
        sequences = []
        for result in results:
            assert result.stop_reason is not None
            sequence_id = f"{self._id_prefix}-{next(self._sequence_ids)}"
            if self._record is not None:
                self._record.add(sequence_id, result.tokens, result.logprobs)
            sequences.append(
                types.SampledSequence(
                    stop_reason=result.stop_reason,
                    sequence_id=sequence_id,
                    _tokens_list=result.tokens,
                    _logprobs_list=result.logprobs,
                )
            )
        return types.SampleResponse(sequences=sequences, _prompt_logprobs_list=prompt_logprobs)

    def _score(self, prompts: list[list[int]]) -> list[list[float | None]]:
        """Prompt logprobs for each prompt, batched under the engine's token budget."""
        scored: list[list[float | None]] = [[None] for _ in prompts]
        order = sorted((i for i, p in enumerate(prompts) if len(p) > 1), key=lambda i: len(prompts[i]))
        lengths = [len(prompts[i]) - 1 for i in order]
        budget, rows = self._runtime.max_batch_tokens, self._runtime.max_sampling_batch
        with torch.inference_mode():
            for chunk in token_budget_chunks(lengths, budget, rows):
                indices = [order[j] for j in chunk]
                inputs = [prompts[i][:-1] for i in indices]
                targets = [torch.as_tensor(prompts[i][1:], dtype=torch.long) for i in indices]
                with applied(self._model, self._overlay):
                    logprobs = target_logprobs(self._model, inputs, targets, self._runtime.device)
                for i, lp in zip(indices, logprobs, strict=True):
                    scored[i].extend(float(x) for x in lp.cpu())
        return scored

    # -- validation --------------------------------------------------------------------------------

    def _prompt_tokens(self, prompt: types.ModelInput) -> list[int]:
        tokens = [int(t) for t in prompt.to_ints()]
        if not tokens:
            raise ValueError("prompt is empty")
        bad = [t for t in tokens if not 0 <= t < self._vocab]
        if bad:
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {self._vocab}): {bad[:5]}")
        return tokens

    def _max_tokens(self, prompt_len: int, requested: int | None) -> int:
        if self._window is None:
            if requested is None:
                raise ValueError(
                    "the model states no context window, so sampling needs an explicit max_tokens"
                )
            return requested
        room = self._window - prompt_len
        if requested is None:
            if room < 1:
                raise ValueError(f"prompt of {prompt_len} tokens fills the context window of {self._window}")
            return room
        if requested > room:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_tokens ({requested}) exceeds "
                f"the context window ({self._window})"
            )
        return requested


def _check_last_n(last_n: int | None, prompt_length: int) -> int | None:
    if last_n is None:
        return None
    if isinstance(last_n, bool) or not isinstance(last_n, int) or not 1 <= last_n <= prompt_length - 1:
        raise ValueError(
            f"prompt_logprobs_last_n must be between 1 and len(prompt) - 1 = {prompt_length - 1}, "
            f"got {last_n!r}"
        )
    return last_n


def _last(logprobs: list[float | None], last_n: int | None) -> list[float | None]:
    if last_n is None:
        return logprobs
    return [None] * (len(logprobs) - last_n) + logprobs[-last_n:]


def _row_seed(seed: int, index: int) -> int:
    """Distinct, reproducible generator seeds for the samples of one request."""
    return int(np.random.SeedSequence([seed % (1 << 63), index]).generate_state(1, dtype=np.uint64)[0])


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models often list several)."""
    ids: set[int] = set()
    for source in (
        tokenizer.eos_token_id,
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(x) for x in source)
    if not ids:
        raise ValueError("neither the tokenizer nor the generation config names an EOS token")
    return frozenset(ids)


def _pad_id(tokenizer: Any, eos_ids: frozenset[int]) -> int:
    """Padding is masked out; any valid id will do, the tokenizer's own if it has one."""
    pad = tokenizer.pad_token_id
    return int(pad) if pad is not None else min(eos_ids)


def open_sampling_client(
    runtime: EngineRuntime,
    *,
    model_path: str | None = None,
    base_model: str | None = None,
    record_stability_info: bool = False,
) -> LocalSamplingClient:
    """A sampling client on a base model, or on a sampler checkpoint's adapter over its base.

    Either way the model is the per-process shared base; the adapter is loaded as an overlay, so opening
    one costs its adapter's size, not the model's.
    """
    if model_path is None and base_model is None:
        raise ValueError("create_sampling_client needs model_path or base_model")
    if model_path is None:
        assert base_model is not None
        base_path = check_model_dir(base_model)
        model = shared_base_model(base_path, runtime.device, runtime.dtype)
        return LocalSamplingClient(
            model,
            load_tokenizer(base_path),
            runtime,
            label=str(base_path),
            record_stability_info=record_stability_info,
        )

    directory = path_from_uri(model_path)
    info = read_sampler(directory)
    base_path = check_model_dir(info.base_model)
    if base_model is not None and check_model_dir(base_model) != base_path:
        raise ValueError(f"sampler {model_path} was trained on {base_path}, not {base_model}")
    model = shared_base_model(base_path, runtime.device, runtime.dtype)
    overlay = load_adapter(directory, runtime.device)
    return LocalSamplingClient(
        model,
        load_tokenizer(base_path),
        runtime,
        label=model_path,
        overlay=overlay,
        base_model=str(base_path),
        record_stability_info=record_stability_info,
    )
