"""From token ids to text: incremental detokenization, stop strings and finish reasons.

`stream_text` is the one place a generation's steps become text events: the Python API
(`gemmakit.inference.api.LLM`) and the server's scheduler (`gemmakit.serving.scheduler`) both
consume it, so a stop string, a stop token and the length limit end a request the same way in
both.
"""

from __future__ import annotations

from collections.abc import Iterator

from gemmakit.inference import speculative
from gemmakit.inference.engine import Request, generate_steps
from gemmakit.inference.text_stream import StreamEvent, TextStream


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
