"""`ServerConfig`: the options of `gemmakit serve`, one dataclass field per command-line flag."""

from __future__ import annotations

from dataclasses import dataclass

from gemmakit.errors import GemmakitError
from gemmakit.options import option


@dataclass
class ServerConfig:
    """Options of `gemmakit serve`; its command-line flags are generated from these fields."""

    host: str = option("127.0.0.1", "address to bind (127.0.0.1)", metavar="ADDR")
    port: int = option(8000, "port (8000)", metavar="N")
    api_key: str | None = option(
        None,
        "require 'Authorization: Bearer KEY' on /v1 (default: $GEMMAKIT_API_KEY, or none)",
        metavar="KEY",
    )
    served_model_name: str | None = option(
        None, "model name clients send and /v1/models lists (default: the model's)", metavar="NAME"
    )
    max_num_seqs: int = option(16, "sequences decoded together at most: the KV-cache slots (16)", metavar="N")
    max_batch: int | None = option(None, "the former name of --max-num-seqs", metavar="N")
    max_queue: int = option(64, "requests waiting for a slot before 429 (64)", metavar="N")
    max_model_len: int | None = option(
        None,
        "tokens (prompt + reply) of one sequence at most: each slot's KV-cache capacity "
        "(default: what --max-num-seqs slots fit in half the available memory, at most the "
        "model's context)",
        metavar="N",
    )
    max_body_bytes: int = option(4 * 2**20, "request body limit in bytes (4 MiB)", metavar="BYTES")
    max_connections: int | None = option(
        None,
        "open client connections at most; beyond it the longest-idle one is closed, or 503 when all are "
        "busy (default: from the open-file limit, which serve raises to its hard limit)",
        metavar="N",
    )
    idle_timeout_s: float = option(
        15.0,
        "close a connection that has sent no complete request headers for this long, at its start or "
        "between keep-alive requests (15)",
        metavar="SECONDS",
    )
    shutdown_grace_s: float = option(
        10.0,
        "on SIGTERM or Ctrl+C, let running requests finish for this long; streams still open then end "
        "with a 503 error event and [DONE] (10)",
        metavar="SECONDS",
    )
    batch_window_s: float = option(
        0.01, "how long the scheduler waits for simultaneous requests to fill a batch", cli=False
    )

    def __post_init__(self):
        if self.max_batch is not None:
            self.max_num_seqs = self.max_batch
        for name in ("max_num_seqs", "max_queue", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise GemmakitError(f"{name.replace('_', '-')} must be at least 1")
        if self.max_connections is not None and self.max_connections < 1:
            raise GemmakitError("max-connections must be at least 1")
        if not self.idle_timeout_s > 0 or not self.shutdown_grace_s >= 0:
            raise GemmakitError("idle-timeout-s must be positive and shutdown-grace-s not negative")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise GemmakitError("max-model-len must be at least 2")
        if self.api_key is not None and not self.api_key:
            raise GemmakitError("api-key must not be empty")
