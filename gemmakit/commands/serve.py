"""`gemmakit serve`: an OpenAI-compatible HTTP server with batched decoding and a chat page."""

from __future__ import annotations

import sys

from gemmakit.commands.common import add_model_arguments, has_module, load_llm
from gemmakit.errors import GemmakitError
from gemmakit.options import add_options, flag_fields


def add_arguments(p):
    from gemmakit.serving.config import ServerConfig

    add_model_arguments(p)
    s = p.add_argument_group("server")
    # The flags are ServerConfig's fields, so the CLI and the Python API cannot drift apart.
    add_options(s, ServerConfig, show_defaults=False)
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args) -> int:
    if not (has_module("fastapi") and has_module("uvicorn")):
        raise GemmakitError("the server needs fastapi and uvicorn: pip install 'gemmakit[serve]'")
    import uvicorn

    from gemmakit.serving.app import create_app
    from gemmakit.serving.config import ServerConfig
    from gemmakit.serving.transport import api_key_from_env, bind_socket, is_loopback

    if not 0 <= args.port <= 65535:
        raise GemmakitError(f"--port must be in 0..65535 (0: any free port), got {args.port}")
    options = {f.name: getattr(args, f.name) for f in flag_fields(ServerConfig)}
    options["api_key"] = options["api_key"] or api_key_from_env()
    config = ServerConfig(**options)
    if not is_loopback(config.host) and config.api_key is None:
        print(
            f"gemmakit serve: warning: listening on {config.host} without --api-key; "
            "anyone who can reach this address can use the model",
            file=sys.stderr,
        )
    try:  # bind before loading the model, so a taken port fails fast
        sock = bind_socket(config.host, config.port)
    except OSError as e:
        raise GemmakitError(f"cannot listen on {config.host}:{config.port}: {e.strerror or e}") from None
    llm = load_llm(args)
    app = create_app(llm, config)
    host = f"[{config.host}]" if ":" in config.host else config.host
    url = f"http://{host}:{sock.getsockname()[1]}"  # the real port, also for --port 0
    print(
        f"Serving {app.state.model_name} (loaded in {llm.loaded.load_seconds:.2f} s) at {url}"
        f"  |  chat page: {url}/  |  API: {url}/v1" + ("  |  API key required" if config.api_key else ""),
        file=sys.stderr,
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=10))
    server.run(sockets=[sock])  # returns after Ctrl+C / SIGTERM, once requests in flight are done
    return 0
