"""GGUF block types run natively: the C kernels (csrc/gguf_blocks.c) against the gguf package's
numpy dequantizers, the modules (quant/gguf_blocks.py), loading a GGUF with its own types, and
the C decode step over them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from gemmakit.kernels import build as kernel_build
from gemmakit.kernels import cpu as cpu_kernels

needs_kernel = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler")

T = GGMLQuantizationType
TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
# Where each block keeps its fp16 scales (ggml-common.h block_q*): d (and the min's scale).
HALF_AT = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
           T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}  # fmt: skip


def random_blocks(ggml_type, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes of (rows, cols) values in `ggml_type`, every fp16 scale a finite value of
    either sign (subnormals included): every bit pattern of the quants is exercised."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[ggml_type]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scales = rng.standard_normal((rows, cols // block, len(HALF_AT[ggml_type]))) * 0.01
    scales[..., 0].flat[::7] = 3e-7  # a subnormal half
    halves = scales.astype(np.float16).view(np.uint8).reshape(rows, cols // block, -1, 2)
    for i, at in enumerate(HALF_AT[ggml_type]):
        raw[..., at : at + 2] = halves[..., i, :]
    return raw.reshape(rows, -1)


@needs_kernel
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_dequantize_is_the_gguf_packages_bit_for_bit(ggml_type):
    block = GGML_QUANT_SIZES[ggml_type][0]
    raw = random_blocks(ggml_type, 37, block * 3)
    expected = quants.dequantize(raw, ggml_type)
    got = cpu_kernels.gguf_dequantize(torch.from_numpy(raw), int(ggml_type), block * 3)
    assert np.array_equal(got.numpy().view(np.uint32), expected.view(np.uint32))
    ids = torch.tensor([[5, 0], [36, 5]])
    rows = cpu_kernels.gguf_rows(torch.from_numpy(raw), int(ggml_type), block * 3, ids)
    assert rows.shape == (2, 2, block * 3)
    assert torch.equal(rows, got[ids])


@needs_kernel
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_products_match_a_float64_reference(ggml_type, rows):
    """The mat-vec (one row) and the multi-row product equal x W^T computed in float64 on the
    dequantized weight, within float32 summation error (float32 activations, no rounding of
    them to 8 bits)."""
    block = GGML_QUANT_SIZES[ggml_type][0]
    k = block * 10 if block == 32 else block * 3
    raw = random_blocks(ggml_type, 45, k, seed=1)
    w = torch.from_numpy(quants.dequantize(raw, ggml_type)).double()
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(2))
    y = cpu_kernels.gguf_matmul(x, torch.from_numpy(raw), int(ggml_type), k)
    expected = x.double() @ w.T
    scale = (x.double().abs() @ w.abs().T).max()
    assert y.shape == (rows, 45)
    assert (y.double() - expected).abs().max() <= 1e-6 * scale


@needs_kernel
def test_wide_rows_take_the_blockwise_path():
    """Rows longer than the stack buffer (4096 values) are multiplied block by block."""
    raw = random_blocks(T.Q4_K, 5, 256 * 20, seed=3)
    w = torch.from_numpy(quants.dequantize(raw, T.Q4_K)).double()
    x = torch.randn(3, 256 * 20, generator=torch.Generator().manual_seed(4))
    y = cpu_kernels.gguf_matmul(x, torch.from_numpy(raw), int(T.Q4_K), 256 * 20)
    torch.testing.assert_close(y.double(), x.double() @ w.T, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernels_refuse_what_they_do_not_run():
    raw = torch.from_numpy(random_blocks(T.Q8_0, 4, 64))
    assert cpu_kernels.gguf_row_bytes(int(T.Q8_0), 64) == 68
    assert cpu_kernels.gguf_row_bytes(int(T.Q8_0), 48) is None  # not whole blocks
    assert cpu_kernels.gguf_row_bytes(int(T.IQ4_NL), 64) is None  # a type the C unit lacks
    assert cpu_kernels.gguf_matmul(torch.randn(2, 64), raw, int(T.Q4_0), 64) is None  # bytes per row differ
    assert cpu_kernels.gguf_matmul(torch.randn(2, 64).double(), raw, int(T.Q8_0), 64) is None


@needs_kernel
@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-f16c")])
def test_fallback_paths_agree(flags):
    """The AVX2 and scalar builds (a CI machine without AVX-512) dequantize the same bits and
    give the same products up to float32 summation order."""
    lib = kernel_build.compile_library(kernel_build.FLAGS + flags)
    if lib is None:
        pytest.skip("the compiler rejects " + " ".join(flags))
    for ggml_type in TYPES:
        block = GGML_QUANT_SIZES[ggml_type][0]
        k = block * 4
        raw = torch.from_numpy(random_blocks(ggml_type, 9, k, seed=5))
        out = torch.empty(9, k)
        lib.gguf_dequantize_rows(int(ggml_type), raw.data_ptr(), k, out.data_ptr(), 0, 9)
        assert torch.equal(out, cpu_kernels.gguf_dequantize(raw, int(ggml_type), k))
        x = torch.randn(2, k, generator=torch.Generator().manual_seed(6))
        for rows in (1, 2):
            y = torch.empty(rows, 9)
            if rows == 1:
                lib.gguf_matvec(int(ggml_type), raw.data_ptr(), k, x.data_ptr(), y.data_ptr(), 0, 9)
            else:
                lib.gguf_matmul_rows(
                    int(ggml_type), raw.data_ptr(), 9, k, x.data_ptr(), 2, y.data_ptr(), 0, 9
                )
            expected = cpu_kernels.gguf_matmul(x[:rows], raw, int(ggml_type), k)
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
