"""The real bundled Gemma 3 270M against transformers reading the same GGUF file."""

import random

import pytest
import torch

from gemmakit import SamplingParams
from gemmakit.inference.api import LLM

ROME = (
    "The history of the Roman Empire spans many centuries, from the founding of the city to "
    "the fall of Constantinople. Historians divide it into periods: the Republic, the "
    "Principate and the Dominate. Each period brought new institutions, new wars and new "
    "ideas about citizenship, law, religion and the duties of rulers to the ruled."
)


def test_logits_match_transformers_on_64_tokens(bundled, hf_bundled):
    hf_model, _ = hf_bundled
    ids = torch.tensor([bundled.tokenizer.encode(ROME)[:64]])
    assert ids.shape[1] == 64
    with torch.no_grad():
        ours, ref = bundled.model(ids), hf_model(ids).logits
    diff = (ours - ref).abs().max().item()
    print(f"max |logit difference| on 64 tokens, fp32: {diff:.3g}")
    assert diff < 1e-3


def _long_prompt():
    rng = random.Random(7)
    words = ROME.replace(",", "").replace(".", "").split()
    text = " ".join(rng.choice(words) for _ in range(700))
    return "Summarize the following notes.\n" + text + "\nSummary:"


PROMPTS = {
    "english": "The best recipe for pasta is",
    "code": "def quicksort(items):\n    ",
    "russian": "Введение в машинное обучение: ",
    "long": _long_prompt(),
}


@pytest.mark.parametrize("name", PROMPTS)
def test_greedy_matches_transformers(name, bundled, hf_bundled):
    hf_model, _ = hf_bundled
    prompt_ids = bundled.tokenizer.encode(PROMPTS[name])
    if name == "long":
        assert len(prompt_ids) > 600  # past the 512-token window of the local layers
    llm = LLM(loaded=bundled)
    ours = llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    with torch.no_grad():
        ref = hf_model.generate(
            torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    assert ours[0].outputs[0].token_ids == ref[0, len(prompt_ids) :].tolist()


def _random_strings(n, seed=0):
    rng = random.Random(seed)
    pieces = (
        list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:!?'\"()[]{}<>/\\-_=+*&^%$#@~`|")
        + [" ", "  ", "\n", "\t", "\n\n", "   ", "    ", "\r\n"]
        + list("éèüßøñçالعربيةданныхпривет日本語中文한국어")
        + ["🤖", "👍🏽", "🇫🇷", "\u200b", "\u00a0", "ﬁ", "Ⅻ", "𝔘", "\x00", "\ufffd"]
        + ["<start_of_turn>", "<end_of_turn>", "<eos>", "<pad>", "<mask>", "<unused12>"]
        + ["[multimodal]", "<table>", "<b>", "<start_of_image>", "<notatoken>", "<bos"]
        + [w + " " for w in "the quick fox def return import numpy println café naïve".split()]
    )
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def test_tokenizer_matches_transformers(bundled, hf_bundled):
    _, ref = hf_bundled
    tok = bundled.tokenizer
    strings = _random_strings(3000)
    mismatches = [s for s in strings if tok.encode(s) != ref(s).input_ids]
    assert not mismatches, f"{len(mismatches)} mismatches, e.g. {mismatches[:3]!r}"
    for s in strings[:500]:
        assert tok.decode(tok.encode(s), skip_special=False) == ref.decode(ref(s).input_ids)


def test_exactly_one_bos(bundled):
    tok = bundled.tokenizer
    assert tok.encode("Hello")[:2] == [2, 9259]
    assert tok.encode("<bos>hello") == tok.encode("hello")  # never doubled
    assert tok.encode("hello", add_bos=False)[0] != 2


def test_stop_ids_are_gemma3s(bundled):
    # Gemma 3: <eos>=1 and <end_of_turn>=106; 107 is "\n" and must not stop generation.
    assert set(bundled.stop_ids) == {1, 106}
    assert bundled.tokenizer.decode([107]) == "\n"
