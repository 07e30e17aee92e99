"""A model adapter so that lm-evaluation-harness can evaluate gemmakit models.

Optional: needs lm-eval (`pip install gemmakit[lmeval]`). Importing this module registers the
model name "gemmakit" with lm-eval (`lm_eval.api.registry.register_model`). lm-eval's own
command line has no plugin mechanism for models, so run it through this module, which
registers the adapter and then hands its arguments, unchanged, to lm-eval's CLI:

    python -m gemmakit.evaluation.lm_eval_adapter --model gemmakit \\
        --model_args model=path/to/model.gguf,quantize=nf4 --tasks arc_easy --limit 100

or from Python:

    import lm_eval, gemmakit.evaluation.lm_eval_adapter
    lm_eval.simple_evaluate(model="gemmakit", model_args="dtype=float32", tasks=[...])

model_args: `model` (folder or .gguf; default the bundled Gemma 3 270M), `dtype`, `device`,
`quantize`, `adapter`, `max_length` (ids per window; default min(model positions, 2048)),
`stride` (rolling windows, default max_length // 2), `batch_tokens`, `gen_batch`.

What differs from lm-eval's `hf` model, on purpose: every request starts with exactly one
`<bos>` (Gemma's perplexity and accuracy collapse without it: lm-eval GH#1465, GH#2049),
including each window of `loglikelihood_rolling`, which uses gemmakit's strided method
(`gemmakit.evaluation.perplexity.strided_windows`) instead of lm-eval's windows that begin mid-text.
"""

from __future__ import annotations

import logging
import sys

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from gemmakit.evaluation.logprobs import BATCH_TOKENS
from gemmakit.evaluation.perplexity import sequence_nll
from gemmakit.evaluation.scoring import encode_pair, score_continuations
from gemmakit.evaluation.settings import Setting, load_setting

eval_logger = logging.getLogger(__name__)


@register_model("gemmakit")
class GemmakitLM(LM):
    """lm-eval's `LM` over a gemmakit model (see the module docstring for model_args)."""

    def __init__(
        self, model: str | None = None, dtype: str = "auto", device: str | None = None,
        quantize: str | None = None, adapter: str | None = None, max_length: int | None = None,
        stride: int | None = None, batch_tokens: int = BATCH_TOKENS, gen_batch: int = 16,
        loaded=None, batch_size=None, max_batch_size=None, **unused,
    ):  # fmt: skip
        super().__init__()
        if unused:
            raise ValueError(f"gemmakit: unknown model_args {', '.join(sorted(unused))}")
        if loaded is None:
            if device and str(device).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's CLI passes device="cuda" by default; its hf model falls back too.
                eval_logger.warning("gemmakit: CUDA is not available; running on the CPU")
                device = "cpu"
            loaded = load_setting(Setting(model, adapter, quantize), dtype, device)
        elif quantize or adapter:
            raise ValueError("gemmakit: give quantize/adapter with model=, not with loaded=")
        self.loaded = loaded
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        positions = self.model.config.max_position_embeddings
        self.max_length = int(max_length or min(positions, 2048))
        if not 2 <= self.max_length <= positions:
            raise ValueError(f"gemmakit: max_length must be in [2, {positions}], got {self.max_length}")
        self.stride = int(stride or max(1, self.max_length // 2))
        self.batch_tokens, self.gen_batch = int(batch_tokens), int(gen_batch)
        self._device = self.model.device

    @property
    def tokenizer_name(self) -> str:
        return f"gemmakit-{self.loaded.source.name}"

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        # The rendered text starts with "<bos>"; encode() does not add a second one.
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | <bos> + context), greedy?) per (context, continuation)."""
        pairs = [encode_pair(self.tokenizer, *r.args[:2]) for r in requests]
        results = score_continuations(
            self.model, pairs, self.tokenizer.pad_id, self.batch_tokens, progress=not disable_tqdm
        )
        for r, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", r.args[:2], res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each string, by strided windows each starting with <bos>."""
        out = []
        for r in requests:
            (text,) = r.args[:1]
            ids = self.tokenizer.encode(text, add_bos=False)
            if not ids:
                out.append(0.0)
                continue
            nll, _, _ = sequence_nll(
                self.model,
                ids,
                self.tokenizer.bos_id,
                self.max_length,
                self.stride,
                batch_tokens=self.batch_tokens,
            )
            out.append(-nll)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), -nll)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generates for each (context, gen_kwargs): greedy unless do_sample, cut at `until`."""
        from gemmakit import SamplingParams
        from gemmakit.inference.api import LLM

        llm = LLM(loaded=self.loaded)
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            sample = kwargs.pop("do_sample", False)
            temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
            params = SamplingParams(
                temperature=temperature, top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
                max_tokens=max_new, stop=until,
            )  # fmt: skip
            room = self.max_length - max_new
            if room < 2:
                raise ValueError(
                    f"gemmakit: max_gen_toks {max_new} leaves no room in max_length {self.max_length}"
                )
            for start in range(0, len(indices), self.gen_batch):
                chunk = indices[start : start + self.gen_batch]
                prompts = []
                for i in chunk:
                    ids = self.tokenizer.encode(requests[i].args[0])
                    prompts.append(ids[:1] + ids[1:][-(room - 1) :])  # keep <bos>, left-truncate
                for i, o in zip(chunk, llm.generate(prompts, params)):
                    out[i] = o.outputs[0].text
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the "gemmakit" model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
