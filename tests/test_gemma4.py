"""Gemma 4 text model parity with transformers (modeling_gemma4.py), on tiny random models built
by transformers here, every checkpoint parameter and buffer randomized (layer scalars, router
and expert scales included), so a loader that drops one fails."""

from __future__ import annotations

import pytest
import torch

from gemmakit.inference import c_decode
from gemmakit.inference.engine import Request, generate_steps
from gemmakit.inference.sampling import SamplingParams
from gemmakit.loading import ModelSource, load_model
from gemmakit.model.gemma4 import Gemma4

S, F = "sliding_attention", "full_attention"
VOCAB, WINDOW = 160, 4
ROPE = {
    S: {"rope_type": "default", "rope_theta": 10_000.0},
    F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
COMMON = dict(
    vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_attention_heads=4, head_dim=16,
    num_key_value_heads=2, sliding_window=WINDOW, final_logit_softcapping=30.0, rope_parameters=ROPE,
    max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
)  # fmt: skip
VARIANTS = {
    # E2B/E4B-like: PLE, KV sharing with double-wide MLPs on the shared layers, K = V with
    # their own head dim and KV heads on global layers, proportional partial RoPE.
    "ple_shared_k_eq_v": dict(
        COMMON, num_hidden_layers=6, layer_types=[S, F, S, F, S, F], hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=VOCAB, num_kv_shared_layers=3, use_double_wide_mlp=True,
        attention_k_eq_v=True, global_head_dim=32, num_global_key_value_heads=1,
    ),
    # 26B-A4B-like: the experts beside the dense MLP, v_proj on global layers of their own head dim.
    "moe": dict(
        COMMON, num_hidden_layers=4, layer_types=[S, S, F, F], hidden_size_per_layer_input=0,
        enable_moe_block=True, num_experts=5, top_k_experts=2, moe_intermediate_size=24,
        global_head_dim=24,
    ),
}  # fmt: skip


def random_gemma4(variant: str, seed: int = 0):
    """transformers' Gemma4ForCausalLM for a variant, every saved tensor random."""
    import transformers

    cfg = transformers.Gemma4TextConfig(**VARIANTS[variant])
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Gemma4ForCausalLM(cfg).eval()
    saved = model.state_dict()
    with torch.no_grad():
        for t in model.parameters():
            # Norm gains and scales near 1 (they multiply, as w, not 1 + w), matrices small.
            t.copy_(1.0 + 0.3 * torch.randn_like(t) if t.dim() == 1 else 0.1 * torch.randn_like(t))
        for name, t in model.named_buffers():
            if name in saved:  # layer_scalar: the checkpoint's buffers, not derived ones
                t.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    """(gemmakit's load of the saved folder, the transformers model)."""
    ref = random_gemma4(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    return load_model(ModelSource("hf", folder, request.param)), ref


def test_every_feature_is_exercised(pair):
    ours, ref = pair
    c = ours.config
    assert isinstance(ours, Gemma4) and c.use_layer_scalar and not c.norm_unit_offset
    assert c.rope_partial_rotary_factor == 0.25 and c.global_head_dim != c.head_dim
    if c.hidden_size_per_layer_input:
        assert c.num_kv_shared_layers and c.use_double_wide_mlp and c.attention_k_eq_v
        assert c.kv_source_layers == (0, 1, 2, 1, 2, 1)
    else:
        assert c.num_experts and not c.attention_k_eq_v
    scalars = [float(b.layer_scalar) for b in ours.model.layers]
    assert len(set(scalars)) == len(scalars) and 1.0 not in scalars  # loaded, not the default


def test_state_dict_is_transformers(pair):
    ours, ref = pair
    want = {k: tuple(t.shape) for k, t in ref.state_dict().items()}
    assert {k: tuple(t.shape) for k, t in ours.state_dict().items()} == want


def test_logits_match_transformers(pair):
    ours, ref = pair
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))  # 13 > window
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)


def test_greedy_tokens_match_transformers_generate(pair):
    ours, ref = pair
    prompt = [2, 17, 99, 5, 42, 8, 77]
    assert c_decode.decoder(ours, ours.make_cache(1, 32), 1) is None  # the torch step runs it
    request = Request(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for _ in generate_steps(ours, [request]):
        pass
    with torch.no_grad():
        want = ref.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert request.output_ids == want[0, len(prompt) :].tolist()


def test_cached_decode_equals_full_forward(pair):
    ours, _ = pair
    ids = torch.randint(3, VOCAB, (2, 15), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.make_cache(2, 15)
        steps = [ours(ids[:, :6], cache=cache)]  # a prefill longer than the window
        steps.append(ours(ids[:, 6:11], cache=cache))  # a chunk that wraps the sliding ring
        steps += [ours(ids[:, t : t + 1], cache=cache) for t in range(11, 15)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_holds_only_producing_layers(pair):
    ours, _ = pair
    c = ours.config
    cache = ours.make_cache(1, 8)
    for i, layer_cache in enumerate(cache.for_layer):
        if not c.layer_owns_kv(i):
            assert layer_cache is None
        else:
            assert layer_cache.k.shape == (
                1,
                c.layer_kv_heads(i),
                min(8, cache.groups[c.layer_types[i]].capacity),
                c.layer_head_dim(i),
            )
    assert len(cache.layers) == c.num_hidden_layers - c.num_kv_shared_layers


def test_left_padded_batch_equals_one_by_one(pair):
    ours, _ = pair
    rows = [[2, 9, 14, 33, 5, 61, 7, 70, 12], [2, 40, 3, 88]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    batch = [Request(r, params) for r in rows]
    for _ in generate_steps(ours, batch):
        pass
    for row, request in zip(rows, batch):
        alone = Request(row, params)
        for _ in generate_steps(ours, [alone]):
            pass
        assert request.output_ids == alone.output_ids
    with torch.no_grad():  # the logits too, not only their argmax
        ids = torch.tensor([rows[0], [0] * 5 + rows[1]])
        mask = ids != 0  # row 0 has no padding
        padded = ours(ids, attention_mask=mask)
        torch.testing.assert_close(padded[1, 5:], ours(torch.tensor([rows[1]]))[0], atol=1e-5, rtol=1e-5)


def test_c_step_names_what_it_cannot_run(pair):
    ours, _ = pair
    assert c_decode.unsupported_by_c_step(ours.config) is not None
