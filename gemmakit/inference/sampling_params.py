"""A request's sampling parameters (vLLM's `SamplingParams`), checked at the edge: torch-free,
so the torch-free generation path (`inference/lean.py`) takes the same object, with the same
errors, as the engine (`inference/sampling.py` re-exports it with the samplers).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import random
from dataclasses import dataclass

from gemmakit.errors import ContextLengthError, GemmakitError

# The speculative decoding modes (None: none).
SPECULATIVE_MODES = (None, "ngram", "draft", "mtp")
# The most tokens a step may propose: a verification step writes 1 + k cache columns that a
# rollback must be able to drop again, and the sliding rings keep model/cache.py's RING_SLACK
# spare slots (equal to it: tests/test_lean_generate.py checks).
MAX_SPECULATIVE_TOKENS = 16

# The smallest positive temperature accepted. Logits divided by a tiny one overflow float32
# (1e-40 turns every logit into inf and the softmax into NaN); divided by 1e-5 they stay far
# from it (|logit| 1e4 -> 1e9). vLLM takes temperatures under 1e-5 as greedy
# (vllm/sampling_params.py, _SAMPLING_EPS); here the caller says 0 for greedy.
MIN_TEMPERATURE = 1e-5
# OpenAI's documented ranges: penalties in [-2, 2], a logit bias in [-100, 100], at most 20
# top log-probabilities per token (chat's top_logprobs; vLLM's default cap is 20 too).
MAX_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0
MAX_LOGPROBS = 20
# More completions per prompt than this is a request to refuse, not a batch to run.
MAX_N = 64


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_str_list(x) -> bool:
    return isinstance(x, (list, tuple)) and all(isinstance(s, str) for s in x)


def _number(name: str, value) -> float:
    """`value` as a finite float, or a GemmakitError naming the field."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise GemmakitError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise GemmakitError(f"{name} must be a finite number, got {value}")
    return float(value)


def _integer(name: str, value) -> int:
    if not _is_int(value):
        raise GemmakitError(f"{name} must be an integer, got {value!r}")
    return int(value)


