"""The server's answers to malformed requests: 400s in OpenAI's error shape, connection kept.

Each body is sent as raw bytes over one keep-alive `http.client` connection, and a valid
request follows on the same connection, so a handler that fails (500) or drops the
connection is caught as well as a wrong status.
"""

from __future__ import annotations

import http.client
import json

import pytest

pytest.importorskip("fastapi")

from gemmakit.inference.api import LLM  # noqa: E402
from gemmakit.serving.app import create_app  # noqa: E402
from gemmakit.serving.config import ServerConfig  # noqa: E402
from gemmakit.serving.transport import serve_in_thread  # noqa: E402

NAME = "gemma-test"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def server(bundled):
    srv = serve_in_thread(create_app(LLM(loaded=bundled), ServerConfig(served_model_name=NAME)))
    yield srv
    srv.stop()


def send(conn, path, body: bytes):
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def chat(content) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 1}).encode()


BAD = {
    "lone surrogate": (CHAT, b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 1}'),
    "surrogate in a key": (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "\\udfff": 1}'),
    "text part is a number": (CHAT, chat([{"type": "text", "text": 5}])),
    "deep nesting": (CHAT, b"[" * 200_000 + b"]" * 200_000),
    "deep nesting in a field": (CHAT, b'{"messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
    "max_tokens true": (COMPLETIONS, b'{"prompt": "hi", "max_tokens": true}'),
    "prompt of booleans": (COMPLETIONS, b'{"prompt": [true, false], "max_tokens": 1}'),
    "prompt of floats": (COMPLETIONS, b'{"prompt": [2.0, 3.0], "max_tokens": 1}'),
}


@pytest.mark.parametrize("case", list(BAD))
def test_client_mistakes_are_400s_and_keep_the_connection(server, case):
    path, body = BAD[case]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        status, answer = send(conn, path, body)
        assert status == 400, answer
        err = answer["error"]
        assert err["type"] == "invalid_request_error" and isinstance(err["message"], str)
        assert set(err) == {"message", "type", "param", "code"}
        # The same connection still serves a valid request.
        status, answer = send(conn, COMPLETIONS, b'{"prompt": [2, 3], "max_tokens": 1}')
        assert status == 200, answer
        assert answer["usage"]["completion_tokens"] == 1
    finally:
        conn.close()


def test_valid_text_parts_and_escapes_are_still_served(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        # A surrogate pair escape is a valid character; only a lone half is refused.
        for body in (
            chat([{"type": "text", "text": "hi"}]),
            chat("hi \U0001f600"),
        ):
            status, answer = send(conn, CHAT, body)
            assert status == 200, answer
        status, answer = send(
            conn, CHAT, b'{"messages": [{"role": "user", "content": "hi \\ud83d\\ude00"}], "max_tokens": 1}'
        )
        assert status == 200, answer
    finally:
        conn.close()
