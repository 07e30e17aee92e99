"""Generation without torch: one sequence of a GGUF model through the C step, in the file's
own block types, for `gemmakit generate` (issue 18: peak RSS at llama.cpp's; `import torch`
alone is ~218 MiB).

`load(model)` reads what `loading.load` reads for a GGUF kept in its blocks (the header, the
tokenizer, the stop ids) and opens the C step over the memory-mapped file
(`inference/gguf_step.py`); it returns None where that step cannot run the file as the torch
path does (another family, a matrix type without a C product, an HF folder, no compiler),
and the caller takes the torch path. `stream(lean, prompt_ids, params)` prefills the prompt
in C steps of up to 256 rows, decodes one row a step, and chooses each token with the one
sampler (`inference/sampler.py`); stop ids, stop strings and incremental text are the
engine's (`inference/text_stream.py`). The tokens equal `LLM.generate`'s: greedy always, and
sampled ones for the same seed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from gemmakit.config import GemmaConfig
from gemmakit.errors import ModelFileError
from gemmakit.formats.tokenizer import Tokenizer, gguf_tokenizer
from gemmakit.inference import sampler
from gemmakit.inference.gguf_step import GGUFStep
from gemmakit.inference.sampling_params import SamplingParams, check_length, finish_reason
from gemmakit.inference.step_structs import unsupported_by_c_step
from gemmakit.inference.text_stream import StreamEvent, TextStream
from gemmakit.kernels import candidates
from gemmakit.kernels.build import kept_library
from gemmakit.model_source import ModelSource, resolve


@dataclass
class LeanModel:
    """A GGUF model ready for the C step: its source, config, tokenizer and stop ids."""

    source: ModelSource
    gguf: object  # formats.gguf.GGUFFile
    config: GemmaConfig
    tokenizer: Tokenizer
    stop_ids: tuple[int, ...]
    lib: object
    load_seconds: float
    _step: GGUFStep | None = field(default=None, repr=False)

    def step_for(self, positions: int) -> GGUFStep:
        """The C step with room for `positions` positions (kept while it is large enough)."""
        if self._step is None or self._step.capacity < positions:
            self._step = None  # the old cache goes before the new one is mapped
            self._step = GGUFStep.open(self.lib, self.gguf, self.config, positions)
        return self._step


def load(model: str | None) -> LeanModel | None:
    """The lean model of `model` (a GGUF path, a folder holding one GGUF, or None: the
    bundled one), or None where the torch path must run it. A missing or damaged file raises
    the errors `loading.load` raises."""
    from gemmakit.formats.gguf import GGUFFile, config_from_gguf

    start = time.perf_counter()
    source = resolve(model)
    lib = kept_library()
    if source.kind != "gguf" or lib is None:
        return None
    g = GGUFFile(source.path)
    if "tokenizer.ggml.tokens" not in g.metadata:
        raise ModelFileError(f"{source.path}: no tokenizer in the file (tokenizer.ggml.tokens missing)")
    config = config_from_gguf(g)
    if unsupported_by_c_step(config) is not None or GGUFStep.open(lib, g, config, 1) is None:
        return None
    g.map_in()  # at load, as llama.cpp's mapped weights are, not in the prompt's first step
    # SentencePiece's ids over the mapped vocabulary (formats/sentencepiece_bpe.py)
    tokenizer, stop_ids = gguf_tokenizer(
        g.metadata, str(source.path), config.vocab_size, config.eos_token_ids, True
    )
    return LeanModel(source, g, config, tokenizer, stop_ids, lib, time.perf_counter() - start)


@dataclass
class Completion:
    """One prompt's output, as `CompletionOutput` has it."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class _RowSampler:
    """A row's token choice: `sampler.choose` over csrc/sample.c's candidates."""

    def __init__(self, lean: LeanModel, params: SamplingParams, rng):
        self.lib, self.params, self.rng = lean.lib, params, rng
        self.count = sampler.first_count(params, lean.config.vocab_size)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.greedy:
            return int(np.argmax(logits))

        def more(count: int):
            row = np.ascontiguousarray(logits, dtype=np.float32)[None]
            values, ids, lse = candidates.sample_candidates(self.lib, row, np.float32([p.temperature]), count)
            return values[0], ids[0], lse[0]

        found = None if self.count is None else more(self.count)
        return sampler.choose(logits, p, self.rng, found, more)


def stream(lean: LeanModel, prompt_ids: list[int], params: SamplingParams, completion: Completion,
           seeds=None) -> Iterator[StreamEvent]:  # fmt: skip
    """Generates after `prompt_ids`, yielding each token's text event; `completion` holds the
    output as it grows. Ends as the engine ends a request: a stop id (kept in the ids, no
    text), the length limit, or a stop string (the text cut before it).

    The request's generator is `sampler.request_generator(params, seeds)`, as `LLM` makes it:
    `seeds` a `sampler.generator(seed)` that an `LLM(seed=seed)` would hold (consumed one
    draw per request without its own seed), None for a random one."""
    limit = check_length(len(prompt_ids), params.max_tokens, lean.config.max_position_embeddings)
    choose = _RowSampler(lean, params, sampler.request_generator(params, seeds))
    text = TextStream(lean.tokenizer, params.stop)
    step = lean.step_for(len(prompt_ids) + limit)
    logits = step.prefill(prompt_ids)
    while True:
        token = choose(logits)
        completion.token_ids.append(token)
        reason = finish_reason(params, lean.stop_ids, token, len(completion.token_ids), limit)
        delta = text.push(token, final=reason is not None)
        if text.stopped:
            reason = "stop"
        if reason is not None:
            delta += text.flush()
        completion.text, completion.finish_reason = text.text, reason
        yield StreamEvent(0, delta, token, reason)
        if reason is not None:
            return
        logits = step.step(token)


def generate(lean: LeanModel, prompt_ids: list[int], params: SamplingParams, seeds=None) -> Completion:
    """The whole completion of one prompt (`stream` run to its end)."""
    completion = Completion()
    for _ in stream(lean, prompt_ids, params, completion, seeds):
        pass
    return completion
