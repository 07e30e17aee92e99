"""Quantization: NF4 bit-exact against bitsandbytes, error bounds, autograd, whole models."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from gemmakit import ops
from gemmakit import quant as Q
from gemmakit.errors import GemmakitError
from gemmakit.kernels import cpu as cpu_kernels
from gemmakit.quant import integer, linear, nf4

needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed"
)

# Shapes: Gemma 3 270M's q_proj and down_proj, one whose blocks cross rows, one with a
# partial last block and an odd element count.
SHAPES = [(1024, 640), (640, 2048), (33, 64), (7, 9)]


def _weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[::97] *= 8  # heavier tails, as real weights have
    return w


def _tiny_gemma(seed=0):
    from gemmakit.hf_config import from_hf_config
    from gemmakit.model.gemma import Gemma

    cfg = from_hf_config(
        {"architectures": ["Gemma3ForCausalLM"], "vocab_size": 256, "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 1, "head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16,
         "layer_types": ["sliding_attention", "full_attention"], "max_position_embeddings": 64}
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Gemma(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if "norm" in name else 0.05)
    return model.eval()


# --- NF4 against bitsandbytes ----------------------------------------------------------------


@needs_bnb
def test_dynamic_map_is_bitsandbytes():
    import bitsandbytes.functional as BF

    assert torch.equal(nf4.dynamic_map(), BF.create_dynamic_map(signed=True))
    assert torch.equal(nf4.NF4_CODE, BF.get_4bit_type("nf4", device="cpu"))


@needs_bnb
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_layout_is_bitsandbytes(shape):
    import bitsandbytes.functional as BF

    w = _weight(shape)
    ours = nf4.nf4_quantize(w)
    packed, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    # 4-bit codes, nibble order, second-level absmax and offset: bit for bit.
    assert torch.equal(ours["packed"], packed.view(-1))
    assert torch.equal(ours["nested_absmax"], state.state2.absmax)
    assert torch.equal(ours["offset"], state.offset)
    # The 8-bit absmax codes: ours are the nearest level (bitsandbytes' reference kernel,
    # backends/default). Its CPU C kernel uses an approximate binary search that sometimes
    # lands one level off near a midpoint; where the two differ, ours is never farther.
    table = nf4.dynamic_map()
    absmax = w.reshape(-1).float()
    n = absmax.numel() - absmax.numel() % 64
    blocks = [absmax[:n].view(-1, 64).abs().amax(-1)]
    if n < absmax.numel():
        blocks.append(absmax[n:].abs().amax()[None])
    stats = torch.cat(blocks) - ours["offset"]
    scale = ours["nested_absmax"].repeat_interleave(256)[: stats.numel()]
    target = (stats / scale).clamp(-1, 1)
    err_ours = (table[ours["absmax"].long()] - target).abs()
    err_bnb = (table[state.absmax.long()] - target).abs()
    live = scale > 0  # a zero scale stores every code as 0 whatever the code
    assert torch.all(err_ours[live] <= err_bnb[live] + 1e-7)
    assert ((ours["absmax"] != state.absmax) & live).float().mean() < 0.01
    # Dequantization: bitsandbytes reading our buffers gives exactly our weight, from the C
    # kernel (on the CPU) and from the torch fallback, in float32 and rounded to bfloat16.
    m = Q.NF4Linear(w)
    assert torch.equal(BF.dequantize_4bit(m.weight[:, None], m.bnb_quant_state()), m.dequantize())
    for dtype in (torch.float32, torch.bfloat16):
        want = BF.dequantize_4bit(m.weight[:, None], m.bnb_quant_state(torch.float32)).to(dtype)
        assert torch.equal(m.dequantize(dtype), want)
        assert torch.equal(nf4.nf4_dequantize(m.weight, m.absmax(), tuple(shape), dtype), want)
        if cpu_kernels.library() is not None:
            got = cpu_kernels.nf4_dequantize(m.weight, m.absmax(), nf4.NF4_CODE, tuple(shape), dtype)
            assert torch.equal(got, want)


def test_nf4_error_bound():
    """|w - ŵ| <= 0.1520 a + 0.0071 a2 elementwise (a: the 64-block's absmax, a2: the
    256-block max of |a - mean a|). The first term is half the widest gap between NF4 levels,
    (-0.6961928 - -1) / 2 = 0.1519: the level is chosen with the exact absmax. The second
    bounds the error of the stored absmax, which the 8-bit dynamic map rounds by at most half
    its widest gap (0.9 / 64 / 2 = 0.00703, the top decade), times the level (|level| <= 1)."""
    w = _weight((640, 2048))
    m = Q.NF4Linear(w)
    err = (m.dequantize() - w).abs().view(-1, 64)
    a = w.view(-1, 64).abs().amax(-1)
    a2 = m.weight_nested_absmax.repeat_interleave(256)[: a.numel()]
    bound = 0.1520 * a + 0.0071 * a2 + 1e-7
    assert torch.all(err <= bound[:, None])
    # On normally distributed weights NF4's relative RMS error is 9.2%.
    g = torch.randn((640, 2048), generator=torch.Generator().manual_seed(1)) * 0.02
    rel_rms = ((Q.NF4Linear(g).dequantize() - g).pow(2).mean() / g.pow(2).mean()).sqrt()
    assert 0.085 < rel_rms < 0.10
    assert m.weight.numel() * 8 / w.numel() == 4  # 4 bits per weight in the codes


def test_nf4_double_quant_overhead():
    # QLoRA §3: 8/64 + 32/(64*256) bits per weight of statistics = 0.127.
    m = Q.NF4Linear(_weight((1024, 4096)))
    stats = m.weight_absmax.numel() * 8 + m.weight_nested_absmax.numel() * 32 + 32
    assert abs(stats / (1024 * 4096) - 0.127) < 1e-3


# --- int8 / int4 -------------------------------------------------------------------------------


def _close_to_dequantized_matmul(m, x):
    """m(x) == x W^T for W = m.dequantize(), up to the bfloat16 rounding of the activations
    and of the output that torch's fast CPU kernels impose (relative 2**-8 each)."""
    ref = x @ m.dequantize().t()
    tol = 2 * 2**-8 * (x.abs() @ m.dequantize().abs().t()) + 1e-6
    assert torch.all((m(x) - ref).abs() <= tol)


