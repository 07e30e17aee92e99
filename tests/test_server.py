"""`gemmakit serve`: the OpenAI API through the official client, errors, batching, cancellation.

One server runs in-process on a free localhost port for the module, over the session's
bundled model; generation is kept to a few tokens per request (the bundled model makes
~10-15 tokens/s on two shared cores).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from gemmakit.inference.api import LLM  # noqa: E402
from gemmakit.inference.sampling import SamplingParams  # noqa: E402
from gemmakit.serving.app import create_app  # noqa: E402
from gemmakit.serving.config import ServerConfig  # noqa: E402
from gemmakit.serving.transport import serve_in_thread  # noqa: E402

NAME = "gemma-test"
HI = [{"role": "user", "content": "Hi! Who are you?"}]


@pytest.fixture(scope="module")
def llm(bundled):
    return LLM(loaded=bundled)


@pytest.fixture(scope="module")
def server(llm):
    app = create_app(llm, ServerConfig(served_model_name=NAME, max_batch=8, max_queue=16))
    srv = serve_in_thread(app)
    srv.scheduler = app.state.scheduler
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(url, body, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    kw.setdefault("timeout", 120)
    return httpx.post(url, content=data, headers=headers, **kw)


def wait_for(condition, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# --- the official client ---------------------------------------------------------------


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME


def test_chat_matches_the_python_api(client, llm):
    r = client.chat.completions.create(model=NAME, messages=HI, max_tokens=5, temperature=0.8, seed=7)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    # The same template, sampling and seed through LLM.chat give the same text.
    ref = llm.chat(HI, SamplingParams(temperature=0.8, seed=7, max_tokens=5))[0]
    assert choice.message.content == ref.outputs[0].text
    assert choice.finish_reason == ref.outputs[0].finish_reason
    prompt_len = len(llm.tokenizer.encode(llm.tokenizer.apply_chat_template(HI)))
    assert r.usage.prompt_tokens == prompt_len
    assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert r.usage.total_tokens == prompt_len + r.usage.completion_tokens


def test_streaming_chat_equals_non_streaming(client):
    kw = dict(model=NAME, messages=HI, max_tokens=6, temperature=0.9, seed=11)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_framing_is_what_openai_clients_parse(server):
    body = {"model": NAME, "messages": HI, "max_tokens": 3, "seed": 1, "stream": True}
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=body, timeout=120
    ) as r:  # httpx's json= sets Content-Type
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"][0]["delta"] == {} and payloads[-1]["choices"][0]["finish_reason"]
    assert "usage" not in payloads[0]  # only with stream_options.include_usage
    assert len({p["id"] for p in payloads}) == 1


def test_completions_batch_of_prompts(client, llm):
    prompts = ["The capital of France is", "1, 2, 3, 4,"]
    r = client.completions.create(model=NAME, prompt=prompts, max_tokens=4, temperature=0)
    greedy = SamplingParams(temperature=0, max_tokens=4)
    ref = llm.generate(prompts, greedy)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [o.outputs[0].text for o in ref]
    assert r.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in ref)
    assert r.usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in ref)
    # streaming gives the same text, per choice index
    pieces = {0: "", 1: ""}
    for chunk in client.completions.create(
        model=NAME, prompt=prompts, max_tokens=4, temperature=0, stream=True
    ):
        for c in chunk.choices:
            pieces[c.index] += c.text
    assert [pieces[0], pieces[1]] == [c.text for c in r.choices]
    # echo, token-id prompts, stop strings
    ids = llm.tokenizer.encode(prompts[0])
    echoed = client.completions.create(model=NAME, prompt=ids, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == prompts[0] + r.choices[0].text
    stop = r.choices[0].text.split()[1]  # the second word of the greedy continuation
    stopped = client.completions.create(
        model=NAME, prompt=prompts[0], max_tokens=4, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == r.choices[0].text[: r.choices[0].text.index(stop)]


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status, param, code",
    [
        (b'{"model": "gemma-test", "messages": [', 400, None, "invalid_json"),
        (b'["not", "an", "object"]', 400, None, "invalid_json"),
        ({"model": "gpt-4", "messages": HI}, 404, "model", "model_not_found"),
        ({"model": NAME, "messages": HI, "max_tokens": -1}, 400, "max_tokens", None),
        ({"model": NAME, "messages": HI, "max_completion_tokens": 0}, 400, "max_completion_tokens", None),
        ({"model": NAME, "messages": HI, "temperature": -0.5}, 400, "temperature", None),
        ({"model": NAME, "messages": HI, "top_p": 0}, 400, "top_p", None),
        ({"model": NAME, "messages": HI, "n": 0}, 400, "n", None),
        ({"model": NAME, "messages": HI, "presence_penalty": 2.5}, 400, "presence_penalty", None),
        ({"model": NAME, "messages": "hello"}, 400, "messages", None),
        ({"model": NAME}, 400, "messages", None),
        ({"model": NAME, "messages": []}, 400, "messages", None),
        ({"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages", None),
        ({"model": NAME, "messages": HI * 2}, 400, "messages", None),  # roles must alternate
    ],
)
def test_bad_chat_requests_get_openai_errors(server, body, status, param, code):
    r = post(server.url + "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param and err["code"] == code


def test_bad_completion_requests(server):
    url = server.url + "/v1/completions"
    assert post(url, {"model": NAME, "prompt": [], "max_tokens": 2}).status_code == 400
    r = post(url, {"model": NAME, "prompt": [[2, 10**9]], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert post(url, {"model": NAME, "prompt": "x", "logprobs": 21}).status_code == 400  # OpenAI allows 0..20


def test_body_limits_and_content_type(server):
    url = server.url + "/v1/chat/completions"
    big = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "a" * (5 * 2**20)}]}).encode()
    r = post(url, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit must hold while reading
        for _ in range(6):
            yield b" " * 2**20

    r = httpx.post(url, content=chunked(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413
    # A form or text/plain body is what a cross-site page can post without a preflight.
    r = httpx.post(
        url, content=json.dumps({"model": NAME, "messages": HI}), headers={"content-type": "text/plain"}
    )
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_unknown_route_and_host_header(server):
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/health", headers={"host": "attacker.example:8000"})
    assert r.status_code == 400 and "Host" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health", headers={"host": "localhost:1234"}).status_code == 200


def test_server_stays_up_after_errors(server, client):
    post(server.url + "/v1/chat/completions", b"{{{")
    post(server.url + "/v1/chat/completions", {"model": "nope", "messages": HI})
    r = client.chat.completions.create(model=NAME, messages=HI, max_tokens=2, seed=3)
    assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("length", "stop")
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok"


def test_context_limits(llm):
    """A prompt past the context is a 400; prompt + max_tokens past it is clamped to the room."""
    prompt = "1, 2, 3, 4, 5,"
    n = len(llm.tokenizer.encode(prompt))
    app = create_app(llm, ServerConfig(served_model_name=NAME, max_model_len=n + 3))
    with serve_in_thread(app) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=NAME, prompt="word " * (n + 3), max_tokens=1)
        assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"
        r = c.completions.create(
            model=NAME, prompt=prompt, max_tokens=1000, temperature=0, extra_body={"ignore_eos": True}
        )
        assert r.usage.prompt_tokens == n and r.usage.completion_tokens == 3
        assert r.choices[0].finish_reason == "length"
        assert c.models.list().data[0].max_model_len == n + 3


def test_api_key(llm):
    app = create_app(llm, ServerConfig(served_model_name=NAME, api_key="s3cret"))
    with serve_in_thread(app) as srv:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(srv.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = post(
            srv.url + "/v1/chat/completions",
            {"model": NAME, "messages": HI},
            headers={"Authorization": "Bearer x"},
        )
        assert r.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list().data] == [NAME]
        assert httpx.get(srv.url + "/health").status_code == 200  # health and the page stay open
        assert httpx.get(srv.url + "/").status_code == 200


def test_queue_full_is_429_and_shutdown_is_503(llm):
    app = create_app(llm, ServerConfig(served_model_name=NAME, max_queue=1))
    scheduler = app.state.scheduler
    with serve_in_thread(app) as srv, ThreadPoolExecutor(1) as pool:
        body = {"model": NAME, "messages": HI, "max_tokens": 1}
        with scheduler.paused():
            first = pool.submit(post, srv.url + "/v1/chat/completions", body)
            wait_for(lambda: scheduler.waiting == 1, what="the first request to queue")
            r = post(srv.url + "/v1/chat/completions", body)
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert first.result().status_code == 200  # the queued one still runs
        # A stream running when the server shuts down ends with an error chunk, then [DONE].
        long = {"model": NAME, "prompt": "Once", "max_tokens": 500, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=long, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            scheduler.close()
            rest = [line for line in lines if line]
        assert json.loads(rest[-2][6:])["error"]["code"] == "shutting_down" and rest[-1] == "data: [DONE]"
        r = post(srv.url + "/v1/chat/completions", body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert httpx.get(srv.url + "/health").status_code == 503


# --- batching and cancellation ----------------------------------------------------------


def test_concurrent_requests_share_a_batch_and_seeds_do_not_depend_on_it(server, client):
    sched = server.scheduler
    requests = [
        ([{"role": "user", "content": "Tell me a story about a dragon."}], 21),
        ([{"role": "user", "content": "Hi"}], 22),
        ([{"role": "user", "content": "What is 2 + 2? Answer briefly, please, and explain."}], 23),
        ([{"role": "user", "content": "Name a colour."}], 24),
    ]

    def ask(messages, seed):
        r = client.chat.completions.create(
            model=NAME,
            messages=messages,
            max_tokens=6,
            temperature=1.0,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return r.choices[0].message.content, r.usage.completion_tokens

    sched.stats.max_batch_seen = 0
    with ThreadPoolExecutor(len(requests)) as pool, sched.paused():
        futures = [pool.submit(ask, m, s) for m, s in requests]
        wait_for(lambda: sched.waiting == len(requests), what="all requests to queue")
    together = [f.result() for f in futures]
    assert sched.stats.max_batch_seen == len(requests)  # decode steps ran them all together
    sched.stats.max_batch_seen = 0
    alone = [ask(m, s) for m, s in requests]  # each with the engine to itself
    assert sched.stats.max_batch_seen == 1
    assert together == alone
    assert all(n == 6 for _, n in together)


def test_client_disconnect_cancels_streaming_generation(server):
    sched = server.scheduler
    finished_before = len(sched.stats.finished)
    body = {
        "model": NAME,
        "prompt": "Once upon a time",
        "max_tokens": 500,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break  # one piece of text arrived: now go away
    wait_for(
        lambda: len(sched.stats.finished) > finished_before and sched.running == 0, what="the row to end"
    )
    reason, tokens = sched.stats.finished[-1]
    assert reason == "abort" and tokens < 100


def test_client_disconnect_while_queued_never_runs(server):
    sched = server.scheduler
    batches, cancelled = sched.stats.batches, sched.stats.cancelled
    body = {"model": NAME, "messages": HI, "max_tokens": 4}
    with sched.paused():
        with pytest.raises(httpx.ReadTimeout):
            post(server.url + "/v1/chat/completions", body, timeout=httpx.Timeout(60, read=1.0))
        # The disconnect frees the queue slot at once, while the scheduler is still paused.
        wait_for(lambda: sched.waiting == 0, what="the queue to empty")
        assert sched.stats.cancelled == cancelled + 1
    time.sleep(0.1)
    assert sched.stats.batches == batches and sched.stats.finished[-1] == ("abort", 0)


def test_scheduler_direct_tokens_alone_and_batched(llm):
    """Token ids (not only text) are the same alone or batched, through the scheduler itself."""
    from gemmakit.serving.scheduler import Scheduler

    sched = Scheduler(llm.model, llm.tokenizer, llm.loaded.stop_ids, max_batch=4, batch_window_s=0)
    prompts = [
        llm.tokenizer.encode(p) for p in ("Hello there", "A much longer prompt about the weather in", "x")
    ]
    params = [
        SamplingParams(temperature=1.0, top_k=50, seed=s, max_tokens=5, ignore_eos=True) for s in (1, 2, 3)
    ]

    async def run(groups, pause=False):
        # Submitted while paused, all rows are queued before the worker picks a batch.
        with sched.paused() if pause else contextlib.nullcontext():
            tickets = [sched.submit([prompts[i] for i in g], [params[i] for i in g]) for g in groups]
        out = {}
        for g, t in zip(groups, tickets):
            async for ev in t:
                if ev.token_id is not None:
                    out.setdefault(g[ev.index], []).append(ev.token_id)
        return out

    try:
        batched = asyncio.run(run([[0], [1, 2]], pause=True))  # two tickets, one batch of three
        alone = {i: asyncio.run(run([[i]]))[i] for i in range(3)}
    finally:
        sched.close()
    # The first token comes from the prefill, the other four from decode steps of all rows.
    assert list(sched.stats.batch_sizes) == [3] * 4 + [1] * 12
    assert batched == alone and all(len(v) == 5 for v in alone.values())


def test_a_short_request_does_not_wait_for_a_long_one(server):
    """Continuous batching: a 4-token request sent while a 200-token one streams joins the
    running batch and ends while the long one has produced only a few more tokens."""
    sched = server.scheduler
    long = {
        "model": NAME,
        "prompt": "Once upon a time",
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    short = {"model": NAME, "prompt": "Hello", "max_tokens": 4, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=long, timeout=120) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data: {"))
        for _ in range(3):  # the long request is generating
            next(lines)
        generated_before = sched.stats.generated_tokens
        answer = post(server.url + "/v1/completions", short)
        during = sched.stats.generated_tokens - generated_before
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
    # The short request's 4 tokens and the long one's tokens from the same steps: far fewer
    # than the long one's remaining ~197.
    assert during < 30
    wait_for(lambda: sched.running == 0, what="the long request to be cancelled")
    assert sched.stats.time_to_first_token and sched.stats.prompt_tokens > 0


def test_prompt_over_max_model_len_is_a_400(llm):
    app = create_app(llm, ServerConfig(served_model_name=NAME, max_num_seqs=2, max_model_len=32))
    with serve_in_thread(app) as srv:
        r = post(srv.url + "/v1/completions", {"model": NAME, "prompt": "word " * 40, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = post(srv.url + "/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 100})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 30


@pytest.mark.slow
def test_streams_with_random_disconnects_leave_no_slot_and_no_memory_behind(tmp_path):
    """1,024 requests, 64 concurrent streams at a time, a third of them hanging up mid-stream
    (a tiny model, so that the serving machinery is what runs): every other stream ends with
    [DONE] and no error, every slot is free after each round, and the process's memory after
    the last round is what it was after the second."""
    from tests.test_training import tiny_model_folder

    def rss() -> int:  # resident bytes of this process (Linux)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    llm = LLM(model=str(tiny_model_folder(tmp_path)), dtype="float32", device="cpu")
    config = ServerConfig(served_model_name=NAME, max_num_seqs=16, max_queue=256, max_model_len=256)
    app = create_app(llm, config)
    sched = app.state.scheduler

    async def one(client, url, i):
        body = {
            "model": NAME,
            "prompt": f"Story {i}:",
            "max_tokens": 6 + i % 8,
            "ignore_eos": True,
            "stream": True,
        }
        hang_up_after = 1 + i % 4 if i % 3 == 0 else None
        chunks = 0
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    return "done"
                if line.startswith("data: "):
                    assert "error" not in json.loads(line[6:])
                    chunks += 1
                    if chunks == hang_up_after:
                        return "hung up"
        return "no [DONE]"

    async def round_(url):
        limits = httpx.Limits(max_connections=80)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, url, i) for i in range(64)))

    sizes = []
    with serve_in_thread(app) as srv:
        for _ in range(16):
            outcomes = asyncio.run(round_(srv.url))
            # (a stream whose text came in fewer chunks than its hang-up point ends first)
            assert set(outcomes) <= {"hung up", "done"} and outcomes.count("done") >= 42, outcomes
            wait_for(lambda: sched.running == 0 and sched.waiting == 0, what="every row to end")
            engine = sched.engine
            assert engine.free_slots == engine.slots and not engine.running and not engine.waiting
            sizes.append(rss())
    assert sched.stats.cancelled >= 16 * 10  # hang-ups that came before the row's last token
    assert sizes[-1] - sizes[1] < 32 * 2**20, sizes


# --- the load test, small ---------------------------------------------------------------


def _load_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_small_load_all_clients_complete(server):
    serve_load = _load_module()
    sched = server.scheduler
    sched.stats.max_batch_seen = 0
    run = asyncio.run(serve_load.run_load(server.url, clients=8, max_tokens=4, model=NAME, server="gk"))
    assert run.errors == 0, [r.error for r in run.results if r.error]
    assert all(r.tokens == 4 and r.text and r.ttft is not None for r in run.results)
    assert run.tokens == 32
    assert sched.stats.max_batch_seen >= 2  # concurrent clients were decoded together
    summary = run.summary()
    assert summary["clients"] == 8 and summary["ttft_p50_s"] <= summary["ttft_p95_s"]
    assert serve_load.table([run]).splitlines()[2].startswith("| gk ")
    assert serve_load.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


# --- the command ---------------------------------------------------------------------------


def test_serve_command_flags_and_user_errors(capsys):
    from gemmakit.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--adapter", "--quantize", "--host", "--port", "--api-key", "--max-num-seqs"):
        assert flag in out
    assert "--max-queue" in out and "--served-model-name" in out and "--max-model-len" in out
    assert main(["serve", "--max-num-seqs", "0"]) == 2
    assert "max-num-seqs must be at least 1" in capsys.readouterr().err
    with socket.socket() as taken:  # the port is checked before the model loads
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gemmakit serve: error: cannot listen on 127.0.0.1:") and "Traceback" not in err


def test_stop_strings_end_requests_as_the_python_api_does(client, llm):
    """The server and `LLM` share one finish path: same text, same finish reason."""
    prompt = "The capital of France is"
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6))[0].outputs[0].text
    stop = full.split()[1]
    ref = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, stop=[stop]))[0].outputs[0]
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, stop=[stop])
    assert (
        (r.choices[0].text, r.choices[0].finish_reason)
        == (ref.text, ref.finish_reason)
        == (
            full[: full.index(stop)],
            "stop",
        )
    )
