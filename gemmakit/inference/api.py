"""A Python API shaped like vLLM's offline API.

    from gemmakit import LLM, SamplingParams
    llm = LLM(model="path/or/file.gguf")          # or LLM() for the bundled model
    outputs = llm.generate(["The best recipe for pasta is"],
                           SamplingParams(temperature=0.7, top_p=0.8, top_k=20, max_tokens=150))
    print(outputs[0].outputs[0].text)

vLLM's offline `LLM.generate` code runs with only the import changed: the same prompt forms,
`SamplingParams` fields and `RequestOutput` / `CompletionOutput` results.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from gemmakit.errors import GemmakitError
from gemmakit.inference import logits_processing, sampler
from gemmakit.inference.batching import Engine, available_memory, slot_bytes
from gemmakit.inference.engine import Request, SpeculationStats, TokenLogprob, check_length
from gemmakit.inference.sampling import SamplingParams, request_generator
from gemmakit.inference.text import StreamEvent, TextStream, finish_step, text_streams
from gemmakit.loading import Loaded, is_assistant_folder, load, load_assistant


@dataclass
class Logprob:
    """vLLM's `Logprob`: a token's log-probability, its rank in its step (1 = most likely,
    None when unknown) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One completion of a prompt. With `SamplingParams.logprobs` set, `logprobs[i]` maps the
    i-th token's id and its step's top ids to their `Logprob`s (vLLM's shape) and
    `cumulative_logprob` is the sum of the chosen tokens' log-probabilities."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    metrics: dict = field(default_factory=dict)


def _speculation(requests: list[Request]) -> dict:
    """{"speculation": the counts summed over `requests`} when they ran speculatively, else {}."""
    stats = [r.speculation for r in requests if r.speculation is not None]
    if not stats:
        return {}
    keys = ("steps", "proposed", "accepted", "generated")
    return {"speculation": SpeculationStats(**{k: sum(getattr(s, k) for s in stats) for k in keys}).as_dict()}


def _is_token(t, vocab: int) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool) and 0 <= t < vocab


