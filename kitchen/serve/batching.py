"""Gathering concurrent requests into one submission to the sampling client.

The contract's ``sample`` takes one prompt (with ``num_samples`` completions of it), so requests with
different prompts cannot share one call. What the contract does allow is pipelining: every call of a
batch is submitted back to back before any result is awaited. The local engine generates everything
queued together as one left-padded batch (``resources/local_engine/sampling.py``), and keeps gathering
while a batch runs; Tinker runs submitted calls concurrently. So ``Batcher`` waits ``window_s`` after a
request arrives for others to join it, submits them all at once, and hands each request its own future.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from dataclasses import dataclass, field
from typing import Any

from tinker import types

from kitchen.contract import ResultFuture, SamplingClient, StreamingSamplingClient, TokenListener


@dataclass
class _Job:
    client: SamplingClient
    prompt: types.ModelInput
    num_samples: int
    params: types.SamplingParams
    submitted: asyncio.Future[ResultFuture[types.SampleResponse]]
    on_token: TokenListener | None = None


@dataclass
class BatchStats:
    submissions: int = 0
    requests: int = 0
    largest: int = 0
    sizes: list[int] = field(default_factory=list)

    def add(self, size: int) -> None:
        self.submissions += 1
        self.requests += size
        self.largest = max(self.largest, size)
        self.sizes = [*self.sizes[-99:], size]


class Batcher:
    """Submits requests arriving within ``window_s`` of each other together (at most ``max_batch``)."""

    def __init__(self, *, window_s: float = 0.005, max_batch: int = 32) -> None:
        self.window_s = window_s
        self.max_batch = max_batch
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the gathering task on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kitchen-serve-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def submit(
        self,
        client: SamplingClient,
        prompt: types.ModelInput,
        num_samples: int,
        params: types.SamplingParams,
        on_token: TokenListener | None = None,
    ) -> ResultFuture[types.SampleResponse]:
        """The client's future for this request, once submitted. A request the client refuses at
        submission (``ValueError``: prompt longer than the context window, ...) raises here. With
        ``on_token`` the client must be a ``StreamingSamplingClient``: tokens are reported as generated."""
        assert self._queue is not None, "Batcher.start() first"
        if on_token is not None and not isinstance(client, StreamingSamplingClient):
            raise TypeError(f"{type(client).__name__} cannot stream tokens (no sample_streaming)")
        submitted: asyncio.Future[ResultFuture[types.SampleResponse]] = (
            asyncio.get_running_loop().create_future()
        )
        await self._queue.put(_Job(client, prompt, num_samples, params, submitted, on_token))
        return await submitted

    async def sample(
        self, client: SamplingClient, prompt: types.ModelInput, num_samples: int, params: types.SamplingParams
    ) -> types.SampleResponse:
        return await wait_result(await self.submit(client, prompt, num_samples, params))

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            # One thread call for the whole batch, so nothing else interleaves between its submissions.
            outcomes = await asyncio.to_thread(_submit_all, batch)
            self.stats.add(len(batch))
            for job, outcome in zip(batch, outcomes, strict=True):
                if job.submitted.done():  # the request was cancelled (client went away)
                    continue
                if isinstance(outcome, BaseException):
                    job.submitted.set_exception(outcome)
                else:
                    job.submitted.set_result(outcome)


def _submit_all(batch: list[_Job]) -> list[ResultFuture[types.SampleResponse] | BaseException]:
    outcomes: list[ResultFuture[types.SampleResponse] | BaseException] = []
    for job in batch:
        try:
            if job.on_token is not None:
                assert isinstance(job.client, StreamingSamplingClient)
                future = job.client.sample_streaming(job.prompt, job.num_samples, job.params, job.on_token)
            else:
                future = job.client.sample(job.prompt, job.num_samples, job.params)
            outcomes.append(future)
        except Exception as err:
            outcomes.append(err)
    return outcomes


async def wait_result(future: ResultFuture[Any]) -> Any:
    """Await a contract future without holding the event loop: ``concurrent.futures.Future`` s (the local
    engine's) are wrapped; anything else (Tinker's ``APIFuture``) is waited for in a thread."""
    if isinstance(future, concurrent.futures.Future):
        return await asyncio.wrap_future(future)
    return await asyncio.to_thread(future.result)