@dataclass
class SamplingParams:
    """What vLLM's `SamplingParams` means, for the fields it shares.

    temperature 0 is greedy; top_k -1 or 0 and top_p = 1 disable those filters; `seed` makes
    a request reproducible on its own, independent of the batch it runs in; generated text
    stops before the first `stop` string, which is not included.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    # OpenAI's penalties over the generated tokens: each logit minus count * frequency_penalty
    # and, once a token has appeared, minus presence_penalty.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # HF/vLLM's multiplicative penalty over the prompt and the generated tokens (1 = none).
    repetition_penalty: float = 1.0
    # token id -> a bias added to its logit after the penalties.
    logit_bias: dict[int, float] | None = None
    # None: no log-probabilities; k: each token's and the k most likely of each step.
    logprobs: int | None = None
    # A JSON schema the output must match, enforced by a grammar (`inference.grammar`).
    json_schema: dict | None = None
    # Speculative decoding (gemmakit.inference.speculative): None, "ngram" (prompt lookup) or
    # "draft" (the LLM's draft model) or "mtp" (its Gemma 4 assistant), proposing up to
    # num_speculative_tokens tokens a step.
    speculative: str | None = None
    num_speculative_tokens: int = 8

    def __post_init__(self):
        # Checked here, at the edge, because a bad value fails later inside a batch: NaN or a
        # temperature of 1e-40 turns the scaled logits into inf/NaN and torch.multinomial raises.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not _is_str_list(self.stop):
            raise GemmakitError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = list(self.stop or [])
        ids = self.stop_token_ids
        if ids is not None and not (
            isinstance(ids, (list, tuple)) and all(_is_int(i) and i >= 0 for i in ids)
        ):
            raise GemmakitError(f"stop_token_ids must be a list of token ids, got {ids!r}")
        self.stop_token_ids = list(ids or [])
        self.temperature = _number("temperature", self.temperature)
        if self.temperature < 0 or 0 < self.temperature < MIN_TEMPERATURE:
            raise GemmakitError(
                f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {self.temperature}"
            )
        self.top_p = _number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise GemmakitError(f"top_p must be in (0, 1], got {self.top_p}")
        self.min_p = _number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise GemmakitError(f"min_p must be in [0, 1], got {self.min_p}")
        self.top_k = _integer("top_k", self.top_k)
        if self.top_k < -1:
            raise GemmakitError(f"top_k must be -1 or 0 (no top-k filter) or at least 1, got {self.top_k}")
        if self.seed is not None:
            self.seed = _integer("seed", self.seed)
            # 64 bits, signed or not (the range torch's generators took, kept for callers)
            if not -(2**63) <= self.seed < 2**64:
                raise GemmakitError(f"seed must fit in 64 bits, got {self.seed}")
        if self.max_tokens is not None:
            self.max_tokens = _integer("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise GemmakitError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not isinstance(self.ignore_eos, bool):
            raise GemmakitError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        self.n = _integer("n", self.n)
        if not 1 <= self.n <= MAX_N:
            raise GemmakitError(f"n must be in [1, {MAX_N}], got {self.n}")
        if self.speculative not in SPECULATIVE_MODES:
            modes = ", ".join(repr(m) for m in SPECULATIVE_MODES)
            raise GemmakitError(f"speculative must be one of {modes}, got {self.speculative!r}")
        self.num_speculative_tokens = _integer("num_speculative_tokens", self.num_speculative_tokens)
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            # A verification step writes 1 + k cache columns that a rollback must be able to
            # drop again: the sliding rings keep RING_SLACK spare slots (model/cache.py).
            raise GemmakitError(
                f"num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], got {self.num_speculative_tokens}"
            )
        self._check_logits_fields()

    def _check_logits_fields(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = _number(name, getattr(self, name))
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise GemmakitError(f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {value}")
            setattr(self, name, value)
        self.repetition_penalty = _number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise GemmakitError(f"repetition_penalty must be above 0, got {self.repetition_penalty}")
        bias = self.logit_bias or {}
        if not isinstance(bias, dict):
            raise GemmakitError(f"logit_bias must map token ids to numbers, got {bias!r}")
        checked = {}
        for token, value in bias.items():
            if not _is_int(token) or token < 0:
                raise GemmakitError(f"logit_bias keys must be token ids, got {token!r}")
            value = _number(f"logit_bias[{token}]", value)
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise GemmakitError(f"logit_bias[{token}] must be in [-100, 100], got {value}")
            checked[int(token)] = value
        self.logit_bias = checked
        if self.logprobs is not None:
            self.logprobs = _integer("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise GemmakitError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise GemmakitError(f"json_schema must be a JSON schema object, got {self.json_schema!r}")

    def expand_n(self) -> list[SamplingParams]:
        """The `n` single-completion parameters of this request, as `n` rows run it.

        With a seed, the rows get different seeds drawn from it (the first keeps it), so the n
        completions differ yet the whole request stays reproducible; without one each row
        draws its own.
        """
        if self.n == 1:
            return [self]
        seeds = [None] * self.n
        if self.seed is not None:
            draw = random.Random(self.seed % 2**64)  # as sampler.generator and child_seed do
            seeds = [self.seed] + [draw.getrandbits(62) for _ in range(self.n - 1)]
        return [dataclasses.replace(self, n=1, seed=s) for s in seeds]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def finish_reason(params: SamplingParams, stop_ids, token: int, generated: int, limit: int) -> str | None:
    """Why a request ends at `token`, its `generated`-th: "stop" for one of its stop token ids
    or the model's stop ids (unless `ignore_eos`), "length" at its last allowed token, else
    None (the engine's and the torch-free path's rule)."""
    if token in params.stop_token_ids or not params.ignore_eos and token in stop_ids:
        return "stop"
    return "length" if generated >= limit else None


def check_length(prompt_len: int, max_tokens: int | None, context: int, what: str = "prompt") -> int:
    """The number of tokens that may be generated after a prompt of `prompt_len` tokens.

    That is `max_tokens` clamped to the room left in the context, or all of that room when
    `max_tokens` is None. `what` names the prompt in the error ("prompt", "conversation").

    Raises:
        ContextLengthError: the prompt alone fills the context.
    """
    if prompt_len >= context:
        raise ContextLengthError(
            f"the {what} has {prompt_len} tokens; the model's context is {context} tokens "
            "(the prompt plus at least one generated token must fit)"
        )
    room = context - prompt_len
    return room if max_tokens is None else min(max_tokens, room)
