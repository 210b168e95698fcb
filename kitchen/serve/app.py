"""The OpenAI-compatible HTTP app: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``.

Built on the sampling-client contract only, so a local-engine and a Tinker-trained version are served by
the same code. Chats are rendered through the model's tokenizer with ``generation_prompt``, exactly as
training and evaluation render them. Every answer names the version that produced it (``model`` and
the ``X-Kitchen-Model-Version`` header), which matters because the version may change between requests
when the served alias moves.

Streaming (``stream: true``) speaks OpenAI's server-sent events. The contract's ``sample`` returns whole
sequences; a client with the optional ``StreamingSamplingClient`` capability (the local engine) also reports
each token as it is generated, and its text is sent as it forms (held back only while it could be the start
of a stop sequence or an incomplete character), so the deltas add up to exactly the non-streamed reply.
Without it (Tinker) each choice's text arrives in one chunk when its generation ends.

The bearer key is compared in constant time and never logged or echoed; request bodies and message
contents are not logged either (one line per completion: id, version, token counts, latency).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from tinker import types

from kitchen import telemetry
from kitchen.contract import ResultFuture, StreamingSamplingClient, TokenListener
from kitchen.data.datums import generation_prompt
from kitchen.serve.batching import Batcher, wait_result
from kitchen.serve.feedback import Feedback, FeedbackStore, UnknownCompletion
from kitchen.serve.schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ErrorBody,
    ErrorDetail,
    FeedbackReceipt,
    FeedbackRequest,
    ModelCard,
    ModelList,
    Usage,
)
from kitchen.serve.source import ModelSource, Served
from kitchen.telemetry.events import FEEDBACK_RECEIVED

log = logging.getLogger("kitchen.serve")

VERSION_HEADER = "X-Kitchen-Model-Version"
_Body = TypeVar("_Body", bound=BaseModel)
API_KEY_ENV = "KITCHEN_SERVE_API_KEY"


def new_session_id() -> str:
    """``serve-<UTC time>-<random>``: sorts by start time, usable as a file name."""
    return f"serve-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class ServeSettings:
    """Limits and the optional bearer key (kept out of ``repr`` so it cannot reach a log by accident)."""

    api_key: str | None = field(default=None, repr=False)
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256
    max_request_bytes: int = 1 << 20
    max_n: int = 8
    batch_window_s: float = 0.005
    max_batch: int = 32
    session: str = field(default_factory=new_session_id)
    """The telemetry ``run_id`` of this server's events (``kitchen.feedback.received``): the JSONL sink
    writes them to ``$KITCHEN_HOME/telemetry/<session>.jsonl``."""


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)


def _error_response(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(ErrorBody(error=error.detail).model_dump(), status_code=error.status, headers=headers)


def create_app(
    source: ModelSource, settings: ServeSettings | None = None, feedback: FeedbackStore | None = None
) -> FastAPI:
    """The app serving ``source`` (loaded at startup if it is not yet), polling it while it runs. With
    ``feedback``, completions are recorded and ``POST /v1/feedback`` accepts ratings of them."""
    settings = settings or ServeSettings()
    batcher = Batcher(window_s=settings.batch_window_s, max_batch=settings.max_batch)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not source.loaded:
            source.load()
        source.start()
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            source.stop()

    app = FastAPI(title="Kitchen", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.source = source
    app.state.batcher = batcher

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, str(exc.detail), type=kind))

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise APIError(
                401,
                "missing bearer key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
        if not secrets.compare_digest(given.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    def version_headers(served: Served) -> dict[str, str]:
        return {VERSION_HEADER: served.version}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        served = source.served
        return {
            "status": "ok",
            "model": source.name,
            "version": served.version,
            "serving_since": served.since,
            "last_checked": source.last_checked,
            "last_error": source.last_error,
            "session": settings.session,
            "batching": {
                "submissions": batcher.stats.submissions,
                "requests": batcher.stats.requests,
                "largest": batcher.stats.largest,
            },
        }

    def cards(served: Served) -> list[ModelCard]:
        ids = dict.fromkeys((source.name, served.version))
        return [ModelCard(id=i, created=int(served.since)) for i in ids]

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        authorize(request)
        served = source.served
        body = ModelList(data=cards(served))
        return JSONResponse(body.model_dump(), headers=version_headers(served))

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> JSONResponse:
        authorize(request)
        served = source.served
        for card in cards(served):
            if _same_model(model_id, card.id):
                return JSONResponse(card.model_dump(), headers=version_headers(served))
        raise _unknown_model(model_id, source.name, served)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        body = await _read_body(request, settings.max_request_bytes)
        chat = _parse(body)
        served = source.served  # one version for the whole request
        if not any(_same_model(chat.model, known) for known in (source.name, served.version)):
            raise _unknown_model(chat.model, source.name, served)
        unsupported = chat.unsupported_fields()
        if unsupported:
            raise APIError(
                400,
                f"not supported by this server: {', '.join(unsupported)}",
                param=unsupported[0],
                code="unsupported_parameter",
            )
        max_tokens = chat.requested_max_tokens()
        if max_tokens is not None and max_tokens > settings.max_tokens_limit:
            param = "max_completion_tokens" if chat.max_completion_tokens is not None else "max_tokens"
            raise APIError(
                400,
                f"{param} is {max_tokens}; this server allows at most {settings.max_tokens_limit}",
                param=param,
                code="invalid_value",
            )
        n = chat.n or 1
        if n > settings.max_n:
            raise APIError(
                400, f"n is {n}; this server allows at most {settings.max_n}", param="n", code="invalid_value"
            )
        prompt = _render(chat, served.tokenizer)
        params = types.SamplingParams(
            max_tokens=max_tokens or settings.default_max_tokens,
            temperature=1.0 if chat.temperature is None else chat.temperature,
            top_p=1.0 if chat.top_p is None else chat.top_p,
            stop=_stops(served.tokenizer, chat.stop_list()),
            seed=chat.seed,
        )
        started = time.perf_counter()
        tokens: asyncio.Queue[tuple[int, int]] | None = None
        on_token: TokenListener | None = None
        if chat.stream and isinstance(served.client, StreamingSamplingClient):
            tokens = asyncio.Queue()
            on_token = _listener(asyncio.get_running_loop(), tokens)
        try:
            future = await batcher.submit(
                served.client, types.ModelInput.from_ints(prompt), n, params, on_token=on_token
            )
        except ValueError as err:  # refused by the sampler: prompt too long for the context window, ...
            raise APIError(400, str(err), param="messages", code="invalid_value") from err
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        finish = _Finisher(served, chat.stop_list(), len(prompt), completion_id, started)
        if feedback is not None:
            finish.record = _recorder(feedback, completion_id, served.version, _messages(chat))
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return StreamingResponse(
                _events(future, tokens, served, completion_id, created, n, include_usage, finish),
                media_type="text/event-stream",
                headers={**version_headers(served), "Cache-Control": "no-cache"},
            )
        response = await _result(future)
        choices, usage = finish(response)
        await finish.save(choices)
        completion = ChatCompletion(
            id=completion_id,
            created=created,
            model=served.version,
            choices=[
                Choice(index=i, message=AssistantMessage(content=text), finish_reason=reason)
                for i, (text, reason) in enumerate(choices)
            ],
            usage=usage,
            system_fingerprint=served.version,
        )
        return JSONResponse(completion.model_dump(), headers=version_headers(served))

    @app.post("/v1/feedback")
    async def post_feedback(request: Request) -> JSONResponse:
        authorize(request)
        if feedback is None:
            raise APIError(404, "feedback is off on this server", type="not_found", code="feedback_off")
        body = _parse_as(FeedbackRequest, await _read_body(request, settings.max_request_bytes))
        try:
            stored = await asyncio.to_thread(
                feedback.add_feedback,
                body.completion_id,
                choice_index=body.choice_index,
                rating=body.rating,
                score=body.score,
                correction=body.correction,
            )
        except UnknownCompletion as err:
            raise APIError(404, str(err), param="completion_id", code="completion_not_found") from err
        log.info("%s on %s (%s)", stored.id, stored.completion_id, stored.model_version)
        await asyncio.to_thread(_feedback_received, stored, settings.session)
        receipt = FeedbackReceipt(
            id=stored.id,
            created=int(stored.created),
            completion_id=stored.completion_id,
            choice_index=stored.choice_index,
            model=stored.model_version,
        )
        return JSONResponse(receipt.model_dump(), headers={VERSION_HEADER: stored.model_version})

    return app


def _feedback_received(stored: Feedback, session: str) -> None:
    """``kitchen.feedback.received`` for one stored POST: ids, version and what kind of feedback, never
    the texts (sinks are logs)."""
    measurements: dict[str, float] = {"seq": stored.seq, "choice_index": stored.choice_index}
    if stored.score is not None:
        measurements["score"] = stored.score
    telemetry.emit(
        FEEDBACK_RECEIVED,
        measurements,
        {
            "run_id": session,
            "workflow": "serve",
            "feedback_id": stored.id,
            "completion_id": stored.completion_id,
            "model_version": stored.model_version,
            "rating": stored.rating,
            "corrected": stored.correction is not None,
        },
    )


def _messages(chat: ChatCompletionRequest) -> list[dict[str, str]]:
    """The conversation as the chat template sees it (``developer`` is a system turn)."""
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in chat.messages
    ]


def _recorder(
    store: FeedbackStore, cid: str, version: str, messages: list[dict[str, str]]
) -> Callable[[list[str]], None]:
    def record(choices: list[str]) -> None:
        store.record_completion(cid, version, messages, choices)

    return record


class _Finisher:
    """A sample response as OpenAI choices: text without special tokens, cut before the first stop
    sequence (OpenAI leaves it out; the contract's samplers include it); plus usage and the log line."""

    def __init__(
        self, served: Served, stops: list[str], prompt_tokens: int, cid: str, started: float
    ) -> None:
        self.served, self.stops, self.prompt_tokens = served, stops, prompt_tokens
        self.cid, self.started = cid, started
        self.record: Callable[[list[str]], None] | None = None

    async def save(self, choices: list[tuple[str, Any]]) -> None:
        """Keep the completion for feedback (off the event loop: SQLite writes to disk)."""
        if self.record is not None:
            await asyncio.to_thread(self.record, [text for text, _ in choices])

    def __call__(self, response: types.SampleResponse) -> tuple[list[tuple[str, Any]], Usage]:
        choices = []
        completion_tokens = 0
        for sequence in response.sequences:
            completion_tokens += len(sequence.tokens)
            text = self.served.tokenizer.decode(sequence.tokens, skip_special_tokens=True)
            cut = _first_stop(text, self.stops)
            if cut >= 0:
                choices.append((text[:cut], "stop"))
            else:
                choices.append((text, "stop" if sequence.stop_reason == "stop" else "length"))
        log.info(
            "%s %s: %d prompt + %d completion tokens in %.0f ms",
            self.cid,
            self.served.version,
            self.prompt_tokens,
            completion_tokens,
            (time.perf_counter() - self.started) * 1000,
        )
        usage = Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=self.prompt_tokens + completion_tokens,
        )
        return choices, usage


def _first_stop(text: str, stops: list[str]) -> int:
    """Where the first stop sequence starts in ``text``; -1 when none does."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


def _listener(loop: asyncio.AbstractEventLoop, tokens: asyncio.Queue[tuple[int, int]]) -> TokenListener:
    """Hands tokens from the sampler's thread to the request's queue on the event loop."""

    def on_token(index: int, token: int) -> None:
        loop.call_soon_threadsafe(tokens.put_nowait, (index, token))

    return on_token


class _StreamText:
    """One choice's text as its tokens arrive: the part that is certain, cut as ``_Finisher`` cuts it."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """The new text to send after ``token`` (often empty)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = _first_stop(text, self.stops)
        if cut >= 0:
            text, self.stopped = text[:cut], True
        else:  # hold back what may yet become a stop sequence, and a character still missing bytes
            held = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - held].rstrip("\ufffd")
        if not text.startswith(self.sent):  # the decoding of earlier tokens changed: wait for the end
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def rest(self, final: str) -> str:
        """What remains to send of the choice's final text."""
        if final.startswith(self.sent):
            return final[len(self.sent) :]
        log.warning("a streamed reply's text differs from its final decoding; sent %d chars", len(self.sent))
        return ""


async def _events(
    future: ResultFuture[types.SampleResponse],
    tokens: asyncio.Queue[tuple[int, int]] | None,
    served: Served,
    cid: str,
    created: int,
    n: int,
    include_usage: bool,
    finish: _Finisher,
) -> AsyncIterator[str]:
    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        body = ChatCompletionChunk(
            id=cid,
            created=created,
            model=served.version,
            choices=choices,
            usage=usage,
            system_fingerprint=served.version,
        )
        return _sse(body)

    def content(index: int, text: str) -> str:
        return chunk([ChunkChoice(index=index, delta=Delta(content=text))])

    yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(n)])
    texts = [_StreamText(served.tokenizer, finish.stops) for _ in range(n)]
    result = asyncio.ensure_future(_result(future))
    getter: asyncio.Future[tuple[int, int]] | None = None
    try:
        while tokens is not None:  # tokens as generated, until the whole response is in
            getter = asyncio.ensure_future(tokens.get())
            done, _ = await asyncio.wait({getter, result}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                break
            index, token = getter.result()
            if delta := texts[index].push(token):
                yield content(index, delta)
        while tokens is not None and not tokens.empty():  # every token is queued before the result
            index, token = tokens.get_nowait()
            if delta := texts[index].push(token):
                yield content(index, delta)
        response = await result
    except APIError as err:
        yield _sse(ErrorBody(error=err.detail))
        yield "data: [DONE]\n\n"
        return
    finally:  # the client went away mid-stream: stop waiting (no-ops once done)
        result.cancel()
        if getter is not None:
            getter.cancel()
    choices, usage = finish(response)
    await finish.save(choices)
    for index, (text, _) in enumerate(choices):
        rest = texts[index].rest(text) if tokens is not None else text
        if rest or tokens is None:
            yield content(index, rest)
    for index, (_, reason) in enumerate(choices):
        yield chunk([ChunkChoice(index=index, delta=Delta(), finish_reason=reason)])
    if include_usage:
        yield chunk([], usage)
    yield "data: [DONE]\n\n"


def _sse(body: BaseModel) -> str:
    return f"data: {body.model_dump_json(exclude_none=False)}\n\n"


async def _result(future: ResultFuture[types.SampleResponse]) -> types.SampleResponse:
    try:
        response: types.SampleResponse = await wait_result(future)
        return response
    except Exception as err:
        log.exception("sampling failed")
        raise APIError(500, "sampling failed; see the server log", type="server_error") from err


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = APIError(
        413, f"request body is larger than this server's limit of {limit} bytes", code="request_too_large"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes) -> ChatCompletionRequest:
    return _parse_as(ChatCompletionRequest, body)


def _parse_as(model: type[_Body], body: bytes) -> _Body:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from err
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        raise APIError(400, message, param=param, code="invalid_value") from err


def _same_model(asked: str, known: str) -> bool:
    return asked.removeprefix("models:/") == known.removeprefix("models:/")


def _unknown_model(asked: str, name: str, served: Served) -> APIError:
    now = f" (now {served.version})" if served.version != name else ""
    return APIError(
        404,
        f"the model {asked!r} does not exist on this server; it serves {name!r}{now}",
        param="model",
        code="model_not_found",
    )


def _render(chat: ChatCompletionRequest, tokenizer: Any) -> list[int]:
    try:
        return generation_prompt(_messages(chat), tokenizer)
    except Exception as err:  # the template refuses the conversation (e.g. roles out of order)
        raise APIError(
            400, f"the model's chat template cannot render these messages: {err}", param="messages"
        ) from err


def _stops(tokenizer: Any, stops: list[str]) -> list[str] | None:
    """End of turn plus the caller's stop sequences, as ``kitchen models sample`` asks for it (a list of
    strings adds to EOS on the local engine; Tinker needs the end-of-turn token named)."""
    eos = getattr(tokenizer, "eos_token", None)
    found = ([eos] if eos else []) + stops
    return found or None
