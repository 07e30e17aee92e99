"""Where a serving step's time goes: the engine alone (no HTTP), on the bundled GGUF.

    python benchmarks/serve_step.py                       # 16 chat prompts, 32 tokens each
    python benchmarks/serve_step.py --rows 4 --threads 1  # CPU time on one thread
    python benchmarks/serve_step.py --prefill-chunk 128   # another prompt-token budget a step

`--rows` chat prompts arrive at once (temperature 0.7, top-p 0.95, `ignore_eos`), as
`benchmarks/serve_load.py`'s clients send them; the engine (`inference/batching.Engine`) runs
them to the end. Reported: the prefill of the burst (wall and CPU seconds, steps, first
tokens), then per full decode step (every row decoding) the C step, the sampling of all rows
(`engine.sample_rows`) and the rest, in milliseconds. CPU time is the process's (all
threads), so a loaded machine inflates wall time more than CPU time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's gemmakit

from serve_load import PROMPTS  # noqa: E402  (the same chat prompts as the server benchmark)


class Timer:
    """Wall and process CPU seconds spent inside the wrapped callables."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall += time.perf_counter() - wall
                self.cpu += time.process_time() - cpu

        return timed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=16, help="prompts sent at once (16)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per prompt (32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (torch's default)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens a step at most (256)")
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from gemmakit.inference import batching
    from gemmakit.inference.engine import Request
    from gemmakit.inference.sampling import SamplingParams, request_generator
    from gemmakit.loading import load

    loaded = load()
    tok = loaded.tokenizer
    prompts = [
        tok.encode(f"<start_of_turn>user\n{PROMPTS[i % len(PROMPTS)]}<end_of_turn>\n<start_of_turn>model\n")
        for i in range(args.rows)
    ]
    engine = batching.Engine(
        loaded.model, slots=max(16, args.rows), capacity=1024, prefill_chunk=args.prefill_chunk
    )
    if engine.fast is None:
        p.error("the batched C step does not run here (no C kernels)")

    def request(i: int, max_tokens: int) -> Request:
        params = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=max_tokens, ignore_eos=True, seed=i)
        return Request(prompts[i], params, loaded.stop_ids, request_generator(params, None))

    engine.add(request(0, 2))  # one-time costs (allocations, the kernel library) first
    while engine.has_work():
        engine.step()

    c_step, sampling = Timer(), Timer()
    engine.fast.step = c_step.wrap(engine.fast.step)
    batching.sample_rows = sampling.wrap(batching.sample_rows)
    for i in range(args.rows):
        engine.add(request(i, args.max_tokens))
    wall, cpu, steps, firsts = time.perf_counter(), time.process_time(), 0, []
    while any(s.prefilling for s in engine.running) or engine.waiting:
        events = engine.step()
        steps += 1
        firsts += [time.perf_counter() - wall] * len(events)
    prefill = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "steps": steps,
               "first_token_p50_s": sorted(firsts)[len(firsts) // 2]}  # fmt: skip

    full = {"steps": 0, "wall_ms": 0.0, "cpu_ms": 0.0, "c_step_ms": 0.0, "sampling_ms": 0.0}
    while engine.has_work():
        c_step.wall = sampling.wall = 0.0
        wall, cpu = time.perf_counter(), time.process_time()
        events = engine.step()
        if len(events) == args.rows:  # every row decoded: a full step
            full["steps"] += 1
            full["wall_ms"] += 1000 * (time.perf_counter() - wall)
            full["cpu_ms"] += 1000 * (time.process_time() - cpu)
            full["c_step_ms"] += 1000 * c_step.wall
            full["sampling_ms"] += 1000 * sampling.wall
    n = max(1, full["steps"])
    decode = {k: (v / n if k != "steps" else v) for k, v in full.items()}
    decode["rest_ms"] = decode["wall_ms"] - decode["c_step_ms"] - decode["sampling_ms"]
    decode["tokens_per_s"] = 1000 * args.rows / decode["wall_ms"] if decode["wall_ms"] else None

    lengths = sorted(len(x) for x in prompts)
    print(f"{args.rows} chat prompts of {lengths[0]}-{lengths[-1]} tokens, {torch.get_num_threads()} threads")
    print(f"prefill of the burst: {prefill['wall_s']:.2f} s wall, {prefill['cpu_s']:.2f} s CPU, "
          f"{prefill['steps']} steps, first token p50 {prefill['first_token_p50_s']:.2f} s")  # fmt: skip
    print(f"full decode step ({decode['steps']} of them): {decode['wall_ms']:.1f} ms wall "
          f"({decode['cpu_ms']:.1f} ms CPU) = C step {decode['c_step_ms']:.1f} + sampling "
          f"{decode['sampling_ms']:.1f} + rest {decode['rest_ms']:.1f}; {decode['tokens_per_s']:.1f} tokens/s")  # fmt: skip
    if args.json:
        print(json.dumps({"rows": args.rows, "prefill": prefill, "decode": decode}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
