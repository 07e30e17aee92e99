"""Load test for `gemmakit serve`: N concurrent streaming clients vs the same requests one by one.

    python benchmarks/serve_load.py                       # in-process server, bundled model
    python benchmarks/serve_load.py --clients 32 --max-tokens 32
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key KEY

Every client streams a chat completion (`stream: true`, usage included) with its own seed and
`ignore_eos`, so both runs generate exactly the same number of tokens. Reported: requests
completed and failed, generated tokens, wall time, throughput (generated tokens per second of
wall time), mean time to first token and latency percentiles. Numbers depend on the machine
and on what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "Give me three ideas for a weekend trip.",
    "What is the capital of France?",
    "Summarize the plot of Hamlet in two sentences.",
    "How do I boil an egg?",
    "List some prime numbers.",
    "Translate 'good morning' into Spanish and German.",
]


@dataclass
class ClientResult:
    ok: bool
    tokens: int = 0
    ttft: float | None = None  # seconds to the first content chunk
    latency: float = 0.0
    text: str = ""
    error: str | None = None


@dataclass
class RunResult:
    mode: str
    results: list[ClientResult] = field(default_factory=list)
    wall: float = 0.0
    max_batch: int | None = None

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results)

    @property
    def errors(self) -> int:
        return sum(not r.ok for r in self.results)


def request_body(i: int, model: str | None, max_tokens: int, temperature: float, top_p: float) -> dict:
    body = {
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": 1000 + i,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    return body


async def one_client(client, url: str, body: dict, headers: dict) -> ClientResult:
    """Streams one chat completion and checks the stream is well formed."""
    start = time.perf_counter()
    res = ClientResult(ok=False)
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return res
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = chunk["error"]["message"]
                    return res
                if chunk.get("usage"):
                    res.tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    piece = choice["delta"].get("content")
                    if piece:
                        res.ttft = res.ttft or time.perf_counter() - start
                        res.text += piece
            res.ok = done and res.tokens > 0
            if not res.ok:
                res.error = "stream ended without [DONE] or usage"
    except Exception as e:  # noqa: BLE001 - a load test reports failures, it does not stop
        res.error = f"{type(e).__name__}: {e}"
    finally:
        res.latency = time.perf_counter() - start
    return res


async def run_load(
    url: str,
    clients: int,
    max_tokens: int,
    concurrent: bool = True,
    model: str | None = None,
    api_key: str | None = None,
    temperature: float = 0.7,
    top_p: float = 0.95,
) -> RunResult:
    """Sends `clients` streaming requests, all at once or one after another."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    bodies = [request_body(i, model, max_tokens, temperature, top_p) for i in range(clients)]
    run = RunResult("concurrent" if concurrent else "one by one")
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        start = time.perf_counter()
        if concurrent:
            run.results = list(await asyncio.gather(*(one_client(client, url, b, headers) for b in bodies)))
        else:
            run.results = [await one_client(client, url, b, headers) for b in bodies]
        run.wall = time.perf_counter() - start
    return run


def table(runs: list[RunResult]) -> str:
    head = [
        "mode",
        "requests",
        "errors",
        "tokens",
        "wall s",
        "tokens/s",
        "mean TTFT s",
        "p50 lat s",
        "p95 lat s",
        "max batch",
    ]
    rows = []
    for r in runs:
        lat = sorted(x.latency for x in r.results)
        ttfts = [x.ttft for x in r.results if x.ttft is not None]
        p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))] if lat else 0.0
        rows.append(
            [
                r.mode,
                str(len(r.results)),
                str(r.errors),
                str(r.tokens),
                f"{r.wall:.1f}",
                f"{r.tokens / r.wall:.1f}" if r.wall else "-",
                f"{statistics.mean(ttfts):.2f}" if ttfts else "-",
                f"{statistics.median(lat):.1f}" if lat else "-",
                f"{p95:.1f}",
                "-" if r.max_batch is None else str(r.max_batch),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(row) for row in rows)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server; default: start one in-process")
    p.add_argument("--model", default=None, help="model for the in-process server (default: bundled)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (0.95)")
    p.add_argument("--max-batch", type=int, default=32, help="in-process server's batch limit (32)")
    p.add_argument("--no-sequential", action="store_true", help="skip the one-by-one baseline")
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = p.parse_args(argv)

    server = scheduler = None
    url = args.url
    if url is None:
        from gemmakit.inference.api import LLM
        from gemmakit.serving.app import create_app
        from gemmakit.serving.config import ServerConfig
        from gemmakit.serving.transport import serve_in_thread

        llm = LLM(model=args.model, dtype="float32" if args.model is None else "auto")
        config = ServerConfig(max_batch=args.max_batch, max_queue=max(64, args.clients))
        app = create_app(llm, config)
        scheduler = app.state.scheduler
        server = serve_in_thread(app)
        url = server.url
        print(
            f"in-process server at {url}, model {app.state.model_name}, max batch {args.max_batch}",
            file=sys.stderr,
        )
    try:
        runs = []
        for concurrent in (True, False) if not args.no_sequential else (True,):
            if scheduler is not None:
                scheduler.stats.max_batch_seen = 0
            print(
                f"running {args.clients} requests {'concurrently' if concurrent else 'one by one'}…",
                file=sys.stderr,
            )
            run = asyncio.run(
                run_load(
                    url, args.clients, args.max_tokens, concurrent, api_key=args.api_key,
                    temperature=args.temperature, top_p=args.top_p,
                )
            )  # fmt: skip
            if scheduler is not None:
                run.max_batch = scheduler.stats.max_batch_seen
            runs.append(run)
            for r in run.results:
                if r.error:
                    print(f"  error: {r.error}", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
    sampling = "greedy" if args.temperature == 0 else f"temperature {args.temperature}, top_p {args.top_p}"
    print(f"{args.clients} streaming chat clients, {args.max_tokens} tokens each (ignore_eos), {sampling}")
    print(table(runs))
    if len(runs) == 2 and runs[1].wall and runs[0].wall:
        speedup = (runs[0].tokens / runs[0].wall) / (runs[1].tokens / runs[1].wall)
        print(f"throughput, concurrent vs one by one: {speedup:.2f}x")
    if args.json:
        out = [
            {"mode": r.mode, "wall": r.wall, "tokens": r.tokens, "errors": r.errors, "max_batch": r.max_batch}
            for r in runs
        ]
        print(json.dumps(out))
    return 1 if any(r.errors for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
