"""The C kernels outside the decode step: int8 matrix-vector, LoRA dropout, cross-entropy gradient."""

import pytest
import torch
import torch.nn.functional as F

from gemmakit import cpu_kernels
from gemmakit.quantization import Int8Linear

needs_kernel = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler here")


@needs_kernel
@pytest.mark.parametrize("K", [640, 100, 1])  # whole 64-wide steps, a tail, a tail only
def test_gemv_int8_matches_float_reference(K):
    g = torch.Generator().manual_seed(K)
    N = cpu_kernels.MIN_ROWS + 3  # rows split unevenly over the threads
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scale, x = torch.rand(N, generator=g), torch.randn(K, generator=g)
    y = cpu_kernels.gemv_int8(x, w, scale)
    ref = (w.double() @ x.double()) * scale.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4 * K**0.5)


@needs_kernel
def test_int8_linear_single_token_uses_kernel_and_matches_dequantized():
    torch.manual_seed(0)
    layer = Int8Linear(torch.randn(cpu_kernels.MIN_ROWS, 64) * 0.05)
    x = torch.randn(1, 1, 64)
    expected = F.linear(x, layer.dequantize(torch.float32))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert cpu_kernels.gemv_int8(x.reshape(-1), layer.weight, layer.weight_scale) is not None


def test_kernel_declines_what_it_cannot_do(monkeypatch):
    w, s = torch.zeros(cpu_kernels.MIN_ROWS, 8, dtype=torch.int8), torch.ones(cpu_kernels.MIN_ROWS)
    assert cpu_kernels.gemv_int8(torch.zeros(8, dtype=torch.bfloat16), w, s) is None
    assert cpu_kernels.gemv_int8(torch.zeros(8), w[:100], s[:100]) is None  # small: torch's kernel
    assert cpu_kernels.gemv_int8(torch.zeros(8), w.t().contiguous().t(), s) is None
    monkeypatch.setenv("GEMMAKIT_NO_C_KERNELS", "1")
    cpu_kernels.library.cache_clear()
    try:
        assert cpu_kernels.gemv_int8(torch.zeros(8), w, s) is None
    finally:
        monkeypatch.delenv("GEMMAKIT_NO_C_KERNELS")
        cpu_kernels.library.cache_clear()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_mask_rate_scale_and_rebuild(dtype):
    x = torch.randn(300_001, dtype=dtype)  # odd length: the last hash serves one element
    y = cpu_kernels.dropout(x, 0.1, seed=7)
    kept = y != 0
    assert abs(float(1 - kept.float().mean()) - 0.1) < 0.003  # 300k draws: sigma 0.0005
    torch.testing.assert_close(
        y[kept].float(), x[kept].float() / 0.9, rtol=4e-3 if dtype == torch.bfloat16 else 1e-6, atol=0
    )
    assert torch.equal(cpu_kernels.dropout(x, 0.1, seed=7), y)  # the same seed rebuilds the mask
    assert not torch.equal(cpu_kernels.dropout(x, 0.1, seed=8) != 0, kept)
    z = x.clone()
    cpu_kernels.dropout(z, 0.1, seed=7, out=z)  # in place
    assert torch.equal(z, y)
    # Neighbouring elements share a 64-bit hash: their drops must still be independent.
    pairs = (~kept[:300_000]).view(-1, 2)
    both = float((pairs[:, 0] & pairs[:, 1]).float().mean())
    assert abs(both - 0.01) < 0.002


@needs_kernel
def test_softmax_xent_matches_torch():
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(9, 5000, generator=g) * 4).bfloat16()  # 5000: blocks of 1024 plus a tail
    y = torch.randint(0, 5000, (9,), generator=g)
    y[0] = 4999  # a target in the scalar tail
    want_lse = torch.logsumexp(z.float(), -1)
    p = torch.softmax(z.float(), -1)
    p[torch.arange(9), y] -= 1
    out = z.clone()
    lse = cpu_kernels.softmax_xent_(out, y)
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-5)
    # One rounding to bfloat16 of a float32 value within a few ulps of torch's: at most one
    # bfloat16 step apart.
    ulp = p.abs().clamp_min(1e-30) * 2.0**-7
    assert torch.all((out.float() - p).abs() <= ulp)
    assert cpu_kernels.softmax_xent_(z.float(), y) is None  # float32: not this kernel's job
