"""Getting requests to the app: binding a socket, the uvicorn server (with the connection
limits of `connections.py` and a graceful shutdown), running it in a thread, the Host check,
and 500s that keep the connection.

On a loopback address only loopback `Host` headers are served (`HostCheck`), so a web page
cannot reach the server through DNS rebinding; `gemmakit serve` warns when a server on
another address runs without an API key.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time

from gemmakit.serving.connections import default_max_connections, guarded_protocol
from gemmakit.serving.schemas import APIError, error_response

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
log = logging.getLogger("gemmakit.serving")


class HostCheck:
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
                await error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ServerErrors:
    """ASGI middleware: an exception in a handler becomes OpenAI's 500 JSON, logged once,
    and the connection stays usable.

    Starlette's own last-resort handler answers, then re-raises to the server, and uvicorn
    closes the connection of any request whose application raised (uvicorn h11_impl
    `run_asgi`); a keep-alive client then fails its next request too. This middleware sits
    inside Starlette's and ends the request normally instead.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as e:  # noqa: BLE001 - answered as a 500 below
            if started:  # the status line is gone: nothing valid can follow
                raise
            log.exception("internal error answering %s %s", scope.get("method"), scope.get("path"))
            error = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
            await error_response(error)(scope, receive, send)


def is_loopback(host: str) -> bool:
    """Whether host (a name or an address) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


def build_server(app, log_level: str = "info", drain=None):
    """The uvicorn server for `app`, with the limits of `app.state.config` (a ServerConfig).

    `drain(grace_s)`, an async callable, runs when the server is told to stop (SIGTERM,
    Ctrl+C, `should_exit`), after it stops accepting connections and before uvicorn's own
    shutdown: it lets running requests finish within the grace period and then ends the
    rest properly (the app's `drain`).
    """
    import uvicorn

    config = app.state.config
    limit = config.max_connections or default_max_connections()
    uv_config = uvicorn.Config(
        app,
        log_level=log_level,
        http=guarded_protocol(limit, config.idle_timeout_s),
        timeout_keep_alive=max(1, int(config.idle_timeout_s)),
        # Streams end within the grace period (drain); this bounds the rest of the shutdown.
        timeout_graceful_shutdown=int(config.shutdown_grace_s) + 5,
    )

    class GracefulServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            for server in self.servers:
                server.close()  # no new connections while the running requests end
            if drain is not None:
                await drain(config.shutdown_grace_s)
            await super().shutdown(sockets)

    return GracefulServer(uv_config)


class ServerThread:
    """Runs an app under uvicorn in a background thread (for notebooks, tests and benchmarks).

    Binds before returning, so `url` is usable at once; port 0 picks a free port.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self._sock = bind_socket(host, port)
        self.host, self.port = host, self._sock.getsockname()[1]
        self.app = app
        self.server = build_server(app, log_level, getattr(app.state, "drain", None))
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
    """The API key in $GEMMAKIT_API_KEY, or None when it is unset or empty."""
    return os.environ.get("GEMMAKIT_API_KEY") or None
