"""Perplexity by strided sliding windows, each starting with exactly one `<bos>`.

The method is the strided loop of Hugging Face's "Perplexity of fixed-length models" guide,
adapted to Gemma: every window starts with exactly one `<bos>` and the `<bos>` is never a
predicted token. Without it Gemma's perplexity is meaningless (Gemma 7B on LAMBADA: 5.9e9
without `<bos>`, 3.46 with it; lm-evaluation-harness GH#1465). `perplexity_method` states the
method in words, as `gemmakit eval perplexity` prints it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from gemmakit.errors import GemmakitError
from gemmakit.evaluation.logprobs import BATCH_TOKENS, progress_bar, target_logprobs
from gemmakit.paths import DATA

DEFAULT_CONTEXT = 512
# The text `gemmakit eval perplexity` scores when given none: an encyclopedia-style text on
# timekeeping written for gemmakit (about 1,450 Gemma tokens).
DEFAULT_TEXT = DATA / "eval_text_wiki.txt"


@dataclass
class PerplexityResult:
    """Mean negative log-likelihood per predicted token (nats) and its exponential."""

    tokens: int
    nll: float
    perplexity: float
    context: int
    stride: int
    windows: int

    def to_dict(self) -> dict:
        return asdict(self)


def strided_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_predicted) over text token indices, one tuple per window.

    A window holds `<bos>` + tokens[begin:end] (at most `context` ids) and predicts
    tokens[first_predicted:end]; windows advance by `stride` tokens, so each token is
    predicted exactly once, with up to `context - stride` ids of left context (the `<bos>`
    included) carried over from the previous window. This is the strided loop of HF's
    "Perplexity of fixed-length models", with one slot per window kept for the `<bos>`.
    """
    span = context - 1  # text tokens per window, after the <bos>
    if span < 1:
        raise GemmakitError(f"--context must be at least 2 (one <bos> + one token), got {context}")
    if not 1 <= stride <= span:
        raise GemmakitError(f"--stride must be between 1 and context - 1 = {span}, got {stride}")
    windows, begin, predicted_to = [], 0, 0
    while predicted_to < n_tokens:
        end = min(begin + span, n_tokens)
        windows.append((begin, end, predicted_to))
        predicted_to = end
        begin += stride
    return windows


def _equal_length_groups(windows: list[tuple[int, int, int]], rows: int):
    """Consecutive windows of equal length, at most `rows` at a time (all but the last are full).

    A group runs as one batch: the same numbers as one window at a time, fewer passes, and no
    padding, so no attention mask is needed.
    """
    i = 0
    while i < len(windows):
        group = [windows[i]]
        while len(group) < rows and i + len(group) < len(windows):
            b, e, _ = windows[i + len(group)]
            if e - b != group[0][1] - group[0][0]:
                break
            group.append(windows[i + len(group)])
        i += len(group)
        yield group


