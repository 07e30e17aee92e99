"""An OpenAI-compatible HTTP server over the batching scheduler, with a chat page at `/`.

    from gemmakit import LLM
    from gemmakit.serving.app import ServerConfig, create_app, serve_in_thread
    server = serve_in_thread(create_app(LLM(), ServerConfig()))
    # OpenAI(base_url=server.url + "/v1", api_key="unused").chat.completions.create(...)

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both with
`stream: true` as server-sent events, the way OpenAI's clients read them), `GET /health`, and
the chat page `GET /`. Errors are OpenAI's JSON: `{"error": {"message", "type", "param",
"code"}}`, with 4xx statuses for anything the client can fix.

Requests are decoded by `gemmakit.serving.scheduler.Scheduler`: concurrent requests share batches, a
full queue answers 429 and a closing server 503, and a client that disconnects cancels its
generation.

Security defaults: the server binds 127.0.0.1; `api_key` requires `Authorization: Bearer KEY`
on /v1 (compared in constant time); bodies are limited in size and must be JSON (a
`text/plain` or form body is what a cross-site page can send without a CORS preflight, as in
FastAPI's CVE-2021-32677); and on a loopback address only loopback `Host` headers are served,
so a web page cannot reach the server through DNS rebinding.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gemmakit.errors import GemmakitError
from gemmakit.formats.tokenizer import render_chat
from gemmakit.inference.sampling import SamplingParams
from gemmakit.paths import STATIC
from gemmakit.serving.scheduler import QueueFullError, Scheduler, ShuttingDownError, Ticket

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# Completions default to 16 new tokens, as OpenAI's legacy endpoint does; chat defaults to the
# room left in the context, as vLLM does.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def _flag(default, metavar: str, help: str):
    """A ServerConfig field that is also a `gemmakit serve` flag."""
    return field(default=default, metadata={"metavar": metavar, "help": help})


@dataclass
class ServerConfig:
    """Options of `gemmakit serve`; its command-line flags are generated from these fields."""

    host: str = _flag("127.0.0.1", "ADDR", "address to bind (127.0.0.1)")
    port: int = _flag(8000, "N", "port (8000)")
    api_key: str | None = _flag(
        None, "KEY", "require 'Authorization: Bearer KEY' on /v1 (default: $GEMMAKIT_API_KEY, or none)"
    )
    served_model_name: str | None = _flag(
        None, "NAME", "model name clients send and /v1/models lists (default: the model's)"
    )
    max_batch: int = _flag(8, "N", "requests decoded together at most (8)")
    max_queue: int = _flag(64, "N", "requests waiting for a batch before 429 (64)")
    max_model_len: int | None = _flag(
        None, "N", "context length served (default: the model's); lower it to bound KV-cache memory"
    )
    max_body_bytes: int = _flag(4 * 2**20, "BYTES", "request body limit in bytes (4 MiB)")
    # Not a flag: how long the scheduler waits for simultaneous requests to fill a batch.
    batch_window_s: float = field(default=0.01, metadata={"cli": False})

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise GemmakitError(f"{name.replace('_', '-')} must be at least 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise GemmakitError("max-model-len must be at least 2")
        if self.api_key is not None and not self.api_key:
            raise GemmakitError("api-key must not be empty")


# --- errors --------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered as OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_response(e: APIError):
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


# --- request bodies ------------------------------------------------------------------------


class _StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored, as vLLM does."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: int = 1
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever comes (benchmarks)


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[_Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    tools: list | None = None
    response_format: dict | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


def _parse(model_cls: type[BaseModel], data: dict):
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        msg = err["msg"] if err["type"] != "missing" else "this field is required"
        raise APIError(400, f"{param}: {msg}" if param else msg, param=param) from None


def _unsupported(req, fields: dict[str, Any]) -> None:
    """400 for an option gemmakit does not implement set to a value that would change output."""
    for name, neutral in fields.items():
        value = getattr(req, name)
        if value is not None and value not in neutral:
            raise APIError(400, f"{name}={value!r} is not supported by this server", param=name)


# --- the app -------------------------------------------------------------------------------


class _Server:
    """The handlers, bound to one model and one scheduler."""

    def __init__(self, llm, config: ServerConfig):
        self.llm, self.config = llm, config
        self.tokenizer = llm.tokenizer
        context = llm.model.config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > context:
            raise GemmakitError(
                f"max-model-len {config.max_model_len} exceeds the model's context ({context})"
            )
        self.context = config.max_model_len or context
        self.name = config.served_model_name or llm.loaded.source.name
        self.created = int(time.time())
        self._api_key = config.api_key.encode() if config.api_key else None
        self.scheduler = Scheduler(
            llm.model,
            self.tokenizer,
            llm.loaded.stop_ids,
            max_batch=config.max_batch,
            max_queue=config.max_queue,
            batch_window_s=config.batch_window_s,
        )

    # --- checks -------------------------------------------------------------------------

    def check_auth(self, request) -> None:
        if self._api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest takes time independent of where the strings differ.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._api_key):
            raise APIError(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    async def read_json(self, request) -> dict:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise APIError(415, "Content-Type must be application/json", code="unsupported_media_type")
        limit = self.config.max_body_bytes
        too_large = APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():  # also bounds chunked bodies with no length
            body += chunk
            if len(body) > limit:
                raise too_large
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        return data

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.name}'",
                param="model",
                code="model_not_found",
            )

    def sampling(
        self,
        req: _Sampling,
        max_tokens: int | None,
        prompt_lens: list[int],
        what: str,
        limit_name="max_tokens",
    ):
        """SamplingParams with max_tokens clamped to the room each prompt leaves in the context."""
        if req.n != 1:
            raise APIError(400, "n > 1 is not supported; send the request several times", param="n")
        _unsupported(req, {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},)})
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"{limit_name} must be at least 1, got {max_tokens}", param=limit_name)
        if req.seed is not None and not -(2**63) <= req.seed < 2**64:
            raise APIError(400, "seed must fit in 64 bits", param="seed")
        longest = max(prompt_lens)
        if longest >= self.context:
            raise APIError(
                400,
                f"the {what} has {longest} tokens; the model's context is {self.context} tokens "
                "(the prompt plus at least one generated token must fit)",
                param="messages" if what == "conversation" else "prompt",
                code="context_length_exceeded",
            )
        room = self.context - longest
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            return SamplingParams(
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=-1 if req.top_k is None else req.top_k,
                min_p=req.min_p or 0.0,
                seed=req.seed,
                max_tokens=room if max_tokens is None else min(max_tokens, room),
                stop=[s for s in stop if s],  # an empty stop string would end every request at once
                ignore_eos=req.ignore_eos,
            )
        except GemmakitError as e:
            param = str(e).split(" ", 1)[0]
            raise APIError(400, str(e), param=param if param in type(req).model_fields else None) from None

    def submit(self, prompts: list[list[int]], params: SamplingParams) -> Ticket:
        try:
            return self.scheduler.submit(prompts, params)
        except QueueFullError as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full") from None
        except ShuttingDownError as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None

    # --- events -------------------------------------------------------------------------

    async def events(self, request, ticket: Ticket):
        """The ticket's events; cancels the ticket when the client disconnects or stops reading."""

        async def watch():
            # Once the body is read, uvicorn's receive() returns only at disconnection.
            while (await request.receive())["type"] != "http.disconnect":
                await asyncio.sleep(0.05)  # a server that answers at once must not make this spin
            ticket.cancel()

        watcher = asyncio.create_task(watch())
        done = False
        try:
            async for event in ticket:
                yield event
            done = True
        except ShuttingDownError as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        finally:
            watcher.cancel()
            if not done:
                ticket.cancel()

    async def collect(self, request, ticket: Ticket):
        """(texts, generated token counts, finish reasons) per prompt, for non-streaming answers."""
        n = len(ticket)
        texts, tokens, reasons = [""] * n, [0] * n, [None] * n
        async for ev in self.events(request, ticket):
            texts[ev.index] += ev.delta
            tokens[ev.index] += ev.token_id is not None
            reasons[ev.index] = ev.finish_reason or reasons[ev.index]
        return texts, tokens, reasons

    @staticmethod
    def usage(ticket: Ticket, tokens: list[int]) -> dict:
        prompt = sum(ticket.prompt_tokens)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": sum(tokens),
            "total_tokens": prompt + sum(tokens),
        }

    async def sse(self, request, ticket: Ticket, first, delta_chunk, finish_chunk, usage_chunk):
        """Server-sent events: `data: {json}` per chunk, then `data: [DONE]`."""
        tokens = [0] * len(ticket)
        try:
            for chunk in first:
                yield _sse(chunk)
            async for ev in self.events(request, ticket):
                tokens[ev.index] += ev.token_id is not None
                if ev.delta:
                    yield _sse(delta_chunk(ev.index, ev.delta))
                if ev.finish_reason is not None:
                    yield _sse(finish_chunk(ev.index, ev.finish_reason))
            if usage_chunk is not None:
                yield _sse(usage_chunk(self.usage(ticket, tokens)))
        except APIError as e:  # the status line is sent already: report in the stream
            yield _sse(e.body())
        except Exception as e:  # noqa: BLE001
            yield _sse(APIError(500, f"generation failed: {e}", type="server_error").body())
        finally:
            ticket.cancel()  # a no-op once every row has finished; else the client went away
        yield "data: [DONE]\n\n"

    def streaming_response(self, body):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(body, media_type="text/event-stream", headers=headers)

    # --- endpoints ----------------------------------------------------------------------

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "gemmakit",
            "max_model_len": self.context,
        }

    async def chat_completions(self, request):
        req = _parse(ChatCompletionRequest, await self.read_json(request))
        self.check_model(req.model)
        _unsupported(req, {"logprobs": (False,), "tools": ([],)})
        if req.response_format is not None and req.response_format.get("type") != "text":
            raise APIError(400, "response_format other than text is not supported", param="response_format")
        if not req.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content}
            for m in req.messages
        ]
        try:
            ids = self.tokenizer.encode(render_chat(messages))
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        # max_completion_tokens is the newer name of max_tokens (OpenAI deprecated the latter).
        name = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        params = self.sampling(req, getattr(req, name), [len(ids)], "conversation", name)
        ticket = self.submit([ids], params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if not req.stream:
            texts, tokens, reasons = await self.collect(request, ticket)
            return {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": self.name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": texts[0]},
                        "logprobs": None,
                        "finish_reason": reasons[0],
                    }
                ],
                "usage": self.usage(ticket, tokens),
            }

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices, usage=None):
            c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.name}
            c["choices"] = choices
            if include_usage:  # OpenAI sends "usage": null on every chunk but the last
                c["usage"] = usage
            return c

        def choice(delta, finish=None):
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

        return self.streaming_response(
            self.sse(
                request,
                ticket,
                first=[chunk(choice({"role": "assistant", "content": ""}))],
                delta_chunk=lambda i, text: chunk(choice({"content": text})),
                finish_chunk=lambda i, reason: chunk(choice({}, reason)),
                usage_chunk=(lambda usage: chunk([], usage)) if include_usage else None,
            )
        )

    async def completions(self, request):
        req = _parse(CompletionRequest, await self.read_json(request))
        self.check_model(req.model)
        _unsupported(req, {"logprobs": (0,), "best_of": (1,), "suffix": ("",)})
        prompts = self.prompts(req.prompt)
        if len(prompts) > self.config.max_queue:
            raise APIError(400, f"at most {self.config.max_queue} prompts per request", param="prompt")
        ids = [p if isinstance(p, list) else self.tokenizer.encode(p) for p in prompts]
        limit = COMPLETIONS_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        params = self.sampling(req, limit, [len(i) for i in ids], "prompt")
        echoes = [
            (p if isinstance(p, str) else self.tokenizer.decode(p)) if req.echo else "" for p in prompts
        ]
        ticket = self.submit(ids, params)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = not req.stream or bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices, usage=None):
            c = {"id": rid, "object": "text_completion", "created": created, "model": self.name}
            c["choices"] = choices
            if include_usage:  # null on every streamed chunk but the last
                c["usage"] = usage
            return c

        def choice(i, text, finish=None):
            return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}

        if not req.stream:
            texts, tokens, reasons = await self.collect(request, ticket)
            choices = [choice(i, echoes[i] + t, r) for i, (t, r) in enumerate(zip(texts, reasons))]
            return chunk(choices, self.usage(ticket, tokens))

        return self.streaming_response(
            self.sse(
                request,
                ticket,
                first=[chunk([choice(i, e)]) for i, e in enumerate(echoes) if e],
                delta_chunk=lambda i, text: chunk([choice(i, text)]),
                finish_chunk=lambda i, reason: chunk([choice(i, "", reason)]),
                usage_chunk=(lambda usage: chunk([], usage)) if include_usage else None,
            )
        )

    def prompts(self, prompt) -> list[str | list[int]]:
        """The prompt field as a list of strings or token-id lists."""
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        vocab = self.tokenizer.vocab_size
        for p in prompt:
            if isinstance(p, list) and (not p or not all(0 <= t < vocab for t in p)):
                raise APIError(400, f"token-id prompts must be non-empty ids in [0, {vocab})", param="prompt")
        return list(prompt)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _HostCheck:
    """ASGI middleware: serve only requests whose Host header names an allowed host.

    A server on 127.0.0.1 is still reachable from a web page by DNS rebinding (a hostile
    name re-pointed at 127.0.0.1 makes the page same-origin); the Host header then carries
    the hostile name, so requiring a loopback name closes that door.
    """

    def __init__(self, app, allowed: tuple[str, ...]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            name = name.strip("[]").lower()
            if name not in self.allowed:
                e = APIError(400, f"Host {host!r} is not served; use http://127.0.0.1 or localhost")
                await _error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def is_loopback(host: str) -> bool:
    """Whether host (a name or an address) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(llm, config: ServerConfig | None = None):
    """The FastAPI application serving `llm` (a `gemmakit.LLM`).

    The scheduler's worker thread starts with the app's lifespan (or at the first request)
    and stops when the app shuts down; `app.state.scheduler` and `app.state.config` expose
    them.
    """
    config = config or ServerConfig()
    server = _Server(llm, config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.scheduler.start()
        yield
        await asyncio.to_thread(server.scheduler.close)

    app = FastAPI(title="gemmakit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.config, app.state.model_name = server.scheduler, config, server.name

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return _error_response(APIError(e.status_code, str(e.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        return _error_response(APIError(400, str(e.errors()[0].get("msg", e))))

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    def authorized(request: Request) -> None:
        server.check_auth(request)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])
    v1.add_api_route("/models", lambda: server.models(), methods=["GET"])

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str):
        server.check_model(model_id)
        return server.model_card()

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await server.chat_completions(request)

    @v1.post("/completions")
    async def completions(request: Request):
        return await server.completions(request)

    app.include_router(v1)

    @app.get("/health")
    async def health():
        s = server.scheduler
        body = {"status": "shutting down" if s.closing else "ok", "waiting": s.waiting, "running": s.running}
        return JSONResponse(body, status_code=503 if s.closing else 200)

    @app.get("/", include_in_schema=False)
    async def chat_page():
        # Scripts only from this origin (no inline script), so injected text cannot run.
        csp = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:"
        return FileResponse(STATIC / "chat.html", headers={"Content-Security-Policy": csp})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    if is_loopback(config.host):
        app.add_middleware(_HostCheck, allowed=LOOPBACK_NAMES)
    return app


# --- running -------------------------------------------------------------------------------


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: a free one); OSError when it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class ServerThread:
    """Runs an app under uvicorn in a background thread (for notebooks, tests and benchmarks).

    Binds before returning, so `url` is usable at once; port 0 picks a free port.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self._sock = bind_socket(host, port)
        self.host, self.port = host, self._sock.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        # Signal handlers belong to the main thread's program, not to this server.
        self.server.config.install_signal_handlers = False
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> ServerThread:
    """Starts `app` on host:port in a background thread and returns the running `ServerThread`."""
    return ServerThread(app, host, port, log_level).start()


def api_key_from_env() -> str | None:
    return os.environ.get("GEMMAKIT_API_KEY") or None


__all__ = ["APIError", "ServerConfig", "ServerThread", "create_app", "serve_in_thread"]
