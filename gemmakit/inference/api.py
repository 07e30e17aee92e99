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

import torch

from gemmakit.errors import GemmakitError
from gemmakit.inference.batching import Engine, available_memory, slot_bytes
from gemmakit.inference.engine import Request, check_length
from gemmakit.inference.sampling import SamplingParams, request_generator
from gemmakit.inference.text import StreamEvent, TextStream, finish_step, text_streams
from gemmakit.loading import Loaded, load


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    metrics: dict = field(default_factory=dict)


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
    ):
        from gemmakit.quant import float_memory, model_memory, quantize_model

        # Without an adapter to put under the quantizer, weights are quantized as they are
        # read: the float model never exists (int8 270M: 0.7 GB peak instead of 1.9 GB).
        streamed = bool(quantization) and loaded is None and not adapter
        self.loaded = loaded or load(
            model, dtype=dtype, device=device, quantize=quantization if streamed else None
        )
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
        self._generator = torch.Generator().manual_seed(seed)
        self._next_id = 0
        self._engine: Engine | None = None  # kept between calls: its slots cache prefixes

    # --- requests ------------------------------------------------------------------------

    def _requests(self, prompts, params) -> tuple[list[Request], list[str | None]]:
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
            # Drawn in prompt order, so an LLM's seed makes the whole call reproducible.
            gen = request_generator(p, self._generator)
            requests.append(Request(ids, p, self.loaded.stop_ids, gen))
            texts.append(text)
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
        step's text events; a row that fails alone ends with finish reason "error"."""
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
            self._engine = Engine(self.model, slots=slots, capacity=capacity)
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
        outputs = []
        for req, text, ts in zip(requests, texts, streams):
            self._next_id += 1
            outputs.append(
                RequestOutput(
                    request_id=str(self._next_id),
                    prompt=text,
                    prompt_token_ids=req.prompt_ids,
                    outputs=[CompletionOutput(0, ts.text, req.output_ids, req.finish_reason)],
                    metrics={
                        "time_to_first_token": (first or end) - start,
                        "generation_seconds": end - start,
                        "generated_tokens": len(req.output_ids),
                    },
                )
            )
        return outputs

    def chat(self, messages, sampling_params=None) -> list[RequestOutput]:
        """Generates a reply to one conversation (list of messages) or several."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(c)) for c in conversations]
        return self.generate(prompts, sampling_params)

    def get_tokenizer(self):
        return self.tokenizer
