"""An OpenAI-compatible HTTP server over the batching scheduler, with a chat page at `/`.

    from gemmakit import LLM
    from gemmakit.serving.app import create_app
    from gemmakit.serving.config import ServerConfig
    from gemmakit.serving.transport import serve_in_thread
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
import json
import time
import uuid

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from gemmakit.errors import ContextLengthError, GemmakitError
from gemmakit.inference.batching import fitting_capacity
from gemmakit.inference.engine import check_length
from gemmakit.inference.sampling import SamplingParams
from gemmakit.paths import STATIC
from gemmakit.serving.config import ServerConfig
from gemmakit.serving.scheduler import QueueFullError, Scheduler, ShuttingDownError, Ticket
from gemmakit.serving.schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    error_response,
    parse,
    unsupported,
)
from gemmakit.serving.transport import LOOPBACK_NAMES, HostCheck, is_loopback

# Completions default to 16 new tokens, as OpenAI's legacy endpoint does; chat defaults to the
# room left in the context, as vLLM does.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


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
        model = llm.model
        self.context = config.max_model_len or fitting_capacity(model.config, model.dtype, config.max_num_seqs)
        self.name = config.served_model_name or llm.loaded.source.name
        self.created = int(time.time())
        self._api_key = config.api_key.encode() if config.api_key else None
        self.scheduler = Scheduler(
            llm.model,
            self.tokenizer,
            llm.loaded.stop_ids,
            max_batch=config.max_num_seqs,
            max_queue=config.max_queue,
            batch_window_s=config.batch_window_s,
            max_model_len=self.context,
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
        except RecursionError:  # Python's parser recurses once per nesting level
            raise APIError(400, "the body's JSON is nested too deeply", code="invalid_json") from None
        try:
            # A `\ud800` escape parses to a lone surrogate, which no tokenizer or UTF-8 answer
            # can hold; re-encoding the parsed body finds one anywhere in it.
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(
                400, "the body holds a lone UTF-16 surrogate (\\ud800-\\udfff)", code="invalid_json"
            ) from None
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
        req: SamplingFields,
        max_tokens: int | None,
        prompt_lens: list[int],
        what: str,
        limit_name="max_tokens",
    ):
        """SamplingParams with max_tokens clamped to the room each prompt leaves in the context."""
        if req.n != 1:
            raise APIError(400, "n > 1 is not supported; send the request several times", param="n")
        unsupported(req, {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},)})
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"{limit_name} must be at least 1, got {max_tokens}", param=limit_name)
        if req.seed is not None and not -(2**63) <= req.seed < 2**64:
            raise APIError(400, "seed must fit in 64 bits", param="seed")
        try:
            max_tokens = check_length(max(prompt_lens), max_tokens, self.context, what)
        except ContextLengthError as e:
            param = "messages" if what == "conversation" else "prompt"
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            return SamplingParams(
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=-1 if req.top_k is None else req.top_k,
                min_p=req.min_p or 0.0,
                seed=req.seed,
                max_tokens=max_tokens,
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
        req = parse(ChatCompletionRequest, await self.read_json(request))
        self.check_model(req.model)
        unsupported(req, {"logprobs": (False,), "tools": ([],)})
        if req.response_format is not None and req.response_format.get("type") != "text":
            raise APIError(400, "response_format other than text is not supported", param="response_format")
        if not req.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content}
            for m in req.messages
        ]
        try:
            ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(messages))
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
        req = parse(CompletionRequest, await self.read_json(request))
        self.check_model(req.model)
        unsupported(req, {"logprobs": (0,), "best_of": (1,), "suffix": ("",)})
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
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return error_response(APIError(e.status_code, str(e.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        return error_response(APIError(400, str(e.errors()[0].get("msg", e))))

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

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
        app.add_middleware(HostCheck, allowed=LOOPBACK_NAMES)
    return app
