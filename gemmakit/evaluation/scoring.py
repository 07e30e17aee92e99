"""Multiple-choice scoring by log-likelihood, as lm-evaluation-harness scores `multiple_choice`.

Each choice is scored by the summed log-probability of its tokens given `<bos>` + the
context; `acc` takes the argmax of that sum and `acc_norm` the argmax of the sum divided by
the choice's length in characters (lm-eval's `acc_norm`, `lm_eval/api/task.py`:
`completion_len = len(choice)`). `scoring_rule` states the rule in words, as
`gemmakit eval choice` prints it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from gemmakit.errors import GemmakitError
from gemmakit.evaluation.logprobs import BATCH_TOKENS, progress_bar, target_logprobs
from gemmakit.evaluation.tasks import TARGET_DELIMITER, TEMPLATES, Task, build_context
from gemmakit.inference.engine import left_pad

# Rows per forward pass when scoring choices, whatever BATCH_TOKENS allows for short rows.
MAX_BATCH_ROWS = 64


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(<bos> + context ids, continuation ids), the continuation tokenized after the context.

    As lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation,
    then the continuation's ids are those of encode(context + continuation) after the
    context's ids, so the space between them is tokenized as it would be in running text.
    Where that split does not reproduce the context's own ids (a token merging across the
    boundary), the continuation is encoded on its own instead.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = tokenizer.encode(context, add_bos=True)
    whole = tokenizer.encode(context + continuation, add_bos=True)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx) :]
    return ctx, tokenizer.encode(continuation, add_bos=False)


def _fitted_inputs(pairs, limit: int) -> list[tuple[list[int], list[int]]]:
    """(ids fed to the model, continuation) per pair, the context's oldest tokens cut to fit.

    The `<bos>` is always kept, and the last continuation token is predicted, never fed.
    """
    seqs = []
    for ctx, cont in pairs:
        if not cont:
            raise ValueError("an empty continuation has no log-likelihood")
        if not ctx:
            raise ValueError("the context must hold at least the <bos>")
        seq = ctx + cont
        if len(seq) > limit:  # keep <bos>, drop the oldest context tokens
            seq = ctx[:1] + seq[len(seq) - limit + 1 :]
            if len(cont) >= len(seq):
                raise GemmakitError(f"a continuation of {len(cont)} tokens does not fit {limit} positions")
        seqs.append((seq[:-1], cont))
    return seqs


@torch.inference_mode()
def score_continuations(
    model, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int = 0,
    batch_tokens: int = BATCH_TOKENS, progress: bool = False,
) -> list[tuple[float, bool]]:  # fmt: skip
    """(sum of log p(continuation tokens | context), greedy?) for each (context, continuation).

    Contexts carry their `<bos>`. Requests are sorted longest first and run as left-padded
    batches of at most `batch_tokens` padded ids, with an attention mask; only the
    positions that predict continuation tokens go through the output head.
    """
    seqs = _fitted_inputs(pairs, model.config.max_position_embeddings)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
    device = model.device
    bar = progress_bar(len(seqs), "scoring", "choice", progress)
    start = 0
    while start < len(order):
        width = len(seqs[order[start]][0])
        rows = max(1, min(MAX_BATCH_ROWS, batch_tokens // max(width, 1)))
        batch = order[start : start + rows]
        start += len(batch)
        ids, mask = left_pad([seqs[i][0] for i in batch], pad_id, device)
        hidden = model.hidden_states(ids, mask)  # (B, W, C)
        W = ids.shape[1]
        # A continuation of n tokens is predicted by the row's last n positions.
        picked = torch.cat([hidden[r, W - len(seqs[i][1]) :] for r, i in enumerate(batch)])
        targets = torch.tensor([t for i in batch for t in seqs[i][1]], device=device)
        logps, greedy = target_logprobs(model, picked, targets)
        at = 0
        for i in batch:
            n = len(seqs[i][1])
            results[i] = (float(logps[at : at + n].sum()), bool(greedy[at : at + n].all()))
            at += n
        bar.update(len(batch))
    bar.close()
    return results


@dataclass
class ChoiceResult:
    """Accuracies over `n` questions, with lm-eval's standard errors (sample std / sqrt n)."""

    n: int
    acc: float
    acc_stderr: float | None
    acc_norm: float
    acc_norm_stderr: float | None
    tokens: int
    samples: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self, samples: bool = False) -> dict:
        d = asdict(self)
        if not samples:
            d.pop("samples")
        return d


