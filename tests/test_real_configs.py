"""The released Gemma 3n and Gemma 4 configs, as transformers builds them.

The files are in tests/data/configs; SOURCES.md says where each came from. Each test builds the
config in transformers on the meta device (no memory, well under a second per model) and
checks the counts that SOURCES.md records. `inspect` must reproduce the same numbers. A config
edited by hand fails here, and so does a transformers release that builds these models
differently.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

CONFIGS = Path(__file__).parent / "data" / "configs"

# file: (text-model total, token embedding, per-layer embedding), each from model.parameters();
# the tied lm_head counts once.
TEXT_COUNTS = {
    "gemma-3n-E2B-it": (4_435_182_688, 537_395_200, 2_013_265_920),
    "gemma-3n-E4B-it": (6_835_235_568, 537_395_200, 2_348_810_240),
    "gemma-4-E2B": (4_628_569_344, 402_653_184, 2_348_810_240),
    "gemma-4-E4B-it": (7_463_013_376, 671_088_640, 2_818_572_288),
    "gemma-4-26B-A4B-it": (25_233_141_760, 738_197_504, 0),
}

# Gemma4ForConditionalGeneration: text model plus the vision and audio towers and their
# embedders. Gemma 3n's vision tower needs timm, which the test environment lacks.
MULTIMODAL_TOTALS = {
    "gemma-4-E2B": 5_104_297_504,
    "gemma-4-E4B-it": 7_941_100_832,
    "gemma-4-26B-A4B-it": 25_805_933_872,
}


def load_config(name: str):
    return transformers.AutoConfig.for_model(**json.loads((CONFIGS / f"{name}.json").read_text()))


def text_model(name: str):
    config = load_config(name)
    causal_lm = {
        "gemma3n": transformers.Gemma3nForCausalLM,
        "gemma4": transformers.Gemma4ForCausalLM,
    }[config.model_type]
    with torch.device("meta"):
        return causal_lm(config.text_config)


def total(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", TEXT_COUNTS)
def test_text_model_has_the_recorded_counts(name):
    model = text_model(name)
    params = dict(model.named_parameters())
    per_layer = sum(p.numel() for n, p in params.items() if "embed_tokens_per_layer" in n)
    got = (total(model), params["model.embed_tokens.weight"].numel(), per_layer)
    assert got == TEXT_COUNTS[name]
    # Every released size ties lm_head to the token embedding, so the total counts the
    # embedding once.
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("name", MULTIMODAL_TOTALS)
def test_multimodal_gemma4_has_the_recorded_total(name):
    with torch.device("meta"):
        model = transformers.Gemma4ForConditionalGeneration(load_config(name))
    assert total(model) == MULTIMODAL_TOTALS[name]


def test_moe_active_count_is_the_published_3_8b():
    # 8 of the 128 experts run per token (top_k_experts of num_experts); everything outside
    # the experts (attention, the dense MLP beside them, the router, the embedding) always runs.
    model = text_model("gemma-4-26B-A4B-it")
    config = model.config
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    idle = experts * (config.num_experts - config.top_k_experts) // config.num_experts
    assert (config.num_experts, config.top_k_experts) == (128, 8)
    assert experts == 22_837_985_280
    assert total(model) - idle == 3_822_530_560
    # Google's model card: "Total Parameters 25.2B", "Active Parameters 3.8B".
    assert (round(total(model) / 1e9, 1), round((total(model) - idle) / 1e9, 1)) == (25.2, 3.8)


def test_gemma4_e2b_reproduces_the_model_card():
    # The card: "2.3B effective (5.1B with embeddings)". 5.1B is the whole checkpoint, towers
    # included; the effective count is the text model without its per-layer embeddings.
    text, _, per_layer = TEXT_COUNTS["gemma-4-E2B"]
    assert round(MULTIMODAL_TOTALS["gemma-4-E2B"] / 1e9, 1) == 5.1
    assert round((text - per_layer) / 1e9, 1) == 2.3


@pytest.mark.parametrize("name", TEXT_COUNTS)
def test_config_file_is_a_cited_untouched_copy(name):
    # The copies are byte-exact; transformers writes json.dumps(indent=2, sort_keys=True), so a
    # hand edit that reorders or reformats shows up, and each file must be cited in SOURCES.md.
    text = (CONFIGS / f"{name}.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert f"`{name}.json`" in (CONFIGS / "SOURCES.md").read_text()


def test_gemma4_31b_text_excerpt_reproduces_the_card_s_30_7b():
    # Only a lock file quoting part of google/gemma-4-31B's text_config was found (SOURCES.md).
    # The keys it leaves out take transformers' defaults (vocab 262144, tied embeddings, no MoE,
    # no PLE), the values every other Gemma 4 release writes; the card's "30.7B" confirms them.
    path = CONFIGS / "gemma-4-31B.lock-excerpt.json"
    text = path.read_text()
    assert text == json.dumps(json.loads(text), indent=2) + "\n"
    assert f"`{path.name}`" in (CONFIGS / "SOURCES.md").read_text()
    config = transformers.Gemma4TextConfig(**json.loads(text)["text_config"])
    with torch.device("meta"):
        model = transformers.Gemma4ForCausalLM(config)
    assert total(model) == 30_697_345_280
    assert model.model.embed_tokens.weight.numel() == 1_409_286_144
    assert round(total(model) / 1e9, 1) == 30.7
