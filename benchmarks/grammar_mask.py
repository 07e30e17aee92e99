"""Per-token cost of a JSON-schema constraint on the bundled Gemma 3 tokenizer (262,144
pieces): xgrammar (what `gemmakit.inference.grammar` uses) against llguidance.

    python benchmarks/grammar_mask.py [--json out.json]

For each engine: the tokenizer set-up, the schema compile, and per forced token of a valid
answer the time to fill the next-token bitmask (median, p90, max); then the time to apply a
bitmask to one row of logits with gemmakit's numpy path (`grammar.apply_mask`). llguidance
is skipped when it is not installed (it is not a gemmakit dependency).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import time

import torch

from gemmakit.formats.tokenizer import BYTE, SPACE
from gemmakit.loading import load_tokenizer, resolve

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "tags"],
}
ANSWER = '{"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry", "engines"]}'


def summary(seconds: list[float]) -> dict:
    ms = sorted(1e3 * s for s in seconds)
    return {"median_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * (len(ms) - 1))], "max_ms": ms[-1]}


def run_xgrammar(tok, ids: list[int]) -> dict:
    import xgrammar as xgr

    from gemmakit.inference import grammar

    start = time.perf_counter()
    compiler = grammar._compiler(tok, tok.vocab_size, tuple(tok.stop_ids))
    setup = time.perf_counter() - start
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compile_s = time.perf_counter() - start
    matcher, bitmask = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, tok.vocab_size)
    fills = []
    for token in ids:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask, 0)
        fills.append(time.perf_counter() - start)
        if not matcher.accept_token(token):
            raise SystemExit(f"xgrammar refused token {token}")
    return {
        "engine": f"xgrammar {importlib.metadata.version('xgrammar')}",
        "setup_s": setup,
        "compile_s": compile_s,
        **summary(fills),
    }


def run_llguidance(tok, ids: list[int]) -> dict | None:
    try:
        import llguidance
        import llguidance.torch as llg_torch
    except ImportError:
        return None

    class Vocabulary:  # what llguidance's TokenizerWrapper reads
        eos_token_id, bos_token_id = tok.eos_id, tok.bos_id
        tokens = [
            bytes([int(p[3:-1], 16)]) if t == BYTE else p.replace(SPACE, " ").encode()
            for p, t in zip(tok.pieces, tok.types)
        ]
        special_token_ids = sorted(tok.special_ids)

        def __call__(self, text):
            return tok.encode(text.decode() if isinstance(text, bytes) else text, add_bos=False)

    start = time.perf_counter()
    lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary()), n_vocab=tok.vocab_size)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA))
    compile_s = time.perf_counter() - start
    bitmask = llg_torch.allocate_token_bitmask(1, tok.vocab_size)
    fills = []
    for token in ids:
        start = time.perf_counter()
        llg_torch.fill_next_token_bitmask(matcher, bitmask, 0)
        fills.append(time.perf_counter() - start)
        if not matcher.consume_token(token):
            raise SystemExit(f"llguidance refused token {token}: {matcher.get_error()}")
    version = getattr(llguidance, "__version__", "")
    return {
        "engine": f"llguidance {version}".strip(),
        "setup_s": setup,
        "compile_s": compile_s,
        **summary(fills),
    }


def run_apply(vocab: int, rounds: int = 50) -> dict:
    from gemmakit.inference.grammar import allowed_tokens, apply_mask

    bitmask = torch.randint(-(2**31), 2**31 - 1, ((vocab + 31) // 32,), dtype=torch.int32)
    logits = torch.randn(vocab)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        apply_mask(logits, allowed_tokens(bitmask, vocab))
        times.append(time.perf_counter() - start)
    return {"engine": "gemmakit apply_mask (numpy)", **summary(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    tok = load_tokenizer(resolve(None))
    ids = tok.encode(ANSWER, add_bos=False)
    rows = [run_xgrammar(tok, ids), run_llguidance(tok, ids), run_apply(tok.vocab_size)]
    rows = [r for r in rows if r is not None]
    print(f"vocabulary {tok.vocab_size}, {len(ids)} forced tokens")
    print(f"{'engine':<30} {'setup s':>8} {'compile s':>9} {'median ms':>9} {'p90 ms':>8} {'max ms':>8}")
    for r in rows:
        setup, comp = r.get("setup_s"), r.get("compile_s")
        print(
            f"{r['engine']:<30} {'' if setup is None else f'{setup:.3f}':>8} "
            f"{'' if comp is None else f'{comp:.4f}':>9} {r['median_ms']:>9.4f} {r['p90_ms']:>8.4f} {r['max_ms']:>8.4f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