def test_int8_error_and_matmul():
    w = _weight((256, 640))
    m = Q.Int8Linear(w)
    scale = w.abs().amax(1) / 127
    assert torch.all((m.dequantize() - w).abs() <= scale[:, None] / 2 + 1e-7)
    _close_to_dequantized_matmul(m, torch.randn(3, 5, 640))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_error_and_matmul(group):
    w = _weight((256, 640))
    m = Q.Int4Linear(w, group)
    g = w.view(256, -1, group)
    scale = (g.amax(-1) - g.amin(-1)) / 15
    zero = g.amin(-1) + 8 * scale
    # Half a level, plus the bfloat16 rounding (relative 2**-8) of the stored scale (times
    # |q - 8| <= 8) and zero that the CPU kernel reads.
    bound = scale / 2 + (8 * scale + zero.abs()) * 2**-8 + 1e-6
    err = (m.dequantize() - w).view(256, -1, group).abs()
    assert torch.all(err <= bound[..., None])
    _close_to_dequantized_matmul(m, torch.randn(4, 640))


def test_tinygemm_layout_is_understood():
    # This machine's torch packs int4 in a layout we decode, so rows are gathered exactly from
    # the kernel's packed weight: full blocks and a partial one, whatever the block size
    # (64 rows where torch's CPU capability is AVX512, 32 with AVX2).
    layout = Q.tinygemm_layout()
    assert layout is not None
    w = _weight((80, 64))
    q, scale, lo = integer.int4_quantize(w, 32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 2)
    assert torch.equal(integer.tinygemm_rows(packed, torch.arange(80), 80, 64, layout), q)
    some = torch.tensor([79, 3, 64, 40, 0])
    assert torch.equal(integer.tinygemm_rows(packed, some, 80, 64, layout), q[some])
    # The module keeps the kernel's layout only where torch's int4 kernel is vectorized
    # (AVX512); elsewhere it stores plain nibbles and dequantizes. Either way it reads back q.
    m = Q.Int4Linear(w, 32)
    assert m.layout == (layout if ops.int_kernels_vectorized() else None)
    assert torch.equal(m.levels(), q)


@pytest.mark.parametrize("kind", Q.KINDS)
def test_forward_is_differentiable_in_x(kind):
    w = _weight((128, 64))
    m = Q.Int4Linear(w, 32) if kind == "int4" else linear.LINEAR_CLASSES[kind](w)
    x = torch.randn(2, 3, 64, requires_grad=True)
    g = torch.randn(2, 3, 128)
    (m(x) * g).sum().backward()
    # The backward multiplies by the dequantized weight in the gradient's dtype (float32),
    # whatever rounding the forward kernel applies: dL/dx = g W exactly.
    x_ref = x.detach().clone().requires_grad_()
    (F.linear(x_ref, m.dequantize()) * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in m.parameters())  # the base stays frozen


