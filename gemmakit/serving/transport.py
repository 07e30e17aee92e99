"""Getting requests to the app: binding a socket, running uvicorn in a thread, the Host check.

On a loopback address only loopback `Host` headers are served (`HostCheck`), so a web page
cannot reach the server through DNS rebinding; `gemmakit serve` warns when a server on
another address runs without an API key.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time

from gemmakit.serving.schemas import APIError, error_response

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


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
    """The API key in $GEMMAKIT_API_KEY, or None when it is unset or empty."""
    return os.environ.get("GEMMAKIT_API_KEY") or None
