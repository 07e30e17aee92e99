"""From token ids to text: incremental detokenization, stop strings and finish reasons.

`stream_text` is the one place a generation's steps become text events: the Python API
(`gemmakit.inference.api.LLM`) and the server's scheduler (`gemmakit.serving.scheduler`) both
consume it, so a stop string, a stop token and the length limit end a request the same way in
both.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from gemmakit.inference import speculative
from gemmakit.inference.engine import Request, TokenLogprob, generate_steps


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

    Text is re-decoded from the ids each step (so multi-byte characters split across
    tokens come out whole), and text that could be the start of a stop string is held
    back until it is known not to be one.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0
        self.text = ""
        self.stopped = False

    def push(self, token: int, final: bool = False) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            at = text.find(s)
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


def text_streams(tokenizer, requests: list[Request]) -> list[TextStream]:
    """A `TextStream` per request, with the request's stop strings."""
    return [TextStream(tokenizer, r.params.stop) for r in requests]


def finish_step(
    step: list[tuple[int, int]], requests: list[Request], streams: list[TextStream]
) -> list[StreamEvent]:
    """The text events of one `generate_steps` step; a stop string finishes its request.

    A request's last event carries all of its remaining text (held-back stop-string prefixes
    and incomplete characters included) and its finish reason. A speculating request may
    have several tokens in one step (in order): only its last ends it, and a stop string met
    at an earlier one ends it there, dropping the tokens after it from its output.
    """
    events = []
    for row, token in step:
        req, ts = requests[row], streams[row]
        if ts.stopped:  # a stop string ended it at an earlier token of this step
            continue
        n = len(ts.ids) + 1  # this token is the request's n-th
        last = n >= len(req.output_ids)
        delta = ts.push(token, final=last and req.finish_reason is not None)
        if ts.stopped:  # a stop string ends the request here
            if req.finish_reason is None or not last:
                req.finish_reason = "stop"
            del req.output_ids[n:], req.output_logprobs[n:]
            last = True
        reason = req.finish_reason if last else None
        if reason is not None:
            delta += ts.flush()
        logprob = req.output_logprobs[n - 1] if len(req.output_logprobs) >= n else None
        events.append(StreamEvent(row, delta, token, reason, logprob))
    return events


def stream_text(
    model, tokenizer, requests: list[Request], streams: list[TextStream] | None = None, draft=None
) -> Iterator[list[StreamEvent]]:
    """Generates for a batch of requests, yielding each step's text events.

    `streams` (from `text_streams`) lets the caller read each request's whole text after
    the last step. Between two steps the generation is suspended, so a caller may finish a
    request there (set its `finish_reason`): later steps neither sample nor report it.
    A batch in which a request asks for speculation runs through
    `gemmakit.inference.speculative` (one request after another), with `draft` as the
    draft model of "draft" speculation.
    """
    streams = streams if streams is not None else text_streams(tokenizer, requests)
    if any(r.params.speculative for r in requests):
        steps = speculative.generate_steps(model, requests, draft)
    else:
        steps = generate_steps(model, requests, tokenizer.pad_id)
    for step in steps:
        yield finish_step(step, requests, streams)
