"""Is model B a faithful copy of model A? (a source and its export, a base and its merge)

`compare(a, b)` runs both models on a few prompts and a text and measures:
- tokenization: whether both tokenizers give the same ids for every prompt and the text;
- max |logit difference| over every position of prompt + A's greedy continuation;
- greedy agreement: A generates N tokens greedily; B reads the same sequence (teacher
  forcing) and its argmax is compared with A's token at each of the N positions. The count of
  leading matches is exactly the number of tokens B would generate identically on its own;
- perplexity of each on the text (`gemmakit.evaluation.perplexity`'s strided method).

The verdict uses stated thresholds (`THRESHOLDS`):
- identical: same tokenization, max |Δlogit| <= 1e-3 (float32 rounding of the same weights
  in a different order), every greedy token equal, perplexities within 0.01%;
- within quantization tolerance: same tokenization, >= 85% of greedy tokens equal, and
  perplexity within 10% of A's (both directions). On the bundled Gemma 3 270M, Q8_0 and int8
  change perplexity by -0.01% and +0.19% and Q5_0 by +4%; the 4-bit types cost this small
  model 22-44% (benchmarks/quant_quality.json) and are reported as different unless the
  tolerance is raised (`gemmakit verify --ppl-tolerance`);
- different: anything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gemmakit.errors import GemmakitError
from gemmakit.evaluation.perplexity import perplexity
from gemmakit.paths import DATA

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, there was a little",
    "def fibonacci(n):",
    "Water boils at a temperature of",
)
DEFAULT_TEXT = DATA / "eval_text.txt"


@dataclass(frozen=True)
class Thresholds:
    identical_logit: float = 1e-3
    identical_ppl: float = 1e-4
    tolerance_agreement: float = 0.85
    tolerance_ppl: float = 0.10


THRESHOLDS = Thresholds()


def _device(model) -> torch.device:
    return model.model.norm.weight.device


@torch.inference_mode()
def greedy_continuation(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after `ids`, end-of-sequence tokens included (no early stop)."""
    device = _device(model)
    cache = model.make_cache(1, len(ids) + n)
    logits = model(torch.tensor([ids], device=device), cache=cache)[0, -1]
    out = []
    for _ in range(n):
        token = int(logits.float().argmax())
        out.append(token)
        logits = model(torch.tensor([[token]], device=device), cache=cache)[0, -1]
    return out


@torch.inference_mode()
def _logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids], device=_device(model)))[0].float().cpu()


def compare_prompt(a, b, prompt: str, new_tokens: int) -> dict:
    """Logit difference and greedy agreement of B against A on one prompt."""
    ids = a.tokenizer.encode(prompt)
    same_ids = b.tokenizer.encode(prompt) == ids
    continuation = greedy_continuation(a.model, ids, new_tokens)
    full = ids + continuation
    la, lb = _logits(a.model, full), _logits(b.model, full)
    V = min(la.shape[-1], lb.shape[-1])
    diff = float((la[:, :V] - lb[:, :V]).abs().max())
    pos = slice(len(ids) - 1, len(full) - 1)  # positions that predict the continuation
    b_choice = lb[pos].argmax(-1).tolist()
    agree = [x == y for x, y in zip(b_choice, continuation)]
    prefix = agree.index(False) if False in agree else len(agree)
    top2 = la[pos].topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    return {
        "prompt": prompt,
        "same_tokens": same_ids,
        "max_abs_logit_diff": diff,
        "greedy_agreement": sum(agree),
        "new_tokens": len(agree),
        "identical_prefix": prefix,
        # A's top-1 minus top-2 logit where B chose differently: small margins are near ties.
        "disagreement_margins": [round(m, 4) for m, ok in zip(margins, agree) if not ok],
        "continuation": a.tokenizer.decode(continuation),
    }


def text_ids(loaded, text: str, max_tokens: int | None) -> list[int]:
    ids = loaded.tokenizer.encode(text, add_bos=False)
    return ids[:max_tokens] if max_tokens else ids


def compare(
    a,
    b,
    prompts=DEFAULT_PROMPTS,
    new_tokens: int = 16,
    text: str | None = None,
    max_tokens: int | None = 1024,
    context: int = 512,
    progress: bool = False,
    thresholds: Thresholds = THRESHOLDS,
) -> dict:
    """Compares two `gemmakit.loading.Loaded` models; returns measurements and a verdict."""
    if not prompts:
        raise GemmakitError("give at least one prompt")
    if new_tokens < 1:
        raise GemmakitError("--new-tokens must be at least 1")
    rows = [compare_prompt(a, b, p, new_tokens) for p in prompts]
    text = DEFAULT_TEXT.read_text() if text is None else text
    ids_a, ids_b = text_ids(a, text, max_tokens), text_ids(b, text, max_tokens)
    if len(ids_a) < 2:
        raise GemmakitError("the text is too short to measure perplexity")
    stride = context - 1
    ppl_a = perplexity(a.model, ids_a, a.tokenizer.bos_id, context, stride, progress).perplexity
    ppl_b = perplexity(b.model, ids_b, b.tokenizer.bos_id, context, stride, progress).perplexity
    same_tok = ids_a == ids_b and all(r["same_tokens"] for r in rows)
    agreement = sum(r["greedy_agreement"] for r in rows)
    total = sum(r["new_tokens"] for r in rows)
    max_diff = max(r["max_abs_logit_diff"] for r in rows)
    ppl_change = ppl_b / ppl_a - 1
    verdict, reason = classify(same_tok, max_diff, agreement, total, ppl_change, thresholds)
    return {
        "a": str(a.source.path),
        "b": str(b.source.path),
        "prompts": rows,
        "same_tokenization": same_tok,
        "max_abs_logit_diff": max_diff,
        "greedy_agreement": agreement,
        "greedy_total": total,
        "perplexity_a": ppl_a,
        "perplexity_b": ppl_b,
        "perplexity_change": ppl_change,
        "perplexity_method": f"{len(ids_a)} tokens, windows of {context} (one <bos> each), stride {stride}",
        "verdict": verdict,
        "reason": reason,
        "faithful": verdict != "different",
        "thresholds": dict(vars(thresholds)),
    }


def classify(
    same_tokenization: bool, max_diff: float, agreement: int, total: int, ppl_change: float,
    t: Thresholds = THRESHOLDS,
) -> tuple[str, str]:  # fmt: skip
    """(verdict, reason) from the measurements, by the thresholds in the module docstring."""
    ppl_ok = abs(math.log1p(ppl_change)) <= math.log1p(t.tolerance_ppl)
    if (
        same_tokenization
        and max_diff <= t.identical_logit
        and agreement == total
        and abs(ppl_change) <= t.identical_ppl
    ):
        return (
            "identical",
            f"max |Δlogit| {max_diff:.2g} <= {t.identical_logit:g} and every greedy token agrees",
        )
    if same_tokenization and agreement >= t.tolerance_agreement * total and ppl_ok:
        return "within quantization tolerance", (
            f"greedy agreement {agreement}/{total} >= {t.tolerance_agreement:.0%} and perplexity "
            f"{ppl_change:+.2%} within ±{t.tolerance_ppl:.0%}"
        )
    why = []
    if not same_tokenization:
        why.append("the tokenizers give different ids")
    if agreement < t.tolerance_agreement * total:
        why.append(f"greedy agreement {agreement}/{total} < {t.tolerance_agreement:.0%}")
    if not ppl_ok:
        why.append(f"perplexity {ppl_change:+.2%} beyond ±{t.tolerance_ppl:.0%}")
    return "different", "; ".join(why) or "the logits differ"
