"""An OpenAI-compatible HTTP server over the batching scheduler, with a chat page at `/`.

    from gemmakit import LLM
    from gemmakit.serving.app import create_app
    from gemmakit.serving.config import ServerConfig
    from gemmakit.serving.transport import serve_in_thread
    server = serve_in_thread(create_app(LLM(), ServerConfig()))
    # OpenAI(base_url=server.url + "/v1", api_key="unused").chat.completions.create(...)

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both with
`stream: true` as server-sent events, the way OpenAI's clients read them; `n`, log-probabilities,
penalties, `logit_bias`, `response_format` and `tools`), `GET /health`, `GET /metrics`
(Prometheus) and the chat page `GET /`. Errors are OpenAI's JSON: `{"error": {"message", "type", "param",
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
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from gemmakit.errors import ContextLengthError, GemmakitError
from gemmakit.inference.batching import fitting_capacity
from gemmakit.inference.engine import check_length
from gemmakit.inference.grammar import check_schema
from gemmakit.inference.sampling import SamplingParams
from gemmakit.lora import multi
from gemmakit.paths import STATIC
from gemmakit.serving import responses
from gemmakit.serving.config import ServerConfig
from gemmakit.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gemmakit.serving.metrics import Metrics
from gemmakit.serving.responses import Choice
from gemmakit.serving.scheduler import QueueFullError, Scheduler, ShuttingDownError, Ticket
from gemmakit.serving.schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    error_response,
    parse,
    response_schema,
    unsupported,
)
from gemmakit.serving.tools import render_prompt, tool_plan
from gemmakit.serving.transport import LOOPBACK_NAMES, HostCheck, ServerErrors, is_loopback

# Completions default to 16 new tokens, as OpenAI's legacy endpoint does; chat defaults to the
# room left in the context, as vLLM does.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# A request's speculative_config.method -> SamplingParams.speculative, on every server;
# "draft_model" and "mtp" too where the server was given a --draft-model.
SERVED_SPECULATION = {"ngram": "ngram"}


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
        self.context = config.max_model_len or fitting_capacity(
            model.config, model.dtype, config.max_num_seqs
        )
        self.name = config.served_model_name or llm.loaded.source.name
        # LoRA adapters attached before the app was made (`gemmakit serve --lora NAME=DIR`).
        self.adapters = multi.adapter_names(llm.model)
        if self.name in self.adapters:
            raise GemmakitError(f"a LoRA adapter is named {self.name!r}, as the served model is")
        self.created = int(time.time())
        self._api_key = config.api_key.encode() if config.api_key else None
        self.draining = False
        draft, assistant = getattr(llm, "draft", None), getattr(llm, "assistant", None)
        self.scheduler = Scheduler(
            llm.model,
            self.tokenizer,
            llm.loaded.stop_ids,
            max_batch=config.max_num_seqs,
            max_queue=config.max_queue,
            batch_window_s=config.batch_window_s,
            max_model_len=self.context,
            draft=assistant or (draft.model if draft is not None else None),
        )
        # speculative_config.method -> SamplingParams.speculative, for what this server has.
        self.speculation = dict(SERVED_SPECULATION)
        if draft is not None:
            self.speculation["draft_model"] = "draft"
        if assistant is not None:
            self.speculation["mtp"] = "mtp"

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

    def check_model(self, model: str | None) -> str | None:
        """The LoRA adapter a request's `model` names (vLLM's convention), None for the base."""
        if model is None or model == self.name:
            return None
        if model in self.adapters:
            return model
        served = ", ".join(f"'{n}'" for n in [self.name, *self.adapters])
        raise APIError(
            404,
            f"The model '{model}' does not exist; this server serves {served}",
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
        logprobs: int | None = None,
        json_schema: dict | None = None,
    ):
        """SamplingParams with max_tokens clamped to the room each prompt leaves in the context."""
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
        spec = req.speculative_config
        if spec is not None and spec.method not in self.speculation:
            raise APIError(
                400, f"speculative_config.method {spec.method!r} is not available on this server "
                f"(it runs {', '.join(self.speculation)})", param="speculative_config",
            )  # fmt: skip
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
                n=req.n,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                logit_bias=self.logit_bias(req.logit_bias),
                logprobs=logprobs,
                json_schema=json_schema,
                speculative=None if spec is None else self.speculation[spec.method],
                num_speculative_tokens=8 if spec is None else spec.num_speculative_tokens,
            )
        except GemmakitError as e:
            param = str(e).split(" ", 1)[0].split("[", 1)[0]
            raise APIError(400, str(e), param=param if param in type(req).model_fields else None) from None

    def logit_bias(self, bias: dict[str, float] | None) -> dict[int, float]:
        """OpenAI's logit_bias (JSON keys are strings) as token id -> bias."""
        out = {}
        for key, value in (bias or {}).items():
            if not key.isdigit() or int(key) >= self.tokenizer.vocab_size:
                raise APIError(
                    400, f"logit_bias keys must be token ids in [0, {self.tokenizer.vocab_size}), got {key!r}",
                    param="logit_bias",
                )  # fmt: skip
            out[int(key)] = value
        return out

    def submit(self, prompts: list[list[int]], params: SamplingParams, adapter: str | None) -> Ticket:
        """Queues `params.n` rows per prompt (row p * n + j is completion j of prompt p), run
        with LoRA adapter `adapter` (None: the base)."""
        if self.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        rows = [p for p in prompts for _ in range(params.n)]
        if len(rows) > self.config.max_queue:
            raise APIError(400, f"at most {self.config.max_queue} completions per request", param="n")
        try:
            return self.scheduler.submit(rows, params.expand_n() * len(prompts), adapter=adapter)
        except QueueFullError as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full") from None
        except ShuttingDownError as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None

    async def drain(self, grace_s: float) -> None:
        """Stops taking requests, lets the running and queued ones finish for up to `grace_s`
        seconds, then closes the scheduler: what still runs ends with `ShuttingDownError`,
        which a stream reports as the 503 error event followed by `[DONE]`."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        s = self.scheduler
        while (s.running or s.waiting) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(s.close)

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

    async def collect(self, request, ticket: Ticket) -> list[Choice]:
        """Every row's whole completion, for non-streaming answers."""
        choices = [Choice() for _ in range(len(ticket))]
        async for ev in self.events(request, ticket):
            choices[ev.index].add(ev)
        return choices

    async def sse(self, request, ticket: Ticket, n: int, first, event_chunks, usage_chunk):
        """Server-sent events: `data: {json}` per chunk, then `data: [DONE]`.

        `event_chunks(event, choice)` gives the chunks of one event, after `choice` (that
        row's `Choice`) has taken it in; `usage_chunk(usage)` the last chunk, or None.
        """
        choices = [Choice() for _ in range(len(ticket))]
        try:
            for chunk in first:
                yield _sse(chunk)
            async for ev in self.events(request, ticket):
                choices[ev.index].add(ev)
                for chunk in event_chunks(ev, choices[ev.index]):
                    yield _sse(chunk)
            if usage_chunk is not None:
                yield _sse(usage_chunk(responses.usage(ticket.prompt_tokens, n, choices, ticket.requests)))
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
        return {"object": "list", "data": [self.model_card(n) for n in [None, *self.adapters]]}

    def model_card(self, adapter: str | None = None) -> dict:
        """The base model's card, or an adapter's (with `parent`, as vLLM lists LoRA modules)."""
        card = {
            "id": adapter or self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "gemmakit",
            "max_model_len": self.context,
        }
        return card | ({"parent": self.name} if adapter else {})

    def chat_logprobs(self, req: ChatCompletionRequest) -> int | None:
        """Chat's `logprobs: true` + `top_logprobs: k` as the engine's k (None: none)."""
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (req.top_logprobs or 0) if req.logprobs else None

    async def chat_completions(self, request):
        req = parse(ChatCompletionRequest, await self.read_json(request))
        adapter = self.check_model(req.model)
        model_name = adapter or self.name
        if not req.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        plan = tool_plan(req.tools, req.tool_choice)
        schema = plan.schema if plan.schema is not None else response_schema(req.response_format)
        if plan.schema is not None:
            try:  # here, not in the worker: a schema that cannot compile is this request's error
                check_schema(plan.schema)
            except GemmakitError as e:
                raise APIError(400, f"a function's parameters: {e}", param="tools") from None
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            ids = self.tokenizer.encode(render_prompt(self.tokenizer, messages, plan))
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        # max_completion_tokens is the newer name of max_tokens (OpenAI deprecated the latter).
        name = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        logprobs = self.chat_logprobs(req)
        params = self.sampling(req, getattr(req, name), [len(ids)], "conversation", name, logprobs, schema)
        ticket = self.submit([ids], params, adapter)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        tok = self.tokenizer

        def message_of(c: Choice) -> tuple[dict, str | None]:
            """The assistant message and finish reason of a finished choice."""
            calls = plan.parse(c.text, self.tokenizer, c.token_ids) if c.finish_reason == "stop" else None
            if calls:
                return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
            return {"role": "assistant", "content": c.text}, c.finish_reason

        if not req.stream:
            choices = await self.collect(request, ticket)
            out = []
            for i, c in enumerate(choices):
                message, finish = message_of(c)
                lp = responses.chat_logprobs(tok, c.logprobs) if logprobs is not None else None
                out.append({"index": i, "message": message, "logprobs": lp, "finish_reason": finish})
            return {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model_name,
                "choices": out,
                "usage": responses.usage(ticket.prompt_tokens, params.n, choices, ticket.requests),
            }

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices, usage=None):
            c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}
            c["choices"] = choices
            if include_usage:  # OpenAI sends "usage": null on every chunk but the last
                c["usage"] = usage
            return c

        def choice(i, delta, finish=None, lps=None):
            lp = responses.chat_logprobs(tok, lps) if lps else None
            return [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]

        held = set(range(len(ticket))) if plan.buffered else set()  # choices that may be a call

        def event_chunks(ev, c: Choice):
            lps = [ev.logprob] if ev.logprob is not None else None
            if ev.index in held and not plan.holds(c.text):  # not a call after all: stream it
                held.discard(ev.index)
                if c.text or lps:
                    yield chunk(choice(ev.index, {"content": c.text}, lps=lps))
            elif ev.index in held:
                if lps:
                    yield chunk(choice(ev.index, {}, lps=lps))
            elif ev.delta or lps:
                yield chunk(choice(ev.index, {"content": ev.delta}, lps=lps))
            if ev.finish_reason is not None:
                message, finish = message_of(c)
                if ev.index in held and message.get("tool_calls"):
                    calls = [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]
                    yield chunk(choice(ev.index, {"tool_calls": calls}))
                elif ev.index in held and c.text:
                    yield chunk(choice(ev.index, {"content": c.text}))
                yield chunk(choice(ev.index, {}, finish))

        first = [chunk(choice(i, {"role": "assistant", "content": ""})) for i in range(len(ticket))]
        return self.streaming_response(
            self.sse(
                request,
                ticket,
                params.n,
                first=first,
                event_chunks=event_chunks,
                usage_chunk=(lambda usage: chunk([], usage)) if include_usage else None,
            )
        )

    async def completions(self, request):
        req = parse(CompletionRequest, await self.read_json(request))
        adapter = self.check_model(req.model)
        model_name = adapter or self.name
        unsupported(req, {"best_of": (1,), "suffix": ("",)})
        prompts = self.prompts(req.prompt)
        if len(prompts) > self.config.max_queue:
            raise APIError(400, f"at most {self.config.max_queue} prompts per request", param="prompt")
        ids = [p if isinstance(p, list) else self.tokenizer.encode(p) for p in prompts]
        limit = COMPLETIONS_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        params = self.sampling(req, limit, [len(i) for i in ids], "prompt", logprobs=req.logprobs)
        n = params.n
        echoes = [
            (p if isinstance(p, str) else self.tokenizer.decode(p)) if req.echo else "" for p in prompts
        ]
        echoes = [e for e in echoes for _ in range(n)]  # one per choice: row p * n + j
        ticket = self.submit(ids, params, adapter)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = not req.stream or bool(req.stream_options and req.stream_options.include_usage)
        tok = self.tokenizer

        def chunk(choices, usage=None):
            c = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
            c["choices"] = choices
            if include_usage:  # null on every streamed chunk but the last
                c["usage"] = usage
            return c

        def choice(i, text, finish=None, lps=None, offset=0):
            lp = responses.completion_logprobs(tok, lps, offset) if lps is not None else None
            return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}

        if not req.stream:
            choices = await self.collect(request, ticket)
            out = [
                choice(i, echoes[i] + c.text, c.finish_reason, c.logprobs if req.logprobs is not None else None,
                       len(echoes[i]))
                for i, c in enumerate(choices)
            ]  # fmt: skip
            return chunk(out, responses.usage(ticket.prompt_tokens, n, choices, ticket.requests))

        sent = list(map(len, echoes))  # characters of each choice already streamed

        def event_chunks(ev, c: Choice):
            lps = [ev.logprob] if ev.logprob is not None and req.logprobs is not None else None
            if ev.delta or lps:
                yield chunk([choice(ev.index, ev.delta, lps=lps, offset=sent[ev.index])])
                sent[ev.index] += len(ev.delta)
            if ev.finish_reason is not None:
                yield chunk([choice(ev.index, "", ev.finish_reason)])

        return self.streaming_response(
            self.sse(
                request,
                ticket,
                n,
                first=[chunk([choice(i, e)]) for i, e in enumerate(echoes) if e],
                event_chunks=event_chunks,
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
    app.state.drain = server.drain  # run by transport.build_server's shutdown

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return error_response(APIError(e.status_code, str(e.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        return error_response(APIError(400, str(e.errors()[0].get("msg", e))))

    def authorized(request: Request) -> None:
        server.check_auth(request)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])
    v1.add_api_route("/models", lambda: server.models(), methods=["GET"])

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str):
        return server.model_card(server.check_model(model_id))

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

    metrics = Metrics(server.scheduler, server.name)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        # Outside /v1 and its API key, as vLLM serves it: scrapers carry no OpenAI key.
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def chat_page():
        # Scripts only from this origin (no inline script), so injected text cannot run.
        csp = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:"
        return FileResponse(STATIC / "chat.html", headers={"Content-Security-Policy": csp})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    app.add_middleware(ServerErrors)  # a 500 keeps the keep-alive connection
    if is_loopback(config.host):
        app.add_middleware(HostCheck, allowed=LOOPBACK_NAMES)
    return app
