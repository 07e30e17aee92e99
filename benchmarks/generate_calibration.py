"""Calibration text written by the model itself (data-free calibration, as LLM-QAT, Liu et al.
2023, arXiv:2305.17888, samples its training data from the model it quantizes).

    .venv/bin/python benchmarks/generate_calibration.py -o FILE [--sequences 32] [--tokens 480]

Each sequence starts from the first words of a paragraph of the shipped wiki text or of a
question of the guanaco sample (never the evaluation text) and continues by sampling the
bundled model (temperature 0.8, top-p 0.95, a fixed seed). The sequences are written one after
another, separated by blank lines, for `gemmakit quantize --method gptq --calibration FILE`
or `benchmarks/gptq_ablation.py --calibration FILE`.
"""

from __future__ import annotations

import argparse
import json
import sys

SEED_WORDS = 8


def seeds(count: int) -> list[str]:
    """The first words of the wiki paragraphs and guanaco questions, alternating."""
    from gemmakit.paths import DATA

    wiki = [p for p in (DATA / "eval_text_wiki.txt").read_text(encoding="utf-8").split("\n\n") if len(p.split()) > 20]
    rows = [json.loads(line)["text"] for line in (DATA / "guanaco_sample.jsonl").read_text().splitlines() if line]
    questions = [r.split("### Human:", 1)[-1].split("###", 1)[0].strip() for r in rows]
    pool = [s for pair in zip(questions, wiki + questions) for s in pair]  # both kinds, interleaved
    return [" ".join(text.split()[:SEED_WORDS]) for text in pool[:count]]


def main(argv=None) -> int:
    from gemmakit.inference.api import LLM
    from gemmakit.inference.sampling import SamplingParams

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--tokens", type=int, default=480, help="tokens generated per sequence")
    args = p.parse_args(argv)
    llm = LLM(seed=0)
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=args.tokens, seed=0)
    outputs = llm.generate(seeds(args.sequences), params, use_tqdm=True)
    texts = [prompt + out.outputs[0].text for prompt, out in zip(seeds(args.sequences), outputs)]
    with open(args.output, "w", encoding="utf-8") as f:
        f.write("\n\n".join(texts) + "\n")
    print(f"wrote {args.output}: {len(texts)} sequences", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
