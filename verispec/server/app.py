"""The FastAPI app: validate, tokenize, enqueue on the scheduler, await its cycles, answer in the
OpenAI format. The engine thread owns the models; handlers never touch them (DESIGN.md)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from verispec import __version__
from verispec.config import MAX_SEED, ServeConfig
from verispec.engine.generate import Cycle
from verispec.engine.request import Request
from verispec.engine.scheduler import EngineUnavailableError, QueueFullError, Scheduler, Ticket
from verispec.engine.score import prompt_logprobs
from verispec.errors import InvalidInputError
from verispec.llm import LLM
from verispec.server import protocol
from verispec.server.metrics import Metrics
from verispec.server.protocol import ChatRequest, Common, CompletionRequest, error
from verispec.text import Detokenizer, token_texts
from verispec.types import Stats, TokenLogprob

log = logging.getLogger(__name__)


UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class APIError(HTTPException):
    """An error answered as OpenAI's JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(status, message)
        self.body = error(message, kind, param, code)


@dataclass
class Progress:
    """One cycle as the handler sees it: copied on the engine thread, so nothing shared is read later."""

    tokens: list[int]
    finish_reason: str | None
    tau: int
    drafted: int
    accepted: int
    logprobs: list[TokenLogprob]


def create_app(llm: LLM, scheduler: Scheduler, config: ServeConfig, model_name: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn has let every open request finish; the engine thread ends with nothing left to do
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="verispec", version=__version__, description="Lossless speculative decoding, OpenAI-style",
                  lifespan=lifespan)
    metrics = Metrics(lambda: scheduler.waiting, lambda: scheduler.running)
    app.add_middleware(Guard, max_body_bytes=config.max_body_bytes, count=metrics.requests)

    @app.exception_handler(HTTPException)  # starlette's: its 404 and 405 too, not only FastAPI's
    async def http_error(_: HTTPRequest, e: HTTPException) -> JSONResponse:
        body = e.body if isinstance(e, APIError) else error(str(e.detail), "invalid_request_error")
        return JSONResponse(body, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        if first.get("type") == "json_invalid":  # its location is a byte offset, not a field
            why = first.get("ctx", {}).get("error", "invalid")
            return JSONResponse(error(f"the body is not valid JSON: {why} at byte {first['loc'][-1]}",
                                      "invalid_request_error"), status_code=400)
        # pydantic adds union branches ('str', 'list[int]') to the location: not fields, left out
        loc = [str(part) for part in first.get("loc", ())
               if part != "body" and str(part) not in UNION_TAGS and "[" not in str(part)]
        param = ".".join(loc) or None
        got = f" (got {first['input']!r})" if "input" in first and not isinstance(first["input"], dict) else ""
        message = f"{param or 'body'}: {first.get('msg', 'invalid')}{got}"
        return JSONResponse(error(message[:500], "invalid_request_error", param), status_code=400)

    @app.exception_handler(Exception)
    async def internal(_: HTTPRequest, e: Exception) -> JSONResponse:
        return JSONResponse(error(f"internal error: {e!r}", "server_error"), status_code=500)

    def authorized(request: HTTPRequest) -> None:
        if config.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "authentication_error",
                           code="invalid_api_key")

    # HEAD as well as GET (load balancers and SDKs probe with it); left out of the schema, as it mirrors GET
    @app.get("/health")
    @app.head("/health", include_in_schema=False)
    def health() -> JSONResponse:
        if scheduler.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse(error(f"the engine thread is not running: {scheduler.error!r}", "server_error"), 503)

    def exposition() -> bytes:
        """The metrics in Prometheus's text format, the monitor's and the audit's brought up to date."""
        metrics.monitor(scheduler.monitor.report())
        metrics.audit(scheduler.audit.audited, scheduler.audit.mismatches)
        return generate_latest(metrics.registry)

    app.state.exposition = exposition  # for a replica to push (server/replicas.py) without a request

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(exposition(), media_type=CONTENT_TYPE_LATEST)

    def card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": protocol.now(), "owned_by": "verispec"}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    @app.head("/v1/models", dependencies=[Depends(authorized)], include_in_schema=False)
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model:path}", dependencies=[Depends(authorized)])
    @app.head("/v1/models/{model:path}", dependencies=[Depends(authorized)], include_in_schema=False)
    def retrieve(model: str) -> dict[str, Any]:
        if model != model_name:
            raise not_served(model)
        return card()

    def not_served(model: str) -> APIError:
        return APIError(404, f"model {model!r} does not exist; this server serves {model_name!r}", param="model",
                        code="model_not_found")

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, http: HTTPRequest) -> Response:
        return await generate(body, http, body.prompt, "prompt")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest, http: HTTPRequest) -> Response:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        return await generate(body, http, messages, "messages")

    def token_text(token_id: int) -> str:  # an alternative token's text, alone
        return llm.tokenizer.decode([token_id])

    scoring = asyncio.Lock()

    async def generate(body: Common, http: HTTPRequest, prompt: Any, field: str) -> Response:
        """Everything that can be refused is refused here, before a stream starts."""
        arrived = time.perf_counter()
        if body.model != model_name:
            raise not_served(body.model)
        batch = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], (int, dict))
        best_of = getattr(body, "best_of", None) or body.n
        if best_of < body.n:
            raise APIError(400, f"best_of={best_of} is not allowed: it must be at least n={body.n}", param="best_of")
        if best_of > body.n and body.stream:
            raise APIError(400, f"best_of={best_of} cannot be streamed: the best are known only at the end",
                           param="best_of")
        scored = best_of > body.n and body.logprobs is None  # candidates are ranked by their log-probabilities
        runs = await submit(body.model_copy(update={"logprobs": 0}) if scored else body,
                            prompt if batch else [prompt], field, arrived, best_of)
        chat = isinstance(body, ChatRequest)
        if body.stream:
            return StreamingResponse(stream(runs, body, scheduler, chat, model_name), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        async def answer(run: Run | dict[str, Any]) -> dict[str, Any]:
            return run if isinstance(run, dict) else await run.whole(scheduler, http)

        try:
            answers = await asyncio.gather(*map(answer, runs))
        except BaseException:  # one choice failed or the client left: the others stop too
            cancel(runs)
            raise
        usage = protocol.total_usage([a["usage"] for a in answers])  # every candidate's tokens were generated
        if best_of > body.n:
            answers = _best(runs, answers, best_of, body.n, scored)
        if len(answers) == 1:
            return JSONResponse({**answers[0], "usage": usage})
        choices = [{**a["choices"][0], "index": i} for i, a in enumerate(answers)]
        return JSONResponse(protocol.envelope(chat, protocol.new_id("chatcmpl" if chat else "cmpl"), model_name,
                                              protocol.now(), choices, False, usage))

    async def submit(body: Common, prompts: list[Any], field: str, arrived: float, candidates: int
                     ) -> list[Run | dict[str, Any]]:
        """Every prompt of a completions batch, `candidates` times each (n, or best_of), as a request
        of its own (choice j of a
        seeded prompt takes seed + j), all submitted at once, or none: a refusal cancels those
        already in. Choices of one prompt share its prefill (the scheduler copies the cache)."""
        runs: list[Run | dict[str, Any]] = []
        echoes: dict[tuple[int, ...], Echo] = {}  # a prompt is scored once for all its choices
        try:
            for i, prompt in enumerate(prompts):
                for j in range(candidates):
                    choice = body if body.seed is None or j == 0 else body.model_copy(
                        update={"seed": (body.seed + j) % (MAX_SEED + 1)})
                    runs.append(await start(choice, prompt, f"{field}.{i}" if len(prompts) > 1 else field, arrived,
                                            echoes))
        except BaseException:  # a refusal, a failure or a cancellation: none of the choices runs
            cancel(runs)
            raise
        return runs

    def cancel(runs: list[Run | dict[str, Any]]) -> None:
        for run in runs:
            if isinstance(run, Run):
                scheduler.cancel(run.ticket)

    async def start(body: Common, prompt: Any, field: str, arrived: float, echoes: dict[tuple[int, ...], Echo]
                    ) -> Run | dict[str, Any]:
        """One prompt submitted to the engine; or, echo with max_tokens 0, its whole answer."""
        scores_only = isinstance(body, CompletionRequest) and body.echo and body.max_tokens == 0
        try:
            ids = llm.encode(prompt)
            params = protocol.sampling_params(body.model_copy(update={"max_tokens": 1}) if scores_only else body,
                                              len(ids), llm.engine.capacity)
            # compiling a response format can take a while (the first one builds llguidance's view of
            # the tokenizer): off the event loop, so that other streams go on
            request, text = await asyncio.to_thread(llm.prepare, ids, params) if params.response_format else \
                llm.prepare(ids, params)
        except InvalidInputError as e:
            raise APIError(400, str(e), param=e.param or field) from None
        echo = None
        if isinstance(body, CompletionRequest) and body.echo:
            if not scheduler.alive:
                raise APIError(503, "the engine is not running", "server_error", code="engine_unavailable")
            if tuple(ids) not in echoes:
                async with scoring:  # one prompt at a time: its forward runs beside the engine's
                    echoes[tuple(ids)] = await asyncio.to_thread(Echo.of, llm, ids, params.logprobs)
            echo = echoes[tuple(ids)]
            if scores_only:
                metrics.prompt_tokens.inc(len(ids))
                return echo.alone(body, model_name, token_text)
        progress: asyncio.Queue[Progress | BaseException] = asyncio.Queue()
        try:
            ticket = scheduler.submit(request, _listener(asyncio.get_running_loop(), progress))
        except QueueFullError as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None
        except EngineUnavailableError as e:
            raise APIError(503, str(e), "server_error", code="engine_unavailable") from None
        metrics.prompt_tokens.inc(len(ids))
        return Run(body, request, text, ticket, progress, metrics, arrived, model_name, isinstance(body, ChatRequest),
                   token_text, echo)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, with the served model as the example for every `model` field."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for component in schema.get("components", {}).get("schemas", {}).values():
                if "model" in component.get("properties", {}):
                    component["properties"]["model"]["examples"] = [model_name]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _listener(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Any:
    def hear(event: Cycle | BaseException) -> None:  # on the engine thread
        item = event if isinstance(event, BaseException) else Progress(
            event.tokens, event.sequence.request.finish_reason, event.tau, event.drafted, event.accepted, event.logprobs)
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:
            pass  # the event loop is closed: nobody is listening any more
    return hear


@dataclass
class Echo:
    """A completion's echoed prompt: its ids, what each adds to the text (which is their
    concatenation, the prompt as the tokenizer decodes it) and, when logprobs were asked, ids[1:] scored."""

    ids: list[int]
    texts: list[str]
    scored: list[TokenLogprob] | None

    @classmethod
    def of(cls, llm: LLM, ids: list[int], logprobs: int | None) -> Echo:
        """On a worker thread: the prompt's forward (the native kernels take one forward at a time)."""
        return cls(ids, token_texts(llm.tokenizer, ids),
                   None if logprobs is None else prompt_logprobs(llm.target, ids, logprobs))

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def logprobs(self, token_text: Callable[[int], str], completion: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if self.scored is None else protocol.with_prompt(self.texts, self.scored, token_text, completion)

    def alone(self, body: Common, model: str, token_text: Callable[[int], str]) -> dict[str, Any]:
        """max_tokens 0: the prompt scored, nothing generated; the answer, or its one stream chunk."""
        choice = protocol.choice(False, self.text, "length", body.stream, [] if body.return_token_ids else None,
                                 logprobs=self.logprobs(token_text, None))
        use = protocol.usage(len(self.ids), 0, Stats(), [])
        with_usage = not body.stream or (body.stream_options is not None and body.stream_options.include_usage)
        return protocol.envelope(False, protocol.new_id("cmpl"), model, protocol.now(), [choice], body.stream, use,
                                 with_usage)


def _best(runs: list[Run | dict[str, Any]], answers: list[dict[str, Any]], best_of: int, n: int, scored: bool
          ) -> list[dict[str, Any]]:
    """Of each prompt's best_of candidates, the n of highest mean log-probability per token (as the
    request's logprobs report it: processed unless it asked for raw), best first. Log-probabilities asked for only
    to rank are left out of the answer."""
    out = []
    for first in range(0, len(runs), best_of):
        ranked = sorted(range(first, first + best_of),
                        key=lambda i: -runs[i].mean_logprob if isinstance(runs[i], Run) else 0.0)
        for i in ranked[:n]:
            answer = answers[i]
            if scored:
                answer = {**answer, "choices": [{**answer["choices"][0], "logprobs": None}]}
            out.append(answer)
    return out


class Run:
    """One request's answer, whole or streamed, from the cycles the engine reports."""

    def __init__(self, body: Common, request: Request, text: Detokenizer, ticket: Ticket, progress: asyncio.Queue,
                 metrics: Metrics, arrived: float, model: str, chat: bool, token_text: Callable[[int], str],
                 echo: Echo | None = None) -> None:
        self.body, self.request, self.text, self.ticket = body, request, text, ticket
        self.progress, self.metrics, self.arrived, self.model, self.chat = progress, metrics, arrived, model, chat
        self.token_text, self.echo = token_text, echo
        self.logprobs: list[TokenLogprob] = []  # the kept tokens' not yet sent (a stream) or all (whole)
        self.scores: list[float] = []  # every kept token's log-probability, when asked (best_of ranks by it)
        self._offset = len(echo.text) if echo else 0  # completions: the text covered by logprobs sent
        self._told: list[int] = []  # the output ids whose logprobs were sent
        self.id = protocol.new_id("chatcmpl" if chat else "cmpl")
        self.created = protocol.now()
        self.ids: list[int] = []
        self.taus: list[int] = []
        self.finish_reason: str | None = None
        self._first: float | None = None

    async def cycles(self) -> AsyncIterator[Progress]:
        while self.finish_reason is None:
            item = await self.progress.get()
            if isinstance(item, EngineUnavailableError):  # the server shut down before this request finished
                raise APIError(503, str(item), "server_error", code="engine_unavailable")
            if isinstance(item, BaseException):
                raise APIError(500, f"the engine failed on this request: {item!r}", "server_error")
            self.ids += item.tokens
            self.logprobs += item.logprobs
            self.scores += [e.logprob for e in item.logprobs]
            self.taus.append(item.tau)
            self.finish_reason = item.finish_reason
            self._record(item)
            yield item

    def _record(self, item: Progress) -> None:
        now, m = time.perf_counter(), self.metrics
        m.cycle(item.tau, item.drafted, item.accepted)
        m.generation_tokens.inc(len(item.tokens))
        if self._first is None and item.tokens:
            self._first = now
            m.ttft.observe(now - self.arrived)
        if self.finish_reason is not None:
            m.latency.observe(now - self.arrived)
            if self._first is not None and len(self.ids) > 1:
                m.per_token.observe((now - self._first) / (len(self.ids) - 1))

    def take_logprobs(self) -> dict[str, Any] | None:
        """The log-probabilities of the tokens heard since the last call, in OpenAI's shape (None when
        the request did not ask): a stream chunk carries those of the tokens before it."""
        if self.request.params.logprobs is None:
            return None
        ids = [e.token_id for e in self.logprobs]
        texts = token_texts(self.text.tokenizer, ids, self._told)
        out = protocol.logprobs(self.chat, self.logprobs, texts, self.token_text, self._offset)
        self._offset += sum(map(len, texts))
        self._told += ids
        self.logprobs = []
        return out

    @property
    def mean_logprob(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else float("-inf")

    def usage(self) -> dict[str, Any]:
        return protocol.usage(len(self.request.prompt_ids), len(self.ids), self.request.stats, self.taus)

    async def whole(self, scheduler: Scheduler, http: HTTPRequest) -> dict[str, Any]:
        """The complete answer; a client that hangs up meanwhile frees its slot at once."""
        async def collect() -> None:
            async for _ in self.cycles():
                pass

        task = asyncio.ensure_future(collect())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await http.is_disconnected():
                    task.cancel()
                    raise APIError(499, "the client closed the connection", code="client_closed")
            task.result()
        finally:
            scheduler.cancel(self.ticket)
        text = self.text.text(self.ids, self.finish_reason)
        ids = self.ids if self.body.return_token_ids else None
        logprobs = self.take_logprobs()
        if self.echo is not None:
            text, logprobs = self.echo.text + text, self.echo.logprobs(self.token_text, logprobs)
        choice = protocol.choice(self.chat, text, self.finish_reason, False, ids, logprobs=logprobs)
        return protocol.envelope(self.chat, self.id, self.model, self.created, [choice], False, self.usage())

    async def pieces(self) -> AsyncIterator[dict[str, Any]]:
        """This choice's stream chunks (index 0): chat's role first, an echoed prompt, then what
        each cycle adds. Raises APIError when the request fails."""
        if self.chat:
            yield protocol.choice(True, "", None, True, None, first=True)
        if self.echo is not None:  # the prompt first, in a chunk of its own
            yield protocol.choice(False, self.echo.text, None, True, None, logprobs=self.echo.logprobs(self.token_text, None))
        async for item in self.cycles():
            piece = self.text.new(self.ids, self.finish_reason)
            ids = item.tokens if self.body.return_token_ids else None
            if piece or self.finish_reason is not None or ids:
                yield protocol.choice(self.chat, piece, self.finish_reason, True, ids, logprobs=self.take_logprobs())


async def stream(runs: list[Run | dict[str, Any]], body: Common, scheduler: Scheduler, chat: bool, model: str
                 ) -> AsyncIterator[str]:
    """Server-sent events for one or several choices (a batch, n > 1), interleaved as the engine
    commits them, each chunk naming its choice's index; an error ends the stream as its last event.
    A client that hangs up cancels this generator, which frees every slot."""
    with_usage = body.stream_options is not None and body.stream_options.include_usage
    rid, created = protocol.new_id("chatcmpl" if chat else "cmpl"), protocol.now()
    heard: asyncio.Queue[tuple[int, dict[str, Any] | APIError | None]] = asyncio.Queue()

    async def pump(index: int, run: Run | dict[str, Any]) -> None:
        try:
            if isinstance(run, dict):  # echo with max_tokens 0: the prompt scored, nothing generated
                await heard.put((index, {**run["choices"][0], "index": 0}))
            else:
                async for piece in run.pieces():
                    await heard.put((index, piece))
            await heard.put((index, None))
        except APIError as e:
            await heard.put((index, e))
        except Exception as e:  # noqa: BLE001: a bug here must end the stream, not leave it waiting
            log.exception("a stream's choice failed")
            await heard.put((index, APIError(500, f"this choice failed: {e!r}", "server_error")))

    def event(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        return f"data: {json.dumps(protocol.envelope(chat, rid, model, created, choices, True, usage, with_usage))}\n\n"

    tasks = [asyncio.ensure_future(pump(i, run)) for i, run in enumerate(runs)]
    try:
        for _ in range(len(runs)):
            while (got := await heard.get())[1] is not None:
                index, piece = got
                if isinstance(piece, APIError):
                    yield f"data: {json.dumps(piece.body)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                yield event([{**piece, "index": index}])
        if with_usage:
            yield event([], protocol.total_usage([run["usage"] if isinstance(run, dict) else run.usage()
                                                  for run in runs]))
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()
        for run in runs:
            if isinstance(run, Run):
                scheduler.cancel(run.ticket)


class BodyTooLarge(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, protocol.too_large(limit), param=None, code="body_too_large")


class Guard:
    """ASGI middleware: refuses bodies over the limit (by Content-Length, or while reading) and
    counts every response by endpoint and status. Plain ASGI, so streams and disconnects pass through."""

    def __init__(self, app: Any, max_body_bytes: int, count: Any) -> None:
        self.app, self.limit, self.count = app, max_body_bytes, count

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        received = 0

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        async def receiving() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        try:
            length = dict(scope.get("headers", [])).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.limit:
                e = BodyTooLarge(self.limit)
                await JSONResponse(e.body, status_code=413)(scope, receive, sending)
                return
            await self.app(scope, receiving, sending)
        finally:
            self.count.labels(endpoint=protocol.endpoint(scope.get("path", "")), status=str(status)).inc()