@torch.inference_mode()
def sequence_nll(
    model, ids: Sequence[int], bos_id: int, context: int = DEFAULT_CONTEXT, stride: int | None = None,
    progress: bool = False, batch_tokens: int = BATCH_TOKENS,
) -> tuple[float, int, int]:  # fmt: skip
    """Summed NLL (nats) of `ids` (text tokens, no `<bos>`), the tokens predicted, the windows.

    See `strided_windows` for the method. The `<bos>` of each window is model input only.
    """
    stride = stride or max(1, context // 2)
    ids = list(ids)
    if ids and ids[0] == bos_id:
        ids = ids[1:]  # the <bos> is added per window, never predicted
    if not ids:
        raise GemmakitError("the text has no tokens to predict")
    limit = model.config.max_position_embeddings
    if context > limit:
        raise GemmakitError(f"--context {context} exceeds the model's {limit} positions")
    windows = strided_windows(len(ids), context, stride)
    total = 0.0
    bar = progress_bar(len(windows), "perplexity", "window", progress)
    for group in _equal_length_groups(windows, rows=max(1, batch_tokens // context)):
        batch = torch.tensor([[bos_id, *ids[b:e]] for b, e, _ in group], device=model.device)  # (B, T)
        hidden = model.hidden_states(batch)  # (B, T, C)
        # Window position j predicts window id j + 1; text token k sits at k - begin + 1.
        spans = [(first - b, e - b) for b, e, first in group]
        picked = torch.cat([hidden[r, lo:hi] for r, (lo, hi) in enumerate(spans)])
        targets = torch.cat([batch[r, lo + 1 : hi + 1] for r, (lo, hi) in enumerate(spans)])
        logps, _ = target_logprobs(model, picked, targets)
        total -= float(logps.sum())
        bar.update(len(group))
    bar.close()
    return total, len(ids), len(windows)


def perplexity(
    model, ids: Sequence[int], bos_id: int, context: int = DEFAULT_CONTEXT, stride: int | None = None,
    progress: bool = False, batch_tokens: int = BATCH_TOKENS,
) -> PerplexityResult:  # fmt: skip
    """Perplexity of token ids by the strided method (see `strided_windows`).

    Args:
        model: a `gemmakit.model.gemma.Gemma`.
        ids: the text's token ids; a leading `<bos>` is dropped (each window adds its own).
        bos_id: the tokenizer's `<bos>` id.
        context: ids per window, the `<bos>` included.
        stride: tokens each window advances (default context // 2).
        batch_tokens: windows run together, up to this many ids per forward pass.
    """
    stride = stride or max(1, context // 2)
    total, n, windows = sequence_nll(model, ids, bos_id, context, stride, progress, batch_tokens)
    nll = total / n
    return PerplexityResult(n, nll, math.exp(nll), context, stride, windows)


@torch.inference_mode()
def chunked_perplexity(
    model, tokens: Sequence[int], bos_id: int, context: int = DEFAULT_CONTEXT
) -> PerplexityResult:
    """Perplexity by llama.cpp's `llama-perplexity` method, to compare with it like for like.

    `tokens` is the text as llama.cpp tokenizes it (its `<bos>` first). They are cut into
    len // context non-overlapping chunks (the rest is dropped); each chunk's first id is
    replaced by `<bos>` and only its second half is scored: positions context/2 ... context-2
    predict the ids after them (llama.cpp tools/perplexity/perplexity.cpp, `first = n_ctx/2`,
    process_logits over n_ctx - 1 - first tokens per chunk).
    """
    chunks = len(tokens) // context
    if chunks < 1:
        raise GemmakitError(f"the text has {len(tokens)} tokens, fewer than one chunk of {context}")
    first, total, count = context // 2, 0.0, 0
    for i in range(chunks):
        chunk = [bos_id, *tokens[i * context + 1 : (i + 1) * context]]
        batch = torch.tensor([chunk], device=model.device)  # (1, context)
        hidden = model.hidden_states(batch)[0, first : context - 1]  # (context - 1 - first, C)
        logps, _ = target_logprobs(model, hidden, batch[0, first + 1 :])
        total -= float(logps.sum())
        count += logps.numel()
    return PerplexityResult(count, total / count, math.exp(total / count), context, context, chunks)


def text_perplexity(
    loaded, text: str, context: int = DEFAULT_CONTEXT, stride: int | None = None, progress: bool = False,
    batch_tokens: int = BATCH_TOKENS,
) -> PerplexityResult:  # fmt: skip
    """Perplexity of a text under a `gemmakit.loading.Loaded` model (see `perplexity`)."""
    tok = loaded.tokenizer
    ids = tok.encode(text, add_bos=False)
    return perplexity(loaded.model, ids, tok.bos_id, context, stride, progress, batch_tokens)


def perplexity_method(context: int, stride: int) -> str:
    """The method, in words, as printed by `gemmakit eval perplexity`."""
    return (
        f"Method: windows of <bos> + up to {context - 1} text tokens (context {context}), advancing "
        f"{stride} tokens; each token is predicted once, with up to {context - stride} ids of "
        "left context (<bos> included) from the previous window; <bos> starts every window and is "
        "never predicted.\n"
        "nll = mean over predicted tokens of -ln p(token | window prefix), log-softmax in float32; "
        "perplexity = exp(nll)."
    )
