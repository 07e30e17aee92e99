"""The C int8 matrix-vector kernel: same numbers as the float reference, and a clean fallback."""

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
