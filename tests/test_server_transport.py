"""The server's transport: several LoRA adapters in one batch, connection limits and idle
timeouts, 500s that keep the connection, and a graceful SIGTERM (real servers over loopback)."""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402

from gemmakit.commands.serve import lora_specs  # noqa: E402
from gemmakit.errors import GemmakitError  # noqa: E402
from gemmakit.inference.api import LLM  # noqa: E402
from gemmakit.lora import multi  # noqa: E402
from gemmakit.serving.app import create_app  # noqa: E402
from gemmakit.serving.config import ServerConfig  # noqa: E402
from gemmakit.serving.connections import (  # noqa: E402
    RateLimitedResourceErrors,
    default_max_connections,
)
from gemmakit.serving.transport import serve_in_thread  # noqa: E402
from tests.conftest import random_hf_model, save_random_adapter  # noqa: E402
from tests.test_training import write_tiny_tokenizer  # noqa: E402

PROMPT = [2, 17, 99, 3, 50, 31, 7]  # token ids (the tiny vocabulary has 102): no tokenizer subtleties


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, {adapter name: folder}) for a tiny random Gemma 3 with two adapters."""
    root = tmp_path_factory.mktemp("transport")
    folder = root / "tiny"
    # The vocabulary of the tiny tokenizer, so that every generated token has text.
    random_hf_model("gemma3", vocab_size=102).save_pretrained(folder)
    write_tiny_tokenizer(folder)
    base = LLM(model=str(folder), dtype="float32", device="cpu").model
    adapters = {}
    for i, (name, targets) in enumerate([("poet", ("q_proj", "v_proj")), ("coder", ("down_proj", "o_proj"))]):
        adapters[name] = root / name
        save_random_adapter(base, adapters[name], seed=i, scale=0.3, r=4 + 4 * i, alpha=8, targets=targets)
    return folder, adapters


def tiny_llm(folder, adapter=None):
    return LLM(model=str(folder), dtype="float32", device="cpu", adapter=adapter and str(adapter))


def complete(url, model, max_tokens=8):
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


# --- several LoRA adapters ------------------------------------------------------------------


def test_two_adapters_and_the_base_in_one_batch_equal_each_served_alone(tiny):
    folder, adapters = tiny
    llm = tiny_llm(folder)
    for name, path in adapters.items():
        multi.attach(llm.model, name, path)
    srv = serve_in_thread(create_app(llm, ServerConfig(served_model_name="tiny")))
    try:
        models = httpx.get(srv.url + "/v1/models").json()["data"]
        assert [(m["id"], m.get("parent")) for m in models] == [
            ("tiny", None),
            ("poet", "tiny"),
            ("coder", "tiny"),
        ]
        assert httpx.get(srv.url + "/v1/models/coder").json()["parent"] == "tiny"
        missing = httpx.post(srv.url + "/v1/completions", json={"model": "nope", "prompt": "hi"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        scheduler = srv.app.state.scheduler
        names = ["poet", "tiny", "coder"]
        with ThreadPoolExecutor(3) as pool, scheduler.paused():
            futures = [pool.submit(complete, srv.url, n) for n in names]
            deadline = time.monotonic() + 30
            while scheduler.waiting < 3:  # all three queued: they start as one batch
                assert time.monotonic() < deadline, "requests did not arrive"
                time.sleep(0.01)
        together = {n: f.result() for n, f in zip(names, futures)}
        assert scheduler.stats.max_batch_seen == 3  # the three rows ran side by side
    finally:
        srv.stop()
    assert {n: r["model"] for n, r in together.items()} == {n: n for n in names}
    texts = {n: r["choices"][0]["text"] for n, r in together.items()}
    assert len(set(texts.values())) == 3, texts  # the adapters change the output
    for name in names:
        alone = serve_in_thread(create_app(tiny_llm(folder, adapters.get(name)), ServerConfig()))
        try:
            assert complete(alone.url, None)["choices"][0]["text"] == texts[name], name
        finally:
            alone.stop()


def test_lora_flag_values():
    assert lora_specs(["a=/x/one", "/y/two/", "three"]) == {
        "a": Path("/x/one"),
        "two": Path("/y/two/"),
        "three": Path("three"),
    }
    with pytest.raises(GemmakitError, match="two adapters named 'a'"):
        lora_specs(["a=/x", "a=/y"])


def test_serve_cli_refuses_adapter_mistakes_in_one_line(tmp_path, capsys):
    from gemmakit.cli import main

    assert main(["serve", "--port", "0", "--lora", f"x={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err
    assert "no such adapter folder" in err and err.count("\n") == 1, err
    assert main(["serve", "--port", "0", "--lora", str(tmp_path), "--adapter", str(tmp_path)]) == 2
    assert "--adapter" in capsys.readouterr().err


# --- connections: cap, idle and header timeouts ----------------------------------------------


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.fixture
def limited(tiny):
    config = ServerConfig(served_model_name="tiny", max_connections=4, idle_timeout_s=1.0)
    srv = serve_in_thread(create_app(tiny_llm(tiny[0]), config))
    yield srv
    srv.stop()


def test_idle_sockets_cannot_starve_health_and_are_closed(limited):
    idle = [socket.create_connection(("127.0.0.1", limited.port)) for _ in range(12)]
    partial = socket.create_connection(("127.0.0.1", limited.port))
    partial.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finished
    try:
        time.sleep(0.2)
        assert len(limited.server.server_state.connections) <= 4
        # A new connection displaces the longest-idle one, so /health still answers.
        assert httpx.get(limited.url + "/health", timeout=5).status_code == 200
        # Idle and half-sent connections are closed after idle_timeout_s (1 s).
        assert closed_by_peer(partial, 3.0)
        assert all(closed_by_peer(s, 3.0) for s in idle)
        assert len(limited.server.server_state.connections) == 0
    finally:
        for s in [*idle, partial]:
            s.close()


def test_keep_alive_connection_is_closed_after_the_idle_timeout(limited):
    conn = http.client.HTTPConnection("127.0.0.1", limited.port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().read() and conn.sock is not None
    assert not closed_by_peer(conn.sock, 0.5)  # still open well inside the timeout
    assert closed_by_peer(conn.sock, 3.0)
    conn.close()


def test_busy_connections_at_the_cap_get_503(limited):
    scheduler = limited.app.state.scheduler
    with ThreadPoolExecutor(4) as pool, scheduler.paused():
        futures = [pool.submit(complete, limited.url, "tiny", 2) for _ in range(4)]
        deadline = time.monotonic() + 30
        while scheduler.waiting < 4:  # four connections inside a request
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = httpx.get(limited.url + "/health", timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "too_many_connections"
    assert all(f.result()["choices"][0]["finish_reason"] == "length" for f in futures)


def test_default_connection_cap_leaves_room_under_the_fd_limit():
    assert default_max_connections(1024) == 1024 - 64
    assert default_max_connections(100) == 75
    assert default_max_connections(10**6) == 4096


def test_descriptor_errors_are_logged_once_per_interval_with_a_count():
    now = [0.0]
    limiter = RateLimitedResourceErrors(interval_s=10.0, clock=lambda: now[0])
    emfile = OSError(24, "Too many open files")

    def record():
        r = logging.LogRecord(
            "asyncio", logging.ERROR, "x", 1, "socket.accept() out of system resource", (), None
        )
        r.exc_info = (OSError, emfile, None)
        return r

    first = record()
    assert limiter.filter(first) and first.exc_info is None
    assert first.getMessage() == "socket.accept() out of system resource: Too many open files"
    assert not any(limiter.filter(record()) for _ in range(500))
    now[0] = 10.5
    later = record()
    assert limiter.filter(later) and "(500 more in the last 10 s)" in later.getMessage()
    other = logging.LogRecord("asyncio", logging.ERROR, "x", 1, "something else", (), None)
    assert limiter.filter(other) and other.getMessage() == "something else"


# --- a 500 keeps the keep-alive connection ---------------------------------------------------


class ExplodingTokenizer:
    """The tiny tokenizer, except that a chat saying "boom" fails inside the server."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def apply_chat_template(self, messages, *args, **kw):
        if messages[-1]["content"] == "boom":
            raise RuntimeError("kaboom")
        return self._tokenizer.apply_chat_template(messages, *args, **kw)