class LLM:
    """Loads a model once and generates for batches of prompts.

    Args:
        model: a model folder, a .gguf file, or None for the bundled Gemma 3 270M.
        dtype: "float32", "bfloat16", "float16" (Gemma 1 only) or "auto".
        seed: seeds requests that give no seed of their own, as vLLM's `seed` does.
        quantization / adapter: optional, applied after loading (see `gemmakit.quant`
            and `gemmakit.lora`).
        draft_model: a smaller model with the same tokenizer (named as `model` is), loaded
            with the same dtype and device, for `SamplingParams(speculative="draft")`; or a
            Gemma 4 assistant folder (`gemma4_assistant`, the MTP drafter made for this
            target) for `SamplingParams(speculative="mtp")`.

    Attributes:
        memory: with `quantization`, {"before": ..., "after": ...}: the model's bytes in
            float (`quantization.float_memory`) and quantized (`model_memory`); None without.
    """

    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        seed: int = 0,
        quantization: str | None = None,
        adapter: str | None = None,
        loaded: Loaded | None = None,
        draft_model: str | None = None,
    ):
        from gemmakit.quant import float_memory, model_memory, quantize_model

        # Without an adapter to put under the quantizer, weights are quantized as they are
        # read: the float model never exists (int8 270M: 0.7 GB peak instead of 1.9 GB).
        streamed = bool(quantization) and loaded is None and not adapter
        self.loaded = loaded or load(
            model, dtype=dtype, device=device, quantize=quantization if streamed else None,
            keep_blocks=not quantization,  # quantized below: a GGUF is read as floats first
        )  # fmt: skip
        if adapter:
            from gemmakit.lora import load_adapter

            load_adapter(self.loaded.model, adapter)
        self.memory = None
        if quantization:
            if not streamed:
                quantize_model(self.loaded.model, quantization)
            net = self.loaded.model
            self.memory = {"before": float_memory(net), "after": model_memory(net)}
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        self.draft: Loaded | None = None
        self.assistant = None  # a Gemma 4 MTP drafter, when draft_model names one
        if draft_model is not None and is_assistant_folder(draft_model):
            from gemmakit.inference.proposers import check_assistant

            self.assistant = load_assistant(
                draft_model, dtype=self.model.dtype, device=str(self.model.device)
            )
            check_assistant(self.model, self.assistant)
        elif draft_model is not None:
            from gemmakit.inference.proposers import check_draft

            self.draft = load(draft_model, dtype=self.model.dtype, device=str(self.model.device))
            check_draft(self.model, self.tokenizer, self.draft.model, self.draft.tokenizer)
        self._generator = sampler.generator(seed)  # draws each request's seed
        self._next_id = 0
        self._engine: Engine | None = None  # kept between calls: its slots cache prefixes

    # --- requests ------------------------------------------------------------------------

    def _requests(self, prompts, params) -> tuple[list[Request], list[tuple[str | None, int]]]:
        """One Request per completion, the `n` rows of a prompt consecutive; and per prompt,
        its text (None for token ids) and its `n`."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise GemmakitError(
                f"give one SamplingParams, or one per prompt ({len(params_list)} for {len(prompts)} prompts)"
            )
        requests, texts = [], []
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            if not isinstance(p, SamplingParams):
                raise GemmakitError(f"prompt {i}: sampling params must be a SamplingParams, got {p!r}")
            if isinstance(prompt, dict):  # vLLM's {"prompt_token_ids": [...]} form
                if "prompt_token_ids" not in prompt:
                    raise GemmakitError(f"prompt {i}: a dict prompt needs 'prompt_token_ids'")
                ids, text = self._token_ids(prompt["prompt_token_ids"], i), None
            elif isinstance(prompt, (list, tuple)):
                ids, text = self._token_ids(prompt, i), None
            elif isinstance(prompt, str):
                ids, text = self.tokenizer.encode(prompt), prompt
            else:
                raise GemmakitError(
                    f"prompt {i}: a prompt is text, a list of token ids or a dict, got {prompt!r}"
                )
            for row_params in p.expand_n():
                # Drawn in prompt order, so an LLM's seed makes the whole call reproducible.
                gen = request_generator(row_params, self._generator)
                request = Request(ids, row_params, self.loaded.stop_ids, gen)
                requests.append(logits_processing.prepare(request, self.tokenizer))
            texts.append((text, p.n))
        return requests, texts

    def _token_ids(self, ids, i: int) -> list[int]:
        """A token-id prompt, checked: an id outside the embedding would index past it."""
        vocab = self.model.config.vocab_size
        if not isinstance(ids, (list, tuple)) or not ids:
            raise GemmakitError(f"prompt {i}: token ids must be a non-empty list")
        bad = [t for t in ids if not _is_token(t, vocab)]
        if bad:
            raise GemmakitError(f"prompt {i}: token id {bad[0]!r} is not an integer in [0, {vocab})")
        return [int(t) for t in ids]

    def stream(self, prompts, sampling_params=None) -> Iterator[StreamEvent]:
        """Yields text deltas for a batch of prompts as they are generated."""
        requests, _ = self._requests(prompts, sampling_params)
        if not requests:
            return
        yield from self._stream(requests, text_streams(self.tokenizer, requests))

    def _stream(self, requests: list[Request], streams: list[TextStream]) -> Iterator[StreamEvent]:
        """Runs the requests on the continuous-batching engine (the server's), yielding each
        step's text events; a row that fails alone ends with finish reason "error". Speculating
        rows verify their proposals in the same batched steps (`speculative.EngineSpeculation`)."""
        for mode, model, what in (
            ("draft", self.draft, "a draft model"),
            ("mtp", self.assistant, "a Gemma 4 assistant"),
        ):
            if model is None and any(r.params.speculative == mode for r in requests):
                raise GemmakitError(
                    f"speculative={mode!r} needs {what} (LLM(draft_model=...), --draft-model)"
                )
        engine = self._engine_for(requests)
        row_of = {id(r): i for i, r in enumerate(requests)}
        for r in requests:
            engine.add(r)
        try:
            while any(r.finish_reason is None for r in requests):
                step = [(row_of[id(req)], token) for req, token in engine.step() if id(req) in row_of]
                yield from finish_step([(row, t) for row, t in step if t is not None], requests, streams)
                for row, _ in (e for e in step if e[1] is None):
                    yield StreamEvent(row, streams[row].flush(), None, requests[row].finish_reason)
        finally:  # a caller that stops iterating early frees the rows' slots
            engine.abort(requests)

    def _engine_for(self, requests: list[Request]) -> Engine:
        """The engine, rebuilt when its slots or capacity do not cover these requests: a slot
        per request (at most 16), each as long as the longest prompt + its tokens, rounded up
        to 256 positions, within half the available memory."""
        context = self.model.config.max_position_embeddings
        need = max(
            len(r.prompt_ids) + check_length(len(r.prompt_ids), r.params.max_tokens, context)
            for r in requests
        )
        capacity = min(context, -(-need // 256) * 256)
        free = available_memory()
        per_slot = slot_bytes(self.model.config, self.model.dtype, capacity)
        fits = len(requests) if free is None else max(1, int(0.5 * free // per_slot))
        slots = min(len(requests), 16, fits)
        e = self._engine
        if e is None or e.capacity < capacity or e.slots < slots:
            self._engine = None  # the old cache goes before the new one is allocated
            draft = self.assistant or (self.draft.model if self.draft is not None else None)
            self._engine = Engine(self.model, slots=slots, capacity=capacity, draft=draft)
        return self._engine

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Generates for every prompt (str, token-id list, or {"prompt_token_ids": ...})."""
        requests, texts = self._requests(prompts, sampling_params)
        if not requests:  # vLLM answers an empty batch with an empty list
            return []
        streams = text_streams(self.tokenizer, requests)
        start = time.perf_counter()
        first = None
        for _ in self._stream(requests, streams):
            first = first or time.perf_counter()
        end = time.perf_counter()
        outputs, row = [], 0
        for text, n in texts:
            rows = range(row, row + n)
            row = rows.stop
            self._next_id += 1
            outputs.append(
                RequestOutput(
                    request_id=str(self._next_id),
                    prompt=text,
                    prompt_token_ids=requests[rows[0]].prompt_ids,
                    outputs=[self._completion(i, requests[r], streams[r]) for i, r in enumerate(rows)],
                    metrics={
                        "time_to_first_token": (first or end) - start,
                        "generation_seconds": end - start,
                        "generated_tokens": sum(len(requests[r].output_ids) for r in rows),
                    }
                    | _speculation([requests[r] for r in rows]),
                )
            )
        return outputs

    def _completion(self, index: int, req: Request, stream: TextStream) -> CompletionOutput:
        out = CompletionOutput(index, stream.text, req.output_ids, req.finish_reason)
        if req.logprobs is not None:
            out.logprobs = [self._logprob_entry(lp) for lp in req.output_logprobs]
            out.cumulative_logprob = sum(lp.logprob for lp in req.output_logprobs)
        return out

    def _logprob_entry(self, lp: TokenLogprob) -> dict[int, Logprob]:
        decode = self.tokenizer.decode
        entry = {t: Logprob(v, rank, decode([t])) for rank, (t, v) in enumerate(lp.top, start=1)}
        if lp.token_id not in entry:
            entry = {lp.token_id: Logprob(lp.logprob, None, decode([lp.token_id])), **entry}
        return entry

    def chat(self, messages, sampling_params=None) -> list[RequestOutput]:
        """Generates a reply to one conversation (list of messages) or several."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(c)) for c in conversations]
        return self.generate(prompts, sampling_params)

    def get_tokenizer(self):
        return self.tokenizer
