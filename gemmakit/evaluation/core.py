"""Evaluation whose method is stated: perplexity and multiple-choice log-likelihood.

Two measurements, both written so that their numbers can be reproduced by hand:

* **Perplexity** (`perplexity`): the strided sliding-window method of Hugging Face's
  "Perplexity of fixed-length models" guide, adapted to Gemma: every window starts with
  exactly one `<bos>` and the `<bos>` is never a predicted token. Without it Gemma's
  perplexity is meaningless (Gemma 7B on LAMBADA: 5.9e9 without `<bos>`, 3.46 with it;
  lm-evaluation-harness GH#1465).
* **Multiple choice** (`evaluate_choice`): each choice is scored by the summed log-probability
  of its tokens given `<bos>` + the context, as lm-evaluation-harness scores
  `multiple_choice` tasks; `acc` takes the argmax of that sum and `acc_norm` the argmax of
  the sum divided by the choice's length in characters (lm-eval's `acc_norm`,
  `lm_eval/api/task.py`: `completion_len = len(choice)`).

Task files are JSONL in one of four common layouts (HellaSwag, ARC, MMLU, PIQA), detected
per file; prompts follow lm-eval's templates for those tasks so that the numbers are
comparable. Log-softmax is always taken in float32, over chunks of positions, because the
262k-entry vocabulary makes full-sequence float32 logits hundreds of megabytes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gemmakit.errors import GemmakitError
from gemmakit.paths import DATA

# Positions whose logits are materialized at once: 128 x 262144 float32 = 128 MiB.
LOGIT_CHUNK = 128
# Padded tokens per forward pass when scoring choices (rows x longest row).
BATCH_TOKENS = 4096
MAX_BATCH_ROWS = 64
DEFAULT_CONTEXT = 512

TASKS_DIR = DATA / "tasks"
DEFAULT_TEXT = DATA / "eval_text_wiki.txt"


def model_device(model) -> torch.device:
    # Gemma.device reads a norm weight: a quantized embedding holds no float weight.
    return model.device


@torch.inference_mode()
def target_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = LOGIT_CHUNK):
    """log p(target) and whether each target is the argmax, for hidden states (N, C).

    The logits of at most `chunk` positions exist at a time; log-softmax is computed in
    float32 as logit[target] - logsumexp(logits), which avoids a second (chunk, V) tensor.
    """
    logps, greedy = [], []
    for i in range(0, hidden.shape[0], chunk):
        logits = model.logits(hidden[i : i + chunk]).float()  # (n, V)
        t = targets[i : i + chunk, None]
        logps.append((logits.gather(-1, t)[:, 0] - torch.logsumexp(logits, dim=-1)).double())
        greedy.append(logits.argmax(-1) == t[:, 0])
    if not logps:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
    return torch.cat(logps).cpu(), torch.cat(greedy).cpu()


# --- perplexity ------------------------------------------------------------------------------


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
    device = model_device(model)
    total = 0.0
    bar = _progress(len(windows), "perplexity", "window", progress)
    # Windows of equal length run as one batch (all but the last are full): same numbers as
    # one at a time, fewer passes. No padding, so no attention mask is needed.
    rows = max(1, batch_tokens // context)
    i = 0
    while i < len(windows):
        group = [windows[i]]
        while len(group) < rows and i + len(group) < len(windows):
            b, e, _ = windows[i + len(group)]
            if e - b != group[0][1] - group[0][0]:
                break
            group.append(windows[i + len(group)])
        i += len(group)
        batch = torch.tensor([[bos_id, *ids[b:e]] for b, e, _ in group], device=device)  # (B, T)
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


# --- multiple-choice task files --------------------------------------------------------------

LAYOUTS = {
    "hellaswag": "HellaSwag-style {ctx|context, endings, label}",
    "arc": "ARC-style {question, choices: {text, label}, answerKey}",
    "mmlu": "MMLU-style {question, choices | A..D, answer (index or letter)}",
    "piqa": "PIQA-style {goal, sol1, sol2, label}",
}

# Prompt templates, as lm-eval's task configs write them (arc_easy.yaml, piqa.yaml,
# hellaswag/utils.py, mmlu/default/_default_template_yaml); target delimiter " ", few-shot
# delimiter "\n\n".
TEMPLATES = {
    "hellaswag": '"{activity_label}: {ctx}" + " " + ending   (no activity_label: "{ctx}")',
    "arc": '"Question: {question}\\nAnswer:" + " " + choice text',
    "mmlu": '"{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer:" + " " + letter; a '
    '"subject" field adds lm-eval\'s "The following are multiple choice questions (with '
    'answers) about {subject}.\\n\\n" before the prompt',
    "piqa": '"Question: {goal}\\nAnswer:" + " " + solution',
}
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
LETTERS = "ABCDEFGHIJ"


@dataclass
class Question:
    """One multiple-choice item: the prompt text, the strings scored, the gold index."""

    line: int
    text: str
    choices: list[str]
    label: int
    subject: str | None = None


@dataclass
class Task:
    name: str
    path: Path
    layout: str
    questions: list[Question]


def task_path(name: str) -> Path:
    """The shipped task file called `name` (see `list_tasks`)."""
    path = TASKS_DIR / f"{name}.jsonl"
    if not path.is_file():
        known = ", ".join(t["name"] for t in list_tasks()) or "none"
        raise GemmakitError(f"no shipped task {name!r}; shipped tasks: {known}")
    return path


def list_tasks() -> list[dict]:
    """Name, layout, question count and path of each shipped task file."""
    out = []
    for path in sorted(TASKS_DIR.glob("*.jsonl")):
        task = load_task(path, where=path.name)
        out.append({"name": path.stem, "layout": task.layout, "questions": len(task.questions),
                    "path": str(path)})  # fmt: skip
    return out


def detect_layout(record: dict) -> str | None:
    """The layout whose keys `record` has, or None."""
    keys = set(record)
    if "endings" in keys and ({"ctx", "context"} & keys):
        return "hellaswag"
    if {"question", "choices", "answerKey"} <= keys and isinstance(record["choices"], dict):
        return "arc"
    if {"goal", "sol1", "sol2"} <= keys:
        return "piqa"
    if {"question", "answer"} <= keys and ("choices" in keys or {"A", "B"} <= keys):
        return "mmlu"
    return None


def load_task(path: str | Path, where: str | None = None) -> Task:
    """Reads a JSONL task file; errors name the file and line (`where` replaces the path).

    Blank lines are skipped. Every record must have the layout detected on the first one.
    """
    path = Path(path)
    where = where or str(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise GemmakitError(f"{where}: no such file") from None
    except UnicodeDecodeError as e:
        raise GemmakitError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    layout, first_line, questions = None, 0, []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        at = f"{where}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise GemmakitError(f"{at}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(record, dict):
            raise GemmakitError(f"{at}: expected a JSON object, got {type(record).__name__}")
        kind = detect_layout(record)
        if kind is None:
            raise GemmakitError(
                f"{at}: unknown layout (keys: {', '.join(sorted(record)) or 'none'}); expected one of: "
                + "; ".join(LAYOUTS.values())
            )
        if layout is None:
            layout, first_line = kind, number
        elif kind != layout:
            raise GemmakitError(f"{at}: {kind} layout, but line {first_line} is {layout}; use one per file")
        questions.append(_PARSERS[kind](record, at, number))
    if not questions:
        raise GemmakitError(f"{where}: no questions (the file is empty)")
    return Task(path.stem, path, layout, questions)


def _text(record: dict, key: str, at: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise GemmakitError(f"{at}: {key!r} must be a non-empty string")
    return value.strip()


def _choices(values, at: str, key: str) -> list[str]:
    if not isinstance(values, list) or len(values) < 2:
        raise GemmakitError(f"{at}: {key!r} must be a list of at least 2 choices")
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise GemmakitError(f"{at}: every entry of {key!r} must be a non-empty string")
    return [v.strip() for v in values]


def _index(value, n: int, at: str, key: str = "label", letters: bool = False) -> int:
    """A gold index from an int, a digit string or (with `letters`) a letter."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    elif letters and isinstance(value, str) and len(value.strip()) == 1 and value.strip().isalpha():
        letter = value.strip().upper()
        index = LETTERS.find(letter)
        if not 0 <= index < n:
            raise GemmakitError(f"{at}: {key} {letter!r} out of range for {n} choices")
        return index
    if not isinstance(value, int):
        raise GemmakitError(f"{at}: {key} must be an index{' or a letter' if letters else ''}, got {value!r}")
    if not 0 <= value < n:
        raise GemmakitError(f"{at}: {key} {value} out of range for {n} choices")
    return value