def test_a_server_error_keeps_the_connection(tiny, caplog):
    llm = tiny_llm(tiny[0])
    broken = types.SimpleNamespace(
        model=llm.model, tokenizer=ExplodingTokenizer(llm.tokenizer), loaded=llm.loaded
    )
    srv = serve_in_thread(create_app(broken, ServerConfig()))
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    try:

        def chat(content):
            body = json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 2})
            conn.request(
                "POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"}
            )
            r = conn.getresponse()
            return r.status, json.loads(r.read()), r.getheader("connection")

        status, body, connection = chat("boom")
        assert (
            status == 500 and body["error"]["type"] == "server_error" and "kaboom" in body["error"]["message"]
        )
        assert connection != "close"
        sock = conn.sock
        status, body, _ = chat("hello")
        assert status == 200 and body["choices"][0]["finish_reason"] in ("length", "stop")
        assert conn.sock is sock  # the same connection, not a silent reconnect
    finally:
        conn.close()
        srv.stop()


# --- shutdown -------------------------------------------------------------------------------


def sse_events(response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def test_stop_drains_a_running_stream_to_completion(tiny):
    srv = serve_in_thread(create_app(tiny_llm(tiny[0]), ServerConfig(shutdown_grace_s=30)))
    body = {"prompt": PROMPT, "max_tokens": 60, "temperature": 0, "ignore_eos": True, "stream": True}
    stopper = None
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
        events = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if stopper is None:  # the first chunk is out: stop the server mid-stream
                    stopper = threading.Thread(target=srv.stop)
                    stopper.start()
    stopper.join(30)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "error" not in chunks[-1] and chunks[-1]["choices"][0]["finish_reason"] == "length"


def serve_and_sigterm(tmp_path, flags: list[str], body: dict, after_events: int = 3):
    """Runs `gemmakit serve FLAGS` (this checkout's), streams `body` from it, sends SIGTERM
    after `after_events` events; returns (the stream's data payloads, the server's log, exit code)."""
    root = str(Path(__file__).resolve().parents[1])  # this checkout, whatever is installed
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": root}
    cmd = [sys.executable, "-c", "import sys; from gemmakit.cli import main; sys.exit(main())", "serve"]
    cmd += ["--port", "0", "--log-level", "info", *flags]
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stderr=log, stdout=log, env=env)
    try:
        url, deadline = None, time.monotonic() + 120
        while url is None:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            m = re.search(r" at (http://127\.0\.0\.1:\d+)", log_path.read_text())
            url = m and m.group(1)
            time.sleep(0.1)
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body | {"stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    if len(events) == after_events:
                        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return events, log_path.read_text(), code


def test_sigterm_ends_a_stream_properly(tmp_path, tiny):
    """A real `gemmakit serve` (tiny model, no grace) gets SIGTERM while a stream runs: the
    stream ends with [DONE] after either its finish or the 503 event; the log stays clean."""
    body = {"prompt": PROMPT, "max_tokens": 240, "temperature": 0, "ignore_eos": True}
    events, log, code = serve_and_sigterm(
        tmp_path, ["--model", str(tiny[0]), "--shutdown-grace-s", "0"], body
    )
    assert events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    assert last.get("error", {}).get("code") == "shutting_down" or last["choices"][0]["finish_reason"], last
    assert "Traceback" not in log and "CancelledError" not in log, log
    assert "Finished server process" in log and code in (0, -signal.SIGTERM), (code, log)


@pytest.mark.slow  # loads the bundled model in a subprocess (~30 s on two shared cores)
def test_sigterm_ends_open_streams_with_503_and_done(tmp_path):
    """The bundled model is slow enough that a 400-token stream is still running after the
    1 s grace: it must end with the 503 event and [DONE]."""
    body = {"prompt": "Count to 500:", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    events, log, _ = serve_and_sigterm(tmp_path, ["--shutdown-grace-s", "1"], body)
    assert events[-1] == "[DONE]", events[-3:]
    assert json.loads(events[-2])["error"]["code"] == "shutting_down", events[-2]
    assert "Traceback" not in log and "CancelledError" not in log, log


@pytest.mark.slow  # a real server under a 100-descriptor limit (~15 s)
def test_running_out_of_descriptors_is_survived_quietly(tmp_path, tiny):
    """`gemmakit serve` limited to 100 open files, hit by 300 idle connections: /health still
    answers, the idle ones are closed after the timeout, and the log holds at most a line or
    two about descriptors, no traceback (it once grew by megabytes per second)."""
    resource = pytest.importorskip("resource")

    def limit_files():
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))

    root = str(Path(__file__).resolve().parents[1])
    cmd = [sys.executable, "-c", "import sys; from gemmakit.cli import main; sys.exit(main())", "serve"]
    cmd += ["--port", "0", "--model", str(tiny[0]), "--idle-timeout-s", "2"]
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        env = {**os.environ, "PYTHONPATH": root, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, preexec_fn=limit_files)
    socks = []
    try:
        url, deadline = None, time.monotonic() + 120
        while url is None:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            text = log_path.read_text()
            m = re.search(r" at (http://127\.0\.0\.1:\d+)", text)
            url = m.group(1) if m and "startup complete" in text else None
            time.sleep(0.1)
        port = int(url.rsplit(":", 1)[1])
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        time.sleep(3)  # past the idle timeout
        assert len(os.listdir(f"/proc/{proc.pid}/fd")) < 40
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(30)
    log = log_path.read_text()
    assert "Traceback" not in log and log.count("Too many open files") <= 3, log
