"""Gemma 4's MTP drafter (`gemma4_assistant`): parity with transformers
(modeling_gemma4_assistant.py) on tiny random drafters saved as HF folders, and the loading
path's refusals."""

from __future__ import annotations

import json

import pytest
import torch

from gemmakit.config import FULL, SLIDING
from gemmakit.errors import GemmakitError
from gemmakit.loading import load_assistant

VOCAB, WINDOW, TARGET_WIDTH = 160, 4, 48
ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
# The drafter's layers match the tiny target of tests/test_mtp.py (test_gemma4.py's E2B-like one):
# sliding layers with 2 KV heads of 16, global ones with 1 KV head of 32 (K = V).
TEXT = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, head_dim=16,
    num_key_value_heads=2, sliding_window=WINDOW, rope_parameters=ROPE, num_hidden_layers=2,
    layer_types=[SLIDING, FULL], hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
    global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
    max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
)  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models: every test of this module on one thread (conftest's `one_thread`)."""


def random_assistant(ordered: bool, seed: int = 0):
    """transformers' Gemma4AssistantForCausalLM, every saved tensor random (and, ordered, a
    random token ordering)."""
    import transformers

    text = transformers.Gemma4TextConfig(**TEXT)
    cfg = transformers.Gemma4AssistantConfig(
        text_config=text, backbone_hidden_size=TARGET_WIDTH, use_ordered_embeddings=ordered,
        num_centroids=8, centroid_intermediate_top_k=3,
    )  # fmt: skip
    cfg._attn_implementation = cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Gemma4AssistantForCausalLM(cfg).eval()
    with torch.no_grad():
        for t in model.parameters():  # gains near 1 (they multiply as w), matrices small
            t.copy_(1.0 + 0.3 * torch.randn_like(t) if t.dim() == 1 else 0.1 * torch.randn_like(t))
        for layer in model.model.layers:
            layer.layer_scalar.uniform_(0.5, 1.5)
        if ordered:
            model.masked_embedding.token_ordering.copy_(torch.randperm(VOCAB))
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["lm_head", "ordered"])
def pair(request, tmp_path_factory):
    ref = random_assistant(request.param)
    folder = tmp_path_factory.mktemp("assistant")
    ref.save_pretrained(folder)
    return load_assistant(folder), ref


@pytest.mark.parametrize("kv_length", [1, 3, 11])
def test_logits_and_projected_state_match_transformers(pair, kv_length):
    ours, ref = pair
    g = torch.Generator().manual_seed(kv_length)
    inputs = torch.randn(2, 1, 2 * TARGET_WIDTH, generator=g)
    positions = torch.tensor([[kv_length], [kv_length + 5]])
    kv = {
        SLIDING: (
            torch.randn(2, 2, kv_length, 16, generator=g),
            torch.randn(2, 2, kv_length, 16, generator=g),
        ),
        FULL: (torch.randn(2, 1, kv_length, 32, generator=g), torch.randn(2, 1, kv_length, 32, generator=g)),
    }
    with torch.no_grad():
        expected = ref(inputs_embeds=inputs, position_ids=positions, shared_kv_states=dict(kv))
        logits, projected = ours(inputs, positions, kv)
    torch.testing.assert_close(logits, expected.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(projected, expected.last_hidden_state, rtol=1e-4, atol=1e-4)


def test_sliding_layers_see_only_the_last_window_plus_one_keys(pair):
    """Changing keys older than the last WINDOW + 1 changes nothing on the sliding layers:
    with the full layer's keys fixed, the output is the same."""
    ours, _ = pair
    g = torch.Generator().manual_seed(0)
    inputs, positions = torch.randn(1, 1, 2 * TARGET_WIDTH, generator=g), torch.tensor([[12]])
    full = (torch.randn(1, 1, 12, 32, generator=g), torch.randn(1, 1, 12, 32, generator=g))
    sliding = [torch.randn(1, 2, 12, 16, generator=g) for _ in range(2)]
    changed = [t.clone() for t in sliding]
    for t in changed:
        t[:, :, : 12 - (WINDOW + 1)] = torch.randn(1, 2, 12 - (WINDOW + 1), 16, generator=g)
    with torch.no_grad():
        a = ours(inputs, positions, {SLIDING: tuple(sliding), FULL: full})[0]
        b = ours(inputs, positions, {SLIDING: tuple(changed), FULL: full})[0]
        changed[0][:, :, -1] += 1.0
        c = ours(inputs, positions, {SLIDING: tuple(changed), FULL: full})[0]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_a_folder_that_is_not_an_assistant_is_a_clear_error(tmp_path, hf_folder):
    folder, _ = hf_folder("gemma3")
    with pytest.raises(GemmakitError, match="not a Gemma 4 assistant"):
        load_assistant(folder)
    with pytest.raises(GemmakitError, match="folder"):
        load_assistant(tmp_path / "nothing.gguf")


def test_an_assistant_config_with_experts_is_refused(tmp_path):
    ref = random_assistant(False)
    ref.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["text_config"]["hidden_size_per_layer_input"] = 8
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(GemmakitError, match="per-layer inputs"):
        load_assistant(tmp_path)
