"""`gemmakit serve`: an OpenAI-compatible HTTP server with batched decoding and a chat page."""

from __future__ import annotations

import sys
from pathlib import Path

from gemmakit.commands.common import add_model_arguments, has_module, load_llm
from gemmakit.errors import GemmakitError
from gemmakit.options import add_options, flag_fields


def add_arguments(p):
    from gemmakit.serving.config import ServerConfig

    add_model_arguments(p)
    s = p.add_argument_group("server")
    # The flags are ServerConfig's fields, so the CLI and the Python API cannot drift apart.
    add_options(s, ServerConfig, show_defaults=False)
    s.add_argument(
        "--draft-model", default=None, metavar="M",
        help="a smaller model with the same tokenizer, or a Gemma 4 assistant folder (its MTP "
        "drafter): requests may then speculate with it (speculative_config method draft_model, "
        "or mtp); any request may ask for ngram",
    )  # fmt: skip
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument(
        "--lora", action="append", default=[], metavar="NAME=DIR",
        help="serve a LoRA adapter folder (PEFT format) beside the base model, under NAME (a bare DIR: "
        "its folder name); requests pick it with \"model\": NAME. Repeatable; rows with different "
        "adapters share batches",
    )  # fmt: skip


def lora_specs(values: list[str]) -> dict[str, Path]:
    """`--lora NAME=DIR` / `--lora DIR` values as {name: folder}, refusing duplicate names."""
    specs: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name or "/" in name:  # a bare folder
            folder = value
            name = Path(value.rstrip("/")).name
        if not folder:
            raise GemmakitError(f"--lora {value!r}: give NAME=DIR or DIR")
        if name in specs:
            raise GemmakitError(f"--lora: two adapters named {name!r}")
        specs[name] = Path(folder)
    return specs


def run(args) -> int:
    if not (has_module("fastapi") and has_module("uvicorn")):
        raise GemmakitError("the server needs fastapi and uvicorn: pip install 'gemmakit[serve]'")
    from gemmakit.serving.app import create_app
    from gemmakit.serving.config import ServerConfig
    from gemmakit.serving.connections import limit_resource_error_logs, raise_fd_limit
    from gemmakit.serving.transport import api_key_from_env, bind_socket, build_server, is_loopback

    if not 0 <= args.port <= 65535:
        raise GemmakitError(f"--port must be in 0..65535 (0: any free port), got {args.port}")
    adapters = lora_specs(args.lora)
    if adapters and args.adapter:
        raise GemmakitError(
            "--adapter merges one adapter for every request; with --lora, pass it as --lora too"
        )
    for name, folder in adapters.items():
        if not folder.is_dir():
            raise GemmakitError(f"--lora {name}={folder}: no such adapter folder")
    options = {f.name: getattr(args, f.name) for f in flag_fields(ServerConfig)}
    options["api_key"] = options["api_key"] or api_key_from_env()
    config = ServerConfig(**options)
    if not is_loopback(config.host) and config.api_key is None:
        print(
            f"gemmakit serve: warning: listening on {config.host} without --api-key; "
            "anyone who can reach this address can use the model",
            file=sys.stderr,
        )
    raise_fd_limit()  # before the default --max-connections is read from it
    limit_resource_error_logs()
    try:  # bind before loading the model, so a taken port fails fast
        sock = bind_socket(config.host, config.port)
    except OSError as e:
        raise GemmakitError(f"cannot listen on {config.host}:{config.port}: {e.strerror or e}") from None
    llm = load_llm(args)
    attach_adapters(llm.model, adapters)
    app = create_app(llm, config)
    host = f"[{config.host}]" if ":" in config.host else config.host
    url = f"http://{host}:{sock.getsockname()[1]}"  # the real port, also for --port 0
    served = "".join(f", LoRA {n}" for n in adapters)
    print(
        f"Serving {app.state.model_name}{served} (loaded in {llm.loaded.load_seconds:.2f} s) at {url}"
        f"  |  chat page: {url}/  |  API: {url}/v1" + ("  |  API key required" if config.api_key else ""),
        file=sys.stderr,
        flush=True,
    )
    server = build_server(app, args.log_level, app.state.drain)
    # Returns after Ctrl+C / SIGTERM, once running requests have finished or, after
    # --shutdown-grace-s, ended with a 503 event.
    server.run(sockets=[sock])
    return 0


def attach_adapters(model, adapters: dict[str, Path]) -> None:
    from gemmakit.lora import multi

    for name, folder in adapters.items():
        multi.attach(model, name, folder)