def _parse_hellaswag(r: dict, at: str, line: int) -> Question:
    ctx = _text(r, "ctx" if "ctx" in r else "context", at)
    label = r.get("activity_label")
    text = f"{label.strip()}: {ctx}" if isinstance(label, str) and label.strip() else ctx
    endings = _choices(r["endings"], at, "endings")
    return Question(line, text, endings, _index(r.get("label"), len(endings), at))


def _parse_arc(r: dict, at: str, line: int) -> Question:
    question, c = _text(r, "question", at), r["choices"]
    texts = _choices(c.get("text"), at, "choices.text")
    labels = c.get("label")
    if not isinstance(labels, list) or len(labels) != len(texts):
        raise GemmakitError(f"{at}: 'choices.label' must list one label per choice text")
    labels = [str(x).strip() for x in labels]
    key = str(r["answerKey"]).strip()
    if key not in labels:
        raise GemmakitError(f"{at}: answerKey {key!r} is not one of the choice labels {', '.join(labels)}")
    return Question(line, f"Question: {question}\nAnswer:", texts, labels.index(key))


def _parse_mmlu(r: dict, at: str, line: int) -> Question:
    question = _text(r, "question", at)
    if "choices" in r:
        options = _choices(r["choices"], at, "choices")
    else:
        keys = [k for k in LETTERS if k in r]
        if keys != list(LETTERS[: len(keys)]):
            raise GemmakitError(
                f"{at}: option keys must run A, B, C, ... without gaps, got {', '.join(keys)}"
            )
        options = _choices([r[k] for k in keys], at, "A..D")
    if len(options) > len(LETTERS):
        raise GemmakitError(f"{at}: at most {len(LETTERS)} choices, got {len(options)}")
    letters = list(LETTERS[: len(options)])
    text = question + "".join(f"\n{x}. {o}" for x, o in zip(letters, options)) + "\nAnswer:"
    subject = r.get("subject") if isinstance(r.get("subject"), str) else None
    return Question(line, text, letters, _index(r["answer"], len(options), at, "answer", True), subject)


