import pytest
import torch

from gemmakit.loading import ModelSource, load_model
from tests.conftest import FAMILIES, tiny_hf_config


def paired(hf_folder, family, **overrides):
    folder, ref = hf_folder(family, **overrides)
    ours = load_model(ModelSource("hf", folder, family))
    return ours, ref


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf(family, hf_folder):
    ours, ref = paired(hf_folder, family)
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=2e-5, rtol=1e-4)


def test_gemma3_linear_rope_scaling_matches_hf(hf_folder):
    rope = {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    }
    ours, ref = paired(hf_folder, "gemma3", rope_parameters=rope)
    assert ours.config.rope_scaling_factor == 8.0
    ids = torch.randint(3, 256, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_matches_hf(family, hf_folder):
    ours, ref = paired(hf_folder, family)
    ids = torch.randint(3, 256, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        want = ref(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_equals_full_forward(family, hf_folder):
    ours, _ = paired(hf_folder, family)
    ids = torch.randint(3, 256, (2, 15))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.make_cache(2, 15)
        steps = [ours(ids[:, :6], cache=cache)]  # a prefill longer than the window of 4
        steps.append(ours(ids[:, 6:11], cache=cache))  # a chunk that wraps the ring
        steps += [ours(ids[:, t : t + 1], cache=cache) for t in range(11, 15)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-5, rtol=1e-4)


def test_fused_rms_norm_is_bit_identical_to_the_reference_formula():
    from gemmakit.model.layers import RMSNorm

    torch.manual_seed(0)
    for shape in [(1, 1, 640), (2, 64, 640), (1, 4, 3, 256)]:
        norm = RMSNorm(shape[-1], eps=1e-6)
        with torch.no_grad():
            norm.weight.normal_(0, 0.3)
        x = torch.randn(shape) * 3
        ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + norm.weight)
        assert torch.equal(norm(x), ref)
        xb = x.bfloat16()  # float32 inside, one rounding at the end
        refb = (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-6)) * (
            1.0 + norm.weight
        )
        assert torch.equal(norm(xb), refb.bfloat16())


def test_grouped_attention_matches_sdpa_path(hf_folder):
    # Decode steps use the grouped-matmul attention, prefill SDPA: same numbers.
    from gemmakit.ops import dot_product_attention as attention_ops

    ours, _ = paired(hf_folder, "gemma3")
    ids = torch.randint(3, 256, (2, 20))
    with torch.no_grad():
        sdpa = ours(ids)
        old = attention_ops.SMALL_CHUNK
        attention_ops.SMALL_CHUNK = 1000
        try:
            grouped = ours(ids)
        finally:
            attention_ops.SMALL_CHUNK = old
    torch.testing.assert_close(grouped, sdpa, atol=2e-5, rtol=1e-4)


def test_segment_ids_keep_packed_examples_apart():
    """Two examples packed into one row with segment ids and per-segment positions give the
    same hidden states as each run alone (the block-diagonal mask of packed training)."""
    from gemmakit.hf_config import from_hf_config
    from gemmakit.model.gemma import Gemma

    cfg = from_hf_config(tiny_hf_config("gemma3").to_dict())
    torch.manual_seed(0)
    model = Gemma(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    a, b = torch.randint(3, 256, (1, 5)), torch.randint(3, 256, (1, 7))
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 5 + [1] * 7])
    positions = torch.tensor([list(range(5)) + list(range(7))])
    with torch.no_grad():
        together = model.hidden_states(packed, positions=positions, segment_ids=segments)
        alone = torch.cat([model.hidden_states(a), model.hidden_states(b)], dim=1)
        mixed = model.hidden_states(packed, positions=positions)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed[:, 5:], alone[:, 5:], atol=1e-3)  # the mask mattered


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_norm_training_path_matches_autograd(dtype):
    """With a frozen gain and an input that needs a gradient (LoRA training), RMSNorm runs its
    backward in C: the forward is unchanged and dL/dx equals autograd's of F.rms_norm."""
    import torch.nn.functional as F

    from gemmakit.kernels import cpu as cpu_kernels
    from gemmakit.model.layers import RMSNorm

    if cpu_kernels.library() is None:
        pytest.skip("no C compiler")
    torch.manual_seed(0)
    norm = RMSNorm(96)
    with torch.no_grad():
        norm.weight.normal_(0, 0.3)
    norm.weight.requires_grad_(False)
    x = (torch.randn(3, 5, 96) * 4).to(dtype).requires_grad_(True)
    g = torch.randn(3, 5, 96).to(dtype)
    y = norm(x)
    assert y.grad_fn is not None and "RMSNorm" in type(y.grad_fn).__name__
    (got,) = torch.autograd.grad(y, [x], g)
    ref = F.rms_norm(x.float(), [96], 1.0 + norm.weight.float(), norm.eps).to(dtype)
    (want,) = torch.autograd.grad(ref, [x], g)
    assert torch.equal(y, ref)
    tol = (
        dict(rtol=1e-5, atol=1e-5)
        if dtype == torch.float32
        else dict(rtol=1e-2, atol=1e-2 * float(want.abs().max()))
    )
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_training_function_is_bit_identical_to_the_plain_form(dtype):
    """RoPE's training path (a custom autograd function with the sign moved onto sin) gives
    exactly the values and input gradients of x * cos + rotate_half(x) * sin, also on the
    transposed (non-contiguous) q the attention passes it."""
    from gemmakit.model.layers import apply_rope, rope_cos_sin, rope_inv_freq

    torch.manual_seed(0)
    x = (torch.randn(2, 7, 3, 16) * 3).to(dtype).transpose(1, 2).requires_grad_(True)  # (B, H, T, D)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [9, 10, 11, 12, 13, 14, 15]])
    cos, sin = rope_cos_sin(rope_inv_freq(16, 10_000.0, 1.0), positions, dtype)
    got = apply_rope(x, cos, sin)
    assert "Rope" in type(got.grad_fn).__name__
    rotated = torch.cat((-x[..., 8:], x[..., :8]), dim=-1)
    want = x * cos + rotated * sin
    g = torch.randn_like(want)
    assert torch.equal(got, want)
    assert torch.equal(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0])
    with torch.no_grad():
        assert torch.equal(apply_rope(x, cos, sin), want)  # the plain path