def _stderr(p: float, n: int) -> float | None:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None


def evaluate_choice(
    loaded, task: Task, fewshot: int = 0, seed: int = 1234, limit: int | None = None,
    batch_tokens: int = BATCH_TOKENS, progress: bool = False,
) -> ChoiceResult:  # fmt: skip
    """Scores the first `limit` questions of `task` (all when None); see `scoring_rule`."""
    if fewshot < 0:
        raise GemmakitError(f"--fewshot must be >= 0, got {fewshot}")
    if limit is not None and limit < 1:
        raise GemmakitError(f"--limit must be >= 1, got {limit}")
    count = len(task.questions) if limit is None else min(limit, len(task.questions))
    tok = loaded.tokenizer
    pairs = []
    for i in range(count):
        context = build_context(task, i, fewshot, seed)
        pairs += [encode_pair(tok, context, TARGET_DELIMITER + c) for c in task.questions[i].choices]
    scores = score_continuations(loaded.model, pairs, tok.pad_id, batch_tokens, progress)
    samples, hits, hits_norm = [], 0, 0
    at = 0
    for i in range(count):
        q = task.questions[i]
        lls = [scores[at + j][0] for j in range(len(q.choices))]
        at += len(q.choices)
        pred = max(range(len(lls)), key=lls.__getitem__)
        normed = [ll / len(c) for ll, c in zip(lls, q.choices)]
        pred_norm = max(range(len(normed)), key=normed.__getitem__)
        hits += pred == q.label
        hits_norm += pred_norm == q.label
        samples.append(
            {"line": q.line, "label": q.label, "pred": pred, "pred_norm": pred_norm, "loglikelihoods": lls}
        )
    acc, acc_norm = hits / count, hits_norm / count
    tokens = sum(len(c) + len(k) for c, k in pairs)
    return ChoiceResult(count, acc, _stderr(acc, count), acc_norm, _stderr(acc_norm, count), tokens, samples)


def scoring_rule(layouts: Sequence[str], fewshot: int = 0, seed: int = 1234) -> str:
    """The scoring rule in words, as printed by `gemmakit eval choice`."""
    shots = (
        f"{fewshot}-shot: {fewshot} solved examples from the same file (never the question itself; "
        f'drawn by random.Random({seed} * 1000003 + question index)), each written prompt + " " + '
        'gold choice, joined with "\\n\\n" and put before the question'
        if fewshot
        else "zero-shot: the context is the question's prompt alone"
    )
    lines = [
        "Scoring rule (lm-evaluation-harness multiple_choice):",
        "  LL(c) = sum_j ln p(c_j | <bos>, context, c_1..c_{j-1})  (log-softmax in float32)",
        '  continuation = " " + choice text; its tokens are those encode(<bos> + context + continuation)',
        "    adds after ids(<bos> + context), so the space is tokenized as in running text",
        f"  {shots}",
        "  acc      = mean over questions of [argmax_c LL(c) == gold]",
        "  acc_norm = mean over questions of [argmax_c LL(c) / len(choice text) == gold],",
        "             len in characters without the leading space (lm-eval's acc_norm)",
        "  ± = sample standard error of the mean, sqrt(p (1 - p) / (n - 1))",
    ]
    lines += [f"  prompt ({layout}): {TEMPLATES[layout]}" for layout in dict.fromkeys(layouts)]
    return "\n".join(lines)