def _parse_piqa(r: dict, at: str, line: int) -> Question:
    goal = _text(r, "goal", at)
    sols = [_text(r, "sol1", at), _text(r, "sol2", at)]
    return Question(line, f"Question: {goal}\nAnswer:", sols, _index(r.get("label"), 2, at))


_PARSERS: dict[str, Callable[[dict, str, int], Question]] = {
    "hellaswag": _parse_hellaswag,
    "arc": _parse_arc,
    "mmlu": _parse_mmlu,
    "piqa": _parse_piqa,
}


def build_context(task: Task, index: int, fewshot: int = 0, seed: int = 1234) -> str:
    """The context of question `index`: description, `fewshot` solved examples, the prompt.

    Examples are drawn from the whole file except the question itself, with a generator
    seeded by (seed, index): a question's prompt is the same whatever `--limit` is.
    """
    q = task.questions[index]
    parts = []
    if fewshot:
        others = [i for i in range(len(task.questions)) if i != index]
        if fewshot > len(others):
            raise GemmakitError(f"--fewshot {fewshot}: the file has only {len(others)} other questions")
        rng = random.Random(seed * 1_000_003 + index)
        for i in rng.sample(others, fewshot):
            shot = task.questions[i]
            parts.append(shot.text + TARGET_DELIMITER + shot.choices[shot.label])
    parts.append(q.text)
    description = ""
    if task.layout == "mmlu" and q.subject:
        description = (
            "The following are multiple choice questions (with answers) about "
            f"{q.subject.replace('_', ' ')}.\n\n"
        )
    return description + FEWSHOT_DELIMITER.join(parts)


# --- scoring ---------------------------------------------------------------------------------


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


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = True
    return ids.to(device), mask.to(device)


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
    limit = model.config.max_position_embeddings
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
        seqs.append((seq[:-1], cont))  # the last token is predicted, never fed
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
    device = model_device(model)
    bar = _progress(len(seqs), "scoring", "choice", progress)
    start = 0
    while start < len(order):
        width = len(seqs[order[start]][0])
        rows = max(1, min(MAX_BATCH_ROWS, batch_tokens // max(width, 1)))
        batch = order[start : start + rows]
        start += len(batch)
        ids, mask = _left_pad([seqs[i][0] for i in batch], pad_id, device)
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


# --- settings to compare ---------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One row of a comparison: a model, an optional adapter and an optional quantization."""

    model: str | None = None
    adapter: str | None = None
    quantize: str | None = None

    @property
    def label(self) -> str:
        parts = [Path(self.model).name if self.model else "bundled"]
        if self.adapter:
            parts.append(f"+{Path(self.adapter).name}")
        parts.append(self.quantize or "none")
        return " ".join(parts)


def _none(value: str | None) -> str | None:
    return None if value is None or str(value).lower() in ("", "none", "base") else value


def settings(
    models: Iterable | None, adapters: Iterable | None, quantizations: Iterable | None
) -> list[Setting]:
    """Every combination of the given models x adapters x quantizations ("none" = without)."""
    ms = [_none(m) for m in (models or [None])]
    adapters_ = [_none(a) for a in (adapters or [None])]
    qs = [_none(q) for q in (quantizations or [None])]
    out = [Setting(m, a, q) for m in ms for a in adapters_ for q in qs]
    return list(dict.fromkeys(out))


def load_setting(setting: Setting, dtype: str = "auto", device: str | None = None):
    """Loads the model of `setting` and applies its adapter, then its quantization.

    The order is `gemmakit.inference.api.LLM`'s, so a row here is the model `generate` would run.
    """
    for needed, module, flag in (
        (setting.adapter, "gemmakit.lora", "--adapter"),
        (setting.quantize, "gemmakit.quant", "--quantize"),
    ):
        if needed and importlib.util.find_spec(module) is None:
            raise GemmakitError(f"{flag} needs {module}, which this installation of gemmakit does not have")
    from gemmakit.inference.api import LLM
    from gemmakit.loading import load

    loaded = load(setting.model, dtype=dtype, device=device)
    return LLM(loaded=loaded, quantization=setting.quantize, adapter=setting.adapter).loaded


# --- output helpers --------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(r, widths, numeric)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def _is_number(s: str) -> bool:
    try:
        float(s.replace("±", "").split()[0]) if s else None
        return True
    except ValueError:
        return False


def _progress(total: int, desc: str, unit: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled or None, leave=False)
