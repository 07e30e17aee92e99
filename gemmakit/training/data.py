"""Supervised fine-tuning data: reading rows, formatting, tokenizing with labels, batching.

Rows come from JSONL (or a JSON list) with one of three shapes, or from a Hugging Face
dataset name (`datasets.load_dataset`, online only):

    {"text": "### Human: What is 2+2?### Assistant: 4."}            guanaco style
    {"prompt": "What is 2+2?", "completion": "4."}
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

Every row becomes segments of text marked prompt or response, rendered either in the guanaco
format (`### Human: …### Assistant: …`, as the openassistant-guanaco data set writes it) or,
with `chat_template=True`, in the model's own chat template when its tokenizer has one (Gemma
4's `<|turn>` format, say), else Gemma's chat format
(`<start_of_turn>user\\n…<end_of_turn>\\n<start_of_turn>model\\n…`).

Tokenization rules:
- exactly one `<bos>` at the start (a `<bos>` written in the data is not doubled);
- the example ends with `<eos>` (guanaco format) or `<end_of_turn>` (chat format), and that
  token is kept in the labels, so the model learns to stop;
- padding is on the right with Gemma's `<pad>` (id 0), never `<eos>`, and is never a label;
- with `responses_only`, prompt tokens get label -100 (ignored by the loss).
Segments are tokenized separately, so a response's tokens are exactly the tokens the model
generates after the prompt at inference time.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from gemmakit.errors import GemmakitError
from gemmakit.paths import DATA

IGNORE = -100
HUMAN, ASSISTANT = "### Human:", "### Assistant:"
_TURN_RE = re.compile(r"###\s*(Human|Assistant)\s*:")
SHIPPED = DATA / "guanaco_sample.jsonl"
# The name `--data` and `--eval-data` accept for SHIPPED.
SAMPLE_NAME = "guanaco-sample"


@dataclass
class Example:
    """One tokenized training example; `labels` aligned with `input_ids` (not shifted)."""

    input_ids: list[int]
    labels: list[int]
    # For packed rows: the example index of each token (None: one example).
    segments: list[int] | None = None

    def __len__(self):
        return len(self.input_ids)


# --- reading ----------------------------------------------------------------------------------


def shipped_dataset() -> Path:
    """The small guanaco-format dataset that ships with gemmakit (for demos and tests)."""
    return SHIPPED


def read_rows(source: str | Path, split: str = "train") -> list[dict]:
    """Rows of a local .jsonl/.json file, or of a Hugging Face dataset (`name` or `name:split`)."""
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.exists():
        raise GemmakitError(f"{path}: not a file")
    name = str(source)
    if name.count(":") == 1 and "/" in name.split(":")[0]:
        name, split = name.split(":")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) or name.endswith((".jsonl", ".json")):
        raise GemmakitError(f"{source}: no such file (and not a Hugging Face dataset name)")
    return _read_hub(name, split)


class Row(dict):
    """A data row that knows where it came from (`where`: "FILE:LINE", "FILE item N" or
    "NAME row N"), so that messages name the file's line after the rows were split and shuffled."""

    where: str = ""


def _row(value, where: str) -> Row:
    if not isinstance(value, dict):
        raise GemmakitError(f"{where}: a row must be a JSON object, got {_json_kind(value)}")
    row = Row(value)
    row.where = where
    return row


def _read_file(path: Path) -> list[dict]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise GemmakitError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise GemmakitError(f"{path}: not valid JSON ({e})") from None
        except RecursionError:
            raise GemmakitError(f"{path}: JSON nested too deeply") from None
        rows = [_row(r, f"{path} item {i}") for i, r in enumerate(items, 1)]
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise GemmakitError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise GemmakitError(f"{path}:{i}: JSON nested too deeply") from None
            rows.append(_row(value, f"{path}:{i}"))
    if not rows:
        raise GemmakitError(f"{path}: no rows")
    return rows


def _read_hub(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise GemmakitError(
            f"{name}: no such file; loading it as a Hugging Face dataset needs the `datasets` "
            "package (pip install datasets) and a network connection"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, unknown split: all one line for the user
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GemmakitError(
            f"{name}: could not load the Hugging Face dataset (split {split!r}): {msg}. "
            "Offline? Pass a local JSONL file instead."
        ) from None
    return [_row(dict(r), f"{name} row {i}") for i, r in enumerate(ds, 1)]


# --- formatting -------------------------------------------------------------------------------


def parse_guanaco(text: str) -> list[tuple[str, str]]:
    """[(role, content)] from `### Human: …### Assistant: …` text; [] when it has no turns."""
    marks = list(_TURN_RE.finditer(text))
    if not marks:
        return []
    turns = []
    for m, nxt in zip(marks, marks[1:] + [None]):
        role = "user" if m.group(1) == "Human" else "assistant"
        turns.append((role, text[m.end() : nxt.start() if nxt else len(text)].strip()))
    return turns


def _where(row: dict, index) -> str:
    """Where a row is, for messages: its file line when read from a file, else `row INDEX`."""
    return getattr(row, "where", "") or f"row {index}"


def row_turns(row: dict, index=0) -> tuple[list[tuple[str, str]] | None, str | None]:
    """(turns, None) for conversational rows, (None, text) for plain text rows.

    A field of the wrong type (a null prompt, a number as content) is an error: training on
    its Python spelling ("None") would teach the model text that is in no data.
    """
    where = _where(row, index)
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise GemmakitError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        turns, system = [], ""
        for m in msgs:
            role, content = m.get("role"), m.get("content")
            _check_text(content, where, "message content")
            if role == "system":
                system += content.strip() + "\n\n"
            elif role in ("user", "human"):
                turns.append(("user", (system + content).strip()))
                system = ""
            elif role in ("assistant", "model", "gpt"):
                turns.append(("assistant", content.strip()))
            else:
                raise GemmakitError(f"{where}: unknown role {role!r}")
        return turns, None
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        for name, value in (("prompt", prompt), ("completion", completion)):
            _check_text(value, where, f"'{name}'")
        return [("user", prompt.strip()), ("assistant", completion.strip())], None
    if "text" in row:
        text = row["text"]
        _check_text(text, where, "'text'")
        turns = parse_guanaco(text)
        return (turns, None) if turns else (None, text)
    raise GemmakitError(f"{where}: needs 'text', 'prompt'+'completion' or 'messages' (has {sorted(row)})")


def _check_text(value, where: str, name: str) -> None:
    """Refuses a field that is not a string, or not Unicode text (JSON's "\\ud800" escape
    decodes to a lone surrogate, which the tokenizer cannot take)."""
    if not isinstance(value, str):
        raise GemmakitError(f"{where}: {name} must be a string, got {_json_kind(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GemmakitError(
            f"{where}: {name} holds a lone surrogate (U+{ord(value[e.start]):04X}), which is not text"
        ) from None


def _json_kind(value) -> str:
    """A value's type as JSON names it (null, number, ...), for messages about data files."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def format_row(row: dict, chat_template: bool = False, index=0, render=None) -> list[tuple[str, bool]]:
    """Segments [(text, is_response)] of a row, without BOS or the final end token.

    Guanaco format: `### Human: q### Assistant: a` exactly as the guanaco data is written;
    the response segment is what follows `### Assistant:`. Chat format: Gemma's turns, each
    model turn closed by `<end_of_turn>` inside the response (it is what the model must emit).
    [] for a row with nothing to learn from: empty text, or no assistant turn with content
    (it would otherwise train `<bos><eos>`, teaching the model to stop at once).

    `render(messages, add_generation_prompt)`, the tokenizer's own chat template, replaces
    Gemma's built-in chat format when given (see `_template_segments`).
    """
    turns, text = row_turns(row, index)
    if turns is None:
        if not text.strip():
            return []
        if chat_template:
            raise GemmakitError(
                f"{_where(row, index)}: plain text without '### Human:'/'### Assistant:' turns cannot be "
                "put into the chat template"
            )
        return [(text, True)]
    if not any(role == "assistant" and content for role, content in turns):
        return []
    if chat_template and render is not None:
        return _template_segments(turns, render, _where(row, index))
    if chat_template:
        segs, prompt = [], ""
        for role, content in turns:
            if role == "user":
                prompt += f"<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n"
            else:
                segs += [(prompt, False), (f"{content}<end_of_turn>", True)]
                prompt = "\n"
        return [s for s in segs if s[0]]
    segs, prompt = [], ""
    for role, content in turns:
        if role == "user":
            prompt += f"{HUMAN} {content}{ASSISTANT}"
        else:
            segs += [(prompt, False), (f" {content}", True)]
            prompt = ""
    return [s for s in segs if s[0]]


def _template_segments(turns, render, where: str) -> list[tuple[str, bool]]:
    """Segments of a conversation in the model's own template, split as the template writes
    the whole conversation: an assistant turn's response is what rendering the conversation
    through that turn adds past the point where it parts from the rendering up to the turn's
    generation prompt (its content and the template's end-of-turn marker, which the model must
    learn to emit). The generation prompt itself may differ from the history: Gemma 4's adds an
    empty thinking channel that its rendered history leaves out. A template that rewrites
    earlier turns as later ones arrive has no such split, and is refused."""
    messages, segs, done = [], [], ""
    for role, content in turns:
        if role == "user":
            messages.append({"role": "user", "content": content})
            continue
        prompt = render(messages, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": content})
        full = render(messages, add_generation_prompt=False)
        split = len(os.path.commonprefix([prompt, full]))
        if not full.startswith(done) or split < len(done) or split == len(full):
            raise GemmakitError(
                f"{where}: the model's chat template renders earlier turns differently as the "
                "conversation grows, so prompt and response cannot be told apart; train without "
                "--chat-template"
            )
        segs += [(full[len(done) : split], False), (full[split:], True)]
        done = full
    return [s for s in segs if s[0]]


def prompt_text(question: str, chat_template: bool = False) -> str:
    """The prompt that asks `question` in the trained format (for generation after tuning)."""
    if chat_template:
        return f"<start_of_turn>user\n{question}<end_of_turn>\n<start_of_turn>model\n"
    return f"{HUMAN} {question}{ASSISTANT}"


def tokenize(
    segments: list[tuple[str, bool]],
    tokenizer,
    max_length: int,
    responses_only: bool = False,
    end_id: int | None = None,
) -> Example | None:
    """Tokens and labels of one formatted row; None when nothing is left to learn from.

    Truncation keeps the start; a truncated example loses its end token (it did not end).
    """
    ids, labels = [tokenizer.bos_id], [IGNORE]  # BOS is never a target
    for text, is_response in segments:
        toks = tokenizer.encode(text, add_bos=False)
        if len(ids) == 1:
            while toks and toks[0] == tokenizer.bos_id:  # a <bos> written in the data
                toks = toks[1:]
        ids += toks
        labels += toks if (is_response or not responses_only) else [IGNORE] * len(toks)
    if end_id is not None:
        ids.append(end_id)
        labels.append(end_id)
    if len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(t == IGNORE for t in labels[1:]):
        return None
    return Example(ids, labels)


def build_examples(rows, tokenizer, max_length, chat_template=False, responses_only=False):
    """(examples, skipped count) for rows; chat rows end with the end-of-turn marker (the
    template's, or <end_of_turn>), others with <eos>.

    Skipped: rows with nothing to learn from (see `format_row`), and rows whose responses
    fall entirely past `max_length` under `responses_only`.
    """
    out, dropped = [], 0
    own_template = getattr(tokenizer, "chat_template", None) is not None
    render = tokenizer.apply_chat_template if chat_template and own_template else None
    for i, row in enumerate(rows, 1):
        segs = format_row(row, chat_template, i, render)
        if not segs:
            dropped += 1
            continue
        end = None if chat_template else tokenizer.eos_id
        ex = tokenize(segs, tokenizer, max_length, responses_only, end)
        if ex is None:
            dropped += 1
        else:
            out.append(ex)
    return out, dropped


def split_rows(rows: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """A deterministic held-out split: the same rows for the same seed and fraction."""
    if not 0 <= eval_fraction < 1:
        raise GemmakitError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    n_eval = round(len(rows) * eval_fraction)
    if eval_fraction > 0 and len(rows) > 1:
        n_eval = max(1, n_eval)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in eval_idx], [
        r for i, r in enumerate(rows) if i in eval_idx
    ]


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Greedy first-fit packing of whole examples into rows of at most `max_length` tokens.

    Each example keeps its own BOS and end token, and its BOS is never a label, so no example
    is trained to predict the next one's start. Each token records its example (`segments`);
    `collate` turns them into `segment_ids` and per-example `positions`, with which the model
    attends within each example only (a block-diagonal mask) and restarts positions at each
    example's start, so a packed row trains as its examples would one by one, without padding.
    """
    rows: list[Example] = []
    for ex in examples:
        for row in rows:
            if len(row) + len(ex) <= max_length:
                row.segments += [row.segments[-1] + 1] * len(ex)
                row.input_ids += ex.input_ids
                row.labels += ex.labels
                break
        else:
            rows.append(Example(list(ex.input_ids), list(ex.labels), [0] * len(ex)))
    return rows


def collate(examples: list[Example], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids (pad_id), attention_mask (False on padding), labels (-100).

    Packed examples add `segment_ids` (B, T) (padding gets -1) and `positions` (B, T) that
    restart at 0 with each example.
    """
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    packed = any(e.segments is not None for e in examples)
    if packed:
        segs = torch.full((len(examples), width), -1, dtype=torch.long)
        positions = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = True
        if packed:
            s = torch.tensor(e.segments if e.segments is not None else [0] * n)
            segs[i, :n] = s
            starts = torch.cat((torch.tensor([True]), s[1:] != s[:-1]))
            idx = torch.arange(n)
            first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), 0).values
            positions[i, :n] = idx - first
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if packed:
        out.update(segment_ids=segs, positions=positions)
    return out


def target_count(labels: torch.Tensor) -> int:
    """Tokens the loss is taken over (labels shifted by one, -100 ignored)."""
    return int((labels[:, 1:] != IGNORE).sum())
