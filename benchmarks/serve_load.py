"""Serving load test: `gemmakit serve` against llama.cpp's llama-server on the same GGUF.

    python benchmarks/serve_load.py                                  # both servers, bundled GGUF
    python benchmarks/serve_load.py --clients 1 4 --max-tokens 16 --servers gemmakit
    python benchmarks/serve_load.py --url http://127.0.0.1:8000      # a server already running
    python benchmarks/serve_load.py --servers gemmakit --baseline ../main  # this checkout vs another

Each server runs as its own process on the same GGUF (llama-server with `-t 2 --parallel 16
-c 16384 --cont-batching`, gemmakit with `--max-num-seqs 16`), one after the other, so they
never share the CPU. For each number of concurrent clients, every client streams one chat
completion (its own seed, `ignore_eos`, so both servers generate the same number of tokens);
reported per (server, clients): aggregate generated tokens per second of wall time, time to
first token (TTFT) and inter-token latency (ITL, the gaps between a stream's content chunks)
p50/p95. `--baseline DIR` also runs the gemmakit of another checkout (as server
"gemmakit@DIR"), so a change and what it changed are measured in one run. Then the prefix-reuse measurement: a first chat turn with a long history (about
`--history-tokens` tokens, new to the server) and the second turn that re-sends it, TTFT of
each. Numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

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
LLAMA_CPP_BIN = Path(os.environ.get("GEMMAKIT_LLAMA_CPP_BIN", "/work/llamacpp/build/bin"))


@dataclass
class ClientResult:
    ok: bool
    tokens: int = 0
    ttft: float | None = None  # seconds to the first content chunk
    gaps: list[float] = field(default_factory=list)  # seconds between content chunks
    latency: float = 0.0
    text: str = ""
    prompt_tokens: int = 0
    error: str | None = None


@dataclass
class RunResult:
    server: str
    clients: int
    results: list[ClientResult] = field(default_factory=list)
    wall: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results)

    @property
    def errors(self) -> int:
        return sum(not r.ok for r in self.results)

    def summary(self) -> dict:
        ttfts = [r.ttft for r in self.results if r.ttft is not None]
        gaps = [g for r in self.results for g in r.gaps]
        return {
            "server": self.server,
            "clients": self.clients,
            "errors": self.errors,
            "tokens": self.tokens,
            "wall_s": self.wall,
            "tokens_per_s": self.tokens / self.wall if self.wall else None,
            "ttft_p50_s": percentile(ttfts, 50),
            "ttft_p95_s": percentile(ttfts, 95),
            "itl_p50_ms": _ms(percentile(gaps, 50)),
            "itl_p95_ms": _ms(percentile(gaps, 95)),
        }


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile by linear interpolation (numpy's default), None for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def request_body(i: int, model: str | None, max_tokens: int, temperature: float, top_p: float) -> dict:
    return chat_body(
        [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        model,
        max_tokens,
        temperature,
        top_p,
        1000 + i,
    )


def chat_body(messages, model, max_tokens, temperature=0.7, top_p=0.95, seed=0) -> dict:
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "ignore_eos": True,  # both servers accept it
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    return body


async def one_client(client, url: str, body: dict, headers: dict) -> ClientResult:
    """Streams one chat completion, timing each content chunk; checks the stream is well formed."""
    start = time.perf_counter()
    res = ClientResult(ok=False)
    chunks, last = 0, None
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
                    res.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                for choice in chunk.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - start
                        else:
                            res.gaps.append(now - last)
                        last, chunks = now, chunks + 1
                        res.text += piece
            res.tokens = res.tokens or chunks  # a server without usage in streams: one token a chunk
            res.ok = done and res.tokens > 0
            if not res.ok:
                res.error = "stream ended without [DONE] or tokens"
    except Exception as e:  # noqa: BLE001 - a load test reports failures, it does not stop
        res.error = f"{type(e).__name__}: {e}"
    finally:
        res.latency = time.perf_counter() - start
    return res


async def run_load(
    url: str,
    clients: int,
    max_tokens: int,
    model: str | None = None,
    api_key: str | None = None,
    temperature: float = 0.7,
    top_p: float = 0.95,
    server: str = "server",
) -> RunResult:
    """Sends `clients` streaming chat requests at once."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    bodies = [request_body(i, model, max_tokens, temperature, top_p) for i in range(clients)]
    run = RunResult(server, clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        start = time.perf_counter()
        run.results = list(await asyncio.gather(*(one_client(client, url, b, headers) for b in bodies)))
        run.wall = time.perf_counter() - start
    return run


def long_history(tokens: int, seed: int) -> str:
    """Text of roughly `tokens` tokens (about 0.75 words a token), new to any cache (a nonce)."""
    rng = random.Random(seed)
    words = " ".join(rng.choice(PROMPTS).rstrip(".?") for _ in range(int(tokens * 0.75) // 6))
    return f"Notes #{rng.randrange(10**9)}: {words}."


async def prefix_reuse(url: str, history_tokens: int, model: str | None, api_key: str | None) -> dict:
    """TTFT of a first chat turn with a long new history and of the turn that re-sends it."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    first = [{"role": "user", "content": long_history(history_tokens, seed=int(time.time()))}]
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0)) as client:
        cold = await one_client(client, url, chat_body(first, model, 16, temperature=0), headers)
        second = first + [
            {"role": "assistant", "content": cold.text},
            {"role": "user", "content": "Summarize that in one line."},
        ]
        warm = await one_client(client, url, chat_body(second, model, 16, temperature=0), headers)
    return {
        "history_tokens": cold.prompt_tokens,
        "cold_ttft_s": cold.ttft,
        "second_turn_ttft_s": warm.ttft,
        "speedup": cold.ttft / warm.ttft if cold.ttft and warm.ttft else None,
        "errors": [r.error for r in (cold, warm) if r.error],
    }


# --- the servers ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the server at {url} was not healthy within {timeout:.0f} s")


@contextlib.contextmanager
def server_process(name: str, gguf: Path, slots: int, threads: int, log: Path, root: Path | None = None):
    """Starts one server on the GGUF as a subprocess; yields its URL; stops it. A gemmakit
    server runs the gemmakit of checkout `root` (default: this one)."""
    port = free_port()
    if name == "llama.cpp":
        binary = LLAMA_CPP_BIN / "llama-server"
        if not binary.exists():
            raise FileNotFoundError(f"{binary} not found (set GEMMAKIT_LLAMA_CPP_BIN)")
        cmd = [str(binary), "-m", str(gguf), "--port", str(port), "-t", str(threads),
               "--parallel", str(slots), "-c", "16384", "--cont-batching"]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "gemmakit.cli", "serve", "--model", str(gguf), "--port", str(port),
               "--max-num-seqs", str(slots), "--max-queue", "1024", "--log-level", "warning"]  # fmt: skip
    # This checkout's gemmakit (or root's), whatever the environment has installed.
    root = str(root or Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=root)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def measure(url: str, name: str, args) -> tuple[list[RunResult], dict | None]:
    # One uncounted request first: a server's first forward pays one-time costs (allocations,
    # kernel loading) that are not serving speed.
    asyncio.run(run_load(url, 1, 2, api_key=args.api_key, server=name))
    runs = []
    for clients in args.clients:
        print(f"{name}: {clients} concurrent clients…", file=sys.stderr, flush=True)
        run = asyncio.run(
            run_load(url, clients, args.max_tokens, api_key=args.api_key, temperature=args.temperature,
                     top_p=args.top_p, server=name)
        )  # fmt: skip
        for r in run.results:
            if r.error:
                print(f"  error: {r.error}", file=sys.stderr)
        runs.append(run)
    reuse = None
    if args.history_tokens:
        print(f"{name}: prefix reuse, ~{args.history_tokens}-token history…", file=sys.stderr, flush=True)
        reuse = asyncio.run(prefix_reuse(url, args.history_tokens, None, args.api_key))
    return runs, reuse


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(runs: list[RunResult]) -> str:
    head = ["server", "clients", "errors", "tokens", "wall s", "tokens/s", "TTFT p50 s", "TTFT p95 s",
            "ITL p50 ms", "ITL p95 ms"]  # fmt: skip
    rows = []
    for r in runs:
        s = r.summary()
        rows.append([
            s["server"], str(s["clients"]), str(s["errors"]), str(s["tokens"]), f"{s['wall_s']:.1f}",
            _fmt(s["tokens_per_s"], ".1f"), _fmt(s["ttft_p50_s"], ".2f"), _fmt(s["ttft_p95_s"], ".2f"),
            _fmt(s["itl_p50_ms"], ".0f"), _fmt(s["itl_p95_ms"], ".0f"),
        ])  # fmt: skip
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(row) for row in rows)])


def reuse_table(reuse: dict[str, dict]) -> str:
    lines = [
        "| server | history tokens | cold TTFT s | second turn TTFT s | speedup |",
        "|---|---|---|---|---|",
    ]
    for name, r in reuse.items():
        lines.append(
            f"| {name} | {r['history_tokens']} | {_fmt(r['cold_ttft_s'], '.2f')} | "
            f"{_fmt(r['second_turn_ttft_s'], '.2f')} | {_fmt(r['speedup'], '.1f')}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default=None, help="the GGUF both servers load (default: the bundled one)")
    p.add_argument(
        "--servers", nargs="+", default=["llama.cpp", "gemmakit"], choices=["llama.cpp", "gemmakit"]
    )
    p.add_argument("--url", default=None, help="measure this running server instead of starting any")
    p.add_argument("--baseline", type=Path, default=None,
                   help="also run the gemmakit of this checkout (a folder with gemmakit/ in it)")  # fmt: skip
    p.add_argument("--api-key", default=None, help="for --url")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64], help="(1 4 16 64)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (64)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (0.95)")
    p.add_argument("--slots", type=int, default=16, help="parallel sequences of each server (16)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each server (2)")
    p.add_argument("--history-tokens", type=int, default=900,
                   help="history of the prefix-reuse turn (900: llama-server's slots of -c 16384 "
                        "over 16 hold 1024 tokens); 0 skips it")  # fmt: skip
    p.add_argument("--log-dir", default=".", help="where the servers' logs go (.)")
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = p.parse_args(argv)

    runs, reuse = [], {}
    if args.url:
        r, reuse["server"] = measure(args.url, "server", args)
        runs += r
    else:
        from gemmakit.loading import default_gguf

        gguf = Path(args.gguf) if args.gguf else default_gguf()
        servers = [(name, name, None) for name in args.servers]
        if args.baseline is not None:
            if not (args.baseline / "gemmakit" / "__init__.py").exists():
                p.error(f"--baseline {args.baseline}: no gemmakit/ package there")
            label = f"gemmakit@{args.baseline.resolve().name}"
            servers.append((label, "gemmakit", args.baseline.resolve()))
        for label, name, root in servers:
            log = Path(args.log_dir) / f"serve_load_{label.replace('@', '_')}.log"
            print(f"starting {label} on {gguf} (log: {log})…", file=sys.stderr, flush=True)
            with server_process(name, gguf, args.slots, args.threads, log, root) as url:
                r, reuse[label] = measure(url, label, args)
                runs += r
    sampling = "greedy" if args.temperature == 0 else f"temperature {args.temperature}, top_p {args.top_p}"
    print(f"streaming chat clients, {args.max_tokens} tokens each (ignore_eos), {sampling}")
    print(table(runs))
    if any(reuse.values()):
        print()
        print(reuse_table({k: v for k, v in reuse.items() if v}))
    if args.json:
        print(json.dumps({"runs": [r.summary() for r in runs], "prefix_reuse": reuse}))
    return 1 if any(r.errors for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