def test_lora_style_training_on_nf4_base():
    # QLoRA: a trainable low-rank update learns on top of a frozen NF4 base(x).
    torch.manual_seed(0)
    base = Q.NF4Linear(_weight((64, 64)))
    x = torch.randn(32, 64)
    target = base(x) + x @ torch.randn(64, 4) @ torch.randn(4, 64) * 0.1
    A = torch.zeros(64, 4, requires_grad=True)
    B = (torch.randn(4, 64) * 0.1).requires_grad_()
    opt = torch.optim.Adam([A, B], lr=0.05)
    losses = []
    for _ in range(30):
        loss = (base(x) + x @ A @ B - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.3


@pytest.mark.skipif(importlib.util.find_spec("gemmakit.lora") is None, reason="gemmakit.lora not present")
def test_qlora_on_a_quantized_model_then_merge():
    """QLoRA: LoRA on the NF4 model trains (gradients reach the adapters only) and merges
    into a float model with the same logits."""
    from gemmakit import lora

    model = Q.quantize_model(_tiny_gemma(), "nf4")
    lora.apply_lora(model, r=4, alpha=8, dropout=0.0)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    loss = F.cross_entropy(model(ids)[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        before = model(ids)
        merged = lora.merge(model)
        assert not Q.is_quantized(merged)
        torch.testing.assert_close(merged(ids), before, rtol=1e-4, atol=1e-4)


# --- whole models -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", Q.KINDS)
def test_quantize_model(kind):
    model = _tiny_gemma()
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
    before = Q.model_memory(model)
    Q.quantize_model(model, kind, group_size=32)
    with torch.no_grad():
        out = model(ids)
    for layer in model.model.layers:
        assert isinstance(layer.self_attn.q_proj, Q.QuantizedLinear)
        assert isinstance(layer.mlp.down_proj, Q.QuantizedLinear)
    assert isinstance(model.model.embed_tokens, Q.QuantizedEmbedding) == (kind != "nf4")
    rel = (out - ref).norm() / ref.norm()
    # A random 2-layer model amplifies weight noise; per-layer bounds are tested above and
    # realistic behaviour on the bundled model below.
    assert rel < {"int8": 0.05, "nf4": 0.4, "int4": 0.4}[kind]
    assert Q.model_memory(model) < before * (0.65 if kind != "nf4" else 0.8)
    # Float weights come back under the original names and shapes.
    state = Q.dequantized_state_dict(model)
    assert {k: v.shape for k, v in state.items()} == {
        k: v.shape for k, v in _tiny_gemma().state_dict().items()
    }
    # A KV-cached greedy decode runs (the cache takes its dtype from the embedding).
    cache = model.make_cache(1, 12)
    with torch.no_grad():
        model(ids[:1, :6], cache=cache)
        step = model(ids[:1, 6:7], cache=cache)
        full = model(ids[:1, :7])
    torch.testing.assert_close(step[0, -1], full[0, -1], rtol=1e-4, atol=1e-4)


def test_quantized_embedding_is_tied_and_exact():
    model = _tiny_gemma()
    Q.quantize_model(model, "int8")
    embed, head = model.model.embed_tokens, model.lm_head
    assert embed.source is head  # one matrix for both
    assert sum(1 for n, _ in model.state_dict().items() if n.endswith("lm_head.weight")) == 1
    assert not any(k.startswith("model.embed_tokens") for k in model.state_dict())
    ids = torch.tensor([[0, 5, 255], [3, 3, 128]])
    assert torch.equal(embed(ids), head.dequantize()[ids])
    assert embed.weight.dtype == torch.float32 and embed.weight.numel() == 0


def test_quantize_model_errors():
    model = _tiny_gemma()
    with pytest.raises(GemmakitError, match="unknown quantization"):
        Q.quantize_model(model, "int3")
    with pytest.raises(GemmakitError, match="int8 or int4 only"):
        Q.quantize_model(copy.deepcopy(model), "nf4", embeddings=True)
    Q.quantize_model(model, "int8")
    with pytest.raises(GemmakitError, match="already quantized"):
        Q.quantize_model(model, "int4")


@pytest.mark.parametrize("kind", [pytest.param("int8", marks=pytest.mark.slow), "int4"])
def test_bundled_quantized_greedy_tracks_fp32(bundled, kind):
    """On the real model, quantized greedy decoding follows fp32 on a prompt."""
    from gemmakit.evaluation.verify import compare_prompt

    quantized = copy.copy(bundled)
    quantized.model = Q.quantize_model(copy.deepcopy(bundled.model), kind)
    assert Q.model_memory(quantized.model) < Q.model_memory(bundled.model) * (0.3 if kind == "int8" else 0.25)
    row = compare_prompt(bundled, quantized, "The capital of France is", 12)
    assert row["greedy_agreement"] >= (11 if kind == "int8" else 8)
