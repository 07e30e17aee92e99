"""Token ids to text, torch-free: incremental detokenization with stop strings (`TextStream`)
and the events a generation streams (`StreamEvent`). `inference/text.py` turns the engine's
steps into these events; the torch-free generation path (`inference/lean.py`) uses them as
they are, so both cut text at stop strings and across token boundaries the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gemmakit.inference.engine import TokenLogprob


@dataclass
class StreamEvent:
    """One step of streaming: `delta` is new text of request `index`.

    `token_id` is the token that produced it (None for an event that only ends a request);
    `finish_reason` is set on a request's last event: "stop" (a stop string or stop token),
    "length", or a caller's own reason; `logprob` is that token's log-probabilities when the
    request asked for them (`Request.logprobs`).
    """

    index: int
    delta: str
    token_id: int | None
    finish_reason: str | None = None
    logprob: TokenLogprob | None = None


class TextStream:
    """Incremental detokenization with stop strings for one request.

    Each step decodes the new token together with the tokens of the step before (its
    context; a SentencePiece decoder may drop the leading space of the first token it
    decodes, so the new text is the difference of two decodes that start alike), not the
    whole output: a step costs the same at token 2,000 as at token 2 (vLLM's incremental
    detokenizer works the same way). Multi-byte characters split across tokens come out
    whole: while the text ends in an incomplete character the context stays where it was.
    Text that could be the start of a stop string is held back until it is known not to be
    one.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0
        self.text = ""
        self.stopped = False
        self._longest_stop = max((len(s) for s in stop), default=0)
        # ids[:_read] decode to _done for good; ids[_context:_read] are decoded again with
        # the new tokens.
        self._done, self._context, self._read = "", 0, 0

    def _decode_new(self) -> tuple[str, bool]:
        """The text of all ids, decoding only those after the context, and whether it
        extends the final text `_done`."""
        ids = self.ids
        context = self.tokenizer.decode(ids[self._context : self._read])
        fresh = self.tokenizer.decode(ids[self._context :])
        if (context or self._context == 0) and fresh.startswith(context):
            return self._done + fresh[len(context) :], True
        # The context decodes to nothing (control tokens) or reads differently with the new
        # token after it: decode everything.
        text = self.tokenizer.decode(ids)
        return text, text.startswith(self._done)

    def push(self, token: int, final: bool = False) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text, extends = self._decode_new()
        # The final text held no stop string: one can only end in what came after it.
        checked = max(0, len(self._done) - self._longest_stop + 1) if extends else 0
        if not text.endswith("\ufffd"):  # whole characters: this text is final
            self._done, self._context, self._read = text, self._read, len(self.ids)
        for s in self.stop:
            at = text.find(s, checked)
            if at != -1:
                text, self.stopped, final = text[:at], True, True
        self.text = text
        if text.endswith("\ufffd") and not final:  # an incomplete UTF-8 sequence
            return ""
        safe = len(text) if final else len(text) - self._held_back(text)
        delta, self.sent = text[self.sent : safe], max(self.sent, safe)
        return delta

    def flush(self) -> str:
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
