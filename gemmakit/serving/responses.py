"""The OpenAI response bodies: choices, log-probabilities and usage, as the `openai` client
parses them (openai-python `types/chat/chat_completion*.py`, `types/completion*.py`).

A `Choice` gathers one row's events (text, tokens, finish reason, log-probabilities); the
functions here turn it into the JSON of a chat or completions response or streamed chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gemmakit.formats.tokenizer import BYTE, SPACE
from gemmakit.inference.engine import TokenLogprob
from gemmakit.inference.text import StreamEvent


@dataclass
class Choice:
    """One completion as it arrives: the events of one ticket row."""

    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    def add(self, ev: StreamEvent) -> None:
        self.text += ev.delta
        if ev.token_id is not None:
            self.tokens += 1
            self.token_ids.append(ev.token_id)
        self.finish_reason = ev.finish_reason or self.finish_reason
        if ev.logprob is not None:
            self.logprobs.append(ev.logprob)


def usage(prompt_tokens: list[int], n: int, choices: list[Choice], requests=()) -> dict:
    """OpenAI's usage: each prompt counted once (its n rows share it), every choice's tokens.
    Rows that speculated add OpenAI's `completion_tokens_details` counts of predicted tokens
    kept and rejected (its Predicted Outputs fields) for their proposals."""
    prompt = sum(prompt_tokens[::n])
    completion = sum(c.tokens for c in choices)
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    stats = [r.speculation for r in requests if r.speculation is not None]
    if stats:
        accepted = sum(s.accepted for s in stats)
        out["completion_tokens_details"] = {
            "accepted_prediction_tokens": accepted,
            "rejected_prediction_tokens": sum(s.proposed for s in stats) - accepted,
        }
    return out


# --- tokens as text ------------------------------------------------------------------------


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for: SentencePiece's "▁" is a space, <0xNN> one byte."""
    piece = tokenizer.pieces[token_id] if token_id < len(tokenizer.pieces) else ""
    if tokenizer.types[token_id] == BYTE and piece.startswith("<0x"):
        return bytes([int(piece[3:-1], 16)])
    return piece.replace(SPACE, " ").encode()


def token_text(raw: bytes) -> str:
    """A token's text; a piece of a multi-byte character is written as OpenAI writes it,
    "bytes:\\xe2\\x80" (its `bytes` field carries the exact values)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _chat_token(tokenizer, token_id: int, logprob: float) -> dict:
    raw = token_bytes(tokenizer, token_id)
    return {"token": token_text(raw), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(tokenizer, logprobs: list[TokenLogprob]) -> dict:
    """A chat choice's `logprobs`: {"content": [token, logprob, bytes, top_logprobs], "refusal"}."""
    content = []
    for lp in logprobs:
        entry = _chat_token(tokenizer, lp.token_id, lp.logprob)
        entry["top_logprobs"] = [_chat_token(tokenizer, t, v) for t, v in lp.top]
        content.append(entry)
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer, logprobs: list[TokenLogprob], offset: int) -> dict:
    """A completions choice's legacy `logprobs`: parallel lists, `text_offset` counting from
    `offset` (the characters already in the choice's text, e.g. an echoed prompt)."""
    tokens, offsets = [], []
    for lp in logprobs:
        tokens.append(token_text(token_bytes(tokenizer, lp.token_id)))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{token_text(token_bytes(tokenizer, t)): v for t, v in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }
