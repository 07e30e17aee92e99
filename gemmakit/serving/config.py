"""`ServerConfig`: the options of `gemmakit serve`, one dataclass field per command-line flag."""

from __future__ import annotations

from dataclasses import dataclass, field

from gemmakit.errors import GemmakitError


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
