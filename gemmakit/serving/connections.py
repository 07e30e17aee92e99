"""Bounding the server's connections, so that idle or slow clients cannot exhaust its file
descriptors, and keeping the log readable when the process runs out of them anyway.

uvicorn times out a keep-alive connection only after it has answered a request; a connection
that never sends (complete) request headers is held forever, and nothing caps how many are
open. Each holds a file descriptor, and at the process's limit `accept()` fails: asyncio logs
an "out of system resource" traceback per retry and `/health` stops answering. So:

- `guarded_protocol` makes uvicorn's HTTP/1.1 protocol close a connection that has been
  outside a request (no complete request headers yet, or waiting for the next keep-alive
  request) for `idle_timeout_s` (a header timeout and an idle timeout in one), and hold at
  most `max_connections`: a new connection beyond the cap displaces the longest-idle one, or,
  when every connection is inside a request, is answered 503 and closed.
- `raise_fd_limit` lifts the soft RLIMIT_NOFILE to the hard limit, and
  `default_max_connections` leaves room under it for the model's and the log's files.
- `RateLimitedResourceErrors` turns a flood of EMFILE/ENFILE log records into one line per
  interval with a count.
"""

from __future__ import annotations

import errno
import json
import logging
import time

# Descriptors kept for everything but client connections: the listening socket, model and
# tokenizer files, logs, the event loop's own pipes (a generous margin, not a measurement).
FD_RESERVE = 64
# Past this, more connections only cost memory (each holds an h11 parser and its buffers); a
# CPU server decodes a few dozen rows at a time.
MAX_CONNECTIONS_CAP = 4096
RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_BUSY_BODY = json.dumps(
    {
        "error": {
            "message": "the server holds its maximum number of connections; retry later",
            "type": "server_error",
            "param": None,
            "code": "too_many_connections",
        }
    }
).encode()
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"retry-after: 1\r\ncontent-length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY
)


def raise_fd_limit() -> int:
    """Raises the soft limit on open files to the hard limit; returns the soft limit now."""
    try:
        import resource
    except ImportError:  # not on POSIX: nothing to raise
        return 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 65536
    target = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # some sandboxes refuse; keep the soft limit
            pass
    return soft


def fd_limit() -> int:
    """The soft limit on open files (1024 where it cannot be read)."""
    try:
        import resource
    except ImportError:
        return 1024
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 65536 if soft == resource.RLIM_INFINITY else soft


def default_max_connections(limit: int | None = None) -> int:
    """The connection cap for a process allowed `limit` open files (default: the soft limit)."""
    limit = fd_limit() if limit is None else limit
    reserve = min(FD_RESERVE, limit // 4)
    return max(1, min(limit - reserve, MAX_CONNECTIONS_CAP))


def guarded_protocol(max_connections: int, idle_timeout_s: float) -> type:
    """uvicorn's HTTP/1.1 (h11) protocol with the idle timeout and connection cap above.

    Pass the class as `uvicorn.Config(http=...)`.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    if max_connections < 1 or not idle_timeout_s > 0:
        raise ValueError("max_connections must be >= 1 and idle_timeout_s > 0")

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            self._idle_since, self._idle_timer = time.monotonic(), None
            super().connection_made(transport)
            if len(self.connections) > max_connections and not self._displace_idle():
                transport.write(BUSY_RESPONSE)
                transport.close()
                return
            self._arm_idle_timer(idle_timeout_s)

        def connection_lost(self, exc) -> None:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._idle_since = time.monotonic()
            self._arm_idle_timer(idle_timeout_s)

        def in_request(self) -> bool:
            """Request headers received and the response not finished."""
            return self.cycle is not None and not self.cycle.response_complete

        def _displace_idle(self) -> bool:
            idle = [
                c
                for c in self.connections
                if c is not self and isinstance(c, GuardedH11Protocol) and not c.in_request()
            ]
            idle = [c for c in idle if not c.transport.is_closing()]
            if not idle:
                return False
            min(idle, key=lambda c: c._idle_since).transport.close()
            return True

        def _arm_idle_timer(self, delay: float) -> None:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            self._idle_timer = self.loop.call_later(delay, self._check_idle)

        def _check_idle(self) -> None:
            self._idle_timer = None
            if self.transport.is_closing() or self.in_request():
                return  # a request in progress re-arms the timer when its response ends
            left = self._idle_since + idle_timeout_s - time.monotonic()
            if left > 0:
                self._arm_idle_timer(left)
            else:
                self.transport.close()

    return GuardedH11Protocol


def _resource_error(record: logging.LogRecord) -> str | None:
    """The OSError text of a record about running out of descriptors or buffers, else None."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
        return exc.strerror or str(exc)
    text = record.getMessage()
    return "Too many open files" if "Too many open files" in text else None


class RateLimitedResourceErrors(logging.Filter):
    """Lets one record about descriptor exhaustion through per `interval_s`, without its
    traceback and with the count of those dropped since; other records pass unchanged."""

    def __init__(self, interval_s: float = 10.0, clock=time.monotonic):
        super().__init__()
        self.interval_s, self.clock = interval_s, clock
        self._last: float | None = None
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        reason = _resource_error(record)
        if reason is None:
            return True
        now = self.clock()
        if self._last is not None and now - self._last < self.interval_s:
            self._dropped += 1
            return False
        more = f" ({self._dropped} more in the last {now - self._last:.0f} s)" if self._dropped else ""
        record.msg, record.args = f"{record.getMessage().splitlines()[0]}: {reason}{more}", ()
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        self._last, self._dropped = now, 0
        return True


def limit_resource_error_logs(interval_s: float = 10.0) -> None:
    """Installs `RateLimitedResourceErrors` on the loggers that report failed accepts (once)."""
    for name in ("asyncio", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimitedResourceErrors) for f in logger.filters):
            logger.addFilter(RateLimitedResourceErrors(interval_s))
