"""GGUF products with 8-bit activations (kernels/csrc/gguf_act.c, gguf_dot.c): the activation
roundings against a numpy restatement of llama.cpp's x86 quantizers, the integer dots against
llama.cpp's formula in float64, the vector builds against the scalar one bit for bit, and a
row's result independent of the rows beside it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from gemmakit.kernels import build as kernel_build
from gemmakit.kernels import cpu as cpu_kernels
from tests.test_gguf_blocks import TYPES, random_blocks

needs_kernel = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler")

T = GGMLQuantizationType
Q8_0, Q8_1, Q8_K = 8, 9, 15
# llama.cpp's ggml-cpu.c type_traits_cpu[type].vec_dot_type
ACTIVATION = {T.Q4_0: Q8_0, T.Q5_0: Q8_0, T.Q8_0: Q8_0, T.IQ4_NL: Q8_0, T.Q4_1: Q8_1, T.Q5_1: Q8_1}
# the fp16 min of each block of Q4_1 / Q5_1 sits after d (ggml-common.h block_q4_1)
HAS_BLOCK_MIN = (T.Q4_1, T.Q5_1)


def quantize_q8_32(x: np.ndarray, with_sum: bool):
    """llama.cpp's quantize_row_q8_0 / _q8_1 AVX path (ggml-cpu/arch/x86/quants.c) in numpy:
    d = amax / 127 and id = 127 / amax in float32, values rounded half to even, d (and Q8_1's
    s = d * sum, with the unrounded d) stored as fp16."""
    blocks = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inverse = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(blocks * inverse), -128, 127).astype(np.int8)
    out = {"q": q.reshape(x.shape), "d": d[..., 0].astype(np.float16).astype(np.float32)}
    if with_sum:
        total = q.astype(np.int32).sum(axis=-1).astype(np.float32)
        out["s"] = (d[..., 0] * total).astype(np.float16).astype(np.float32)
    return out


def quantize_q8_k(x: np.ndarray):
    """llama.cpp's quantize_row_q8_K_ref (ggml-quants.c) in numpy: the first value of largest
    magnitude sets iscale = -127 / max, values rounded half to even and capped at 127, d =
    1 / iscale, the sums of each 16; an all-zero block is all zeros."""
    blocks = x.astype(np.float32).reshape(x.shape[0], -1, 256)
    first = np.abs(blocks).argmax(axis=-1)[..., None]
    peak = np.take_along_axis(blocks, first, axis=-1)
    zero = peak == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.float32(-127) / np.where(zero, np.float32(1), peak)
    q = np.minimum(np.rint(blocks * iscale), 127).astype(np.int8)
    q[np.broadcast_to(zero, q.shape)] = 0
    d = np.where(zero, np.float32(0), np.float32(1) / iscale)[..., 0]
    bsums = q.reshape(x.shape[0], -1, 16).astype(np.int16).sum(axis=-1, dtype=np.int16)
    return {"q": q.reshape(x.shape), "d": d.astype(np.float32), "bsums": bsums}


def awkward_activations(rows: int, k: int, seed: int) -> torch.Tensor:
    """Random rows with ties (x * id exactly n + 0.5), an all-zero block and a block whose
    largest magnitude is negative and repeated."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[0, 32:64] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5] + [3.0] * 25)  # id = 1: exact ties
    x[-1, -256:] = 0.0
    x[rows // 2, 256:512] = torch.linspace(-3, 3, 256)
    x[rows // 2, 300] = -5.0
    x[rows // 2, 400] = 5.0  # the same magnitude later: the first one's sign wins
    return x


@needs_kernel
@pytest.mark.parametrize("act_type", [Q8_0, Q8_1, Q8_K])
def test_activation_blocks_are_llama_cpps(act_type):
    x = awkward_activations(5, 512, seed=1)
    got = cpu_kernels.gguf_quantize_activations(x, act_type)
    want = quantize_q8_k(x.numpy()) if act_type == Q8_K else quantize_q8_32(x.numpy(), act_type == Q8_1)
    assert set(got) == set(want)
    for name, value in want.items():
        assert np.array_equal(got[name].numpy(), value.reshape(got[name].shape)), name
    if act_type == Q8_0:  # the ties of block 1 rounded to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
        assert got["q"][0, 32:39].tolist() == [127, 0, 2, 2, 0, -2, -2]
    if act_type == Q8_K:
        assert float(got["d"][-1, -1]) == 0 and not got["q"][-1, -256:].any()
        # d has the opposite sign of the first largest value: -5 in row 2 (then +5), +127 in row 0
        assert float(got["d"][2, 1]) > 0 and got["q"][2, 300] == -127 and got["q"][2, 400] == 127
        assert float(got["d"][0, 0]) < 0
    assert cpu_kernels.gguf_quantize_activations(x[:, :48], act_type) is None  # not whole blocks


def reference_product(x: torch.Tensor, raw: np.ndarray, ggml_type) -> np.ndarray:
    """llama.cpp's product in float64: the activations rounded as llama.cpp rounds them, times
    the gguf package's dequantized weight; for Q4_1 / Q5_1 the min term uses Q8_1's fp16 s."""
    act = ACTIVATION.get(ggml_type, Q8_K)
    a = quantize_q8_k(x.numpy()) if act == Q8_K else quantize_q8_32(x.numpy(), act == Q8_1)
    block = 256 if act == Q8_K else 32
    rows, k = x.shape
    xd = (a["q"].reshape(rows, -1, block).astype(np.float64) * a["d"][..., None]).reshape(rows, k)
    w = quants.dequantize(raw, ggml_type).astype(np.float64)
    y = xd @ w.T
    if ggml_type in HAS_BLOCK_MIN:
        size = GGML_QUANT_SIZES[ggml_type][1]
        m = raw.reshape(raw.shape[0], -1, size)[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        exact_sum = a["d"] * a["q"].reshape(rows, -1, 32).astype(np.float64).sum(-1)  # (rows, blocks)
        y += (a["s"] - exact_sum) @ m.T
    return y


@needs_kernel
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_integer_dots_are_llama_cpps_product(ggml_type):
    block = GGML_QUANT_SIZES[ggml_type][0]
    k = block * 20 if block == 32 else block * 3  # 20 blocks of 32: a padded group of 8
    raw = random_blocks(ggml_type, 29, k, seed=2)
    x = awkward_activations(6, k, seed=3)
    y = cpu_kernels.gguf_matmul(x, torch.from_numpy(raw), int(ggml_type), k)
    expected = reference_product(x, raw, ggml_type)
    # float32 scaling and summation of exact integer block sums
    scale = np.abs(x.numpy()).astype(np.float64) @ np.abs(quants.dequantize(raw, ggml_type)).T.astype(
        np.float64
    )
    assert np.abs(y.numpy() - expected).max() <= 2e-6 * scale.max()
    # and the float32 product moved by at most half a rounding step of each activation: its
    # block's largest magnitude / 254 (the fp16 d adds 2^-11 relative)
    exact = cpu_kernels.gguf_matmul(x, torch.from_numpy(raw), int(ggml_type), k, rounded=False)
    act_block = 256 if ACTIVATION.get(ggml_type, Q8_K) == Q8_K else 32
    amax = x.abs().view(x.shape[0], -1, act_block).amax(-1, keepdim=True).expand(-1, -1, act_block)
    half_step = (amax.reshape(x.shape) / 254).double().numpy() * (1 + 2**-10)
    bound = half_step @ np.abs(quants.dequantize(raw, ggml_type)).T.astype(np.float64)
    assert ((y - exact).abs().numpy() <= bound + 1e-5 * scale.max()).all()


@needs_kernel
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(ggml_type):
    block = GGML_QUANT_SIZES[ggml_type][0]
    k = block * 20 if block == 32 else block * 2  # 20 blocks of 32: groups of 8 and a padded one
    raw = torch.from_numpy(random_blocks(ggml_type, 23, k, seed=4))
    # 70 rows: tiles of 8, 6, 4 and fewer, from 4 rows on blocks unpacked once per call, and
    # two passes of activation rows (64 and 6) over each tile of unpacked weights
    x = torch.randn(70, k, generator=torch.Generator().manual_seed(5))
    together = cpu_kernels.gguf_matmul(x, raw, int(ggml_type), k)
    assert torch.equal(cpu_kernels.gguf_matmul(x[:9], raw, int(ggml_type), k), together[:9])
    for r in (0, 4, 8, 39, 69):
        alone = cpu_kernels.gguf_matmul(x[r : r + 1], raw, int(ggml_type), k)
        assert torch.equal(alone[0], together[r])
    lib = cpu_kernels.library()
    y = torch.full((3, 23), float("nan"))
    lib.gguf_matmul_rows(int(ggml_type), raw.data_ptr(), 23, k, x.data_ptr(), 3, y.data_ptr(), 5, 17)
    assert torch.equal(y[:, 5:17], together[:3, 5:17]) and y[:, :5].isnan().all()
    one = torch.empty(23)
    lib.gguf_matvec(int(ggml_type), raw.data_ptr(), k, x[4].contiguous().data_ptr(), one.data_ptr(), 0, 23)
    assert torch.equal(one, together[4])


@needs_kernel
@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-f16c")])
def test_avx2_and_scalar_builds_give_the_same_bits(flags):
    """The AVX2 build (no VNNI) and the scalar one round the activations to the same bytes and
    give the same products, bit for bit, as the build this machine runs."""
    other = kernel_build.compile_library(kernel_build.FLAGS + flags)
    if other is None:
        pytest.skip("the compiler rejects " + " ".join(flags))
    for ggml_type in TYPES:
        # blocks of 32: 20 of them (a padded group of 8); 1 and 3 rows (fused), 4 and 20 (unpacked groups), 70 (2 passes)
        k = 640 if GGML_QUANT_SIZES[ggml_type][0] == 32 else 512
        raw = torch.from_numpy(random_blocks(ggml_type, 11, k, seed=7))
        for rows in (1, 3, 4, 20, 70):
            x = awkward_activations(rows, k, seed=6)
            y = torch.empty(rows, 11)
            other.gguf_matmul_rows(
                int(ggml_type), raw.data_ptr(), 11, k, x.data_ptr(), rows, y.data_ptr(), 0, 11
            )
            assert torch.equal(y, cpu_kernels.gguf_matmul(x, raw, int(ggml_type), k)), (ggml_type.name, rows)
    x = awkward_activations(4, 512, seed=6)
    for act_type in (Q8_0, Q8_1, Q8_K):
        want = cpu_kernels.gguf_quantize_activations(x, act_type)
        q, d = torch.empty(4, 512, dtype=torch.int8), torch.empty_like(want["d"])
        s, bsums = torch.empty(4, 16), torch.empty(4, 32, dtype=torch.int16)
        other.gguf_quantize_activations(act_type, x.data_ptr(), 4, 512, q.data_ptr(), d.data_ptr(), s.data_ptr(),
                                        bsums.data_ptr())  # fmt: skip
        assert torch.equal(q, want["q"]) and torch.equal(d, want["d"])
        if act_type == Q8_1:
            assert torch.equal(s, want["s"])
        if act_type == Q8_K:
            assert torch.equal(bsums, want["bsums"])


@needs_kernel
@pytest.mark.parametrize(
    "ggml_type", [T.Q4_0, T.Q5_0, T.Q8_0, T.IQ4_NL, T.Q4_K, T.Q6_K, T.Q5_K], ids=lambda t: t.name
)
def test_many_weight_tiles_give_the_builds_bits(ggml_type):
    """150 weight rows (tiles of 64 and a partial one; panels of 16 and a partial one, each
    fetching the next) against 9 and 70 activation rows (tiles of 8 or 6 rows and the rest):
    the AVX2 build's bits, and the rows [lo, hi) of a call that starts and ends inside a
    panel those of the whole product."""
    other = kernel_build.compile_library(kernel_build.FLAGS + ("-mno-avx512f",))
    if other is None:
        pytest.skip("the compiler rejects -mno-avx512f")
    k = 640 if GGML_QUANT_SIZES[ggml_type][0] == 32 else 512
    raw = torch.from_numpy(random_blocks(ggml_type, 150, k, seed=11))
    for rows in (9, 70):
        x = awkward_activations(rows, k, seed=12)
        want = torch.empty(rows, 150)
        other.gguf_matmul_rows(
            int(ggml_type), raw.data_ptr(), 150, k, x.data_ptr(), rows, want.data_ptr(), 0, 150
        )
        assert torch.equal(cpu_kernels.gguf_matmul(x, raw, int(ggml_type), k), want), rows
        part = torch.full((rows, 150), float("nan"))
        lib = cpu_kernels.library()
        lib.gguf_matmul_rows(
            int(ggml_type), raw.data_ptr(), 150, k, x.data_ptr(), rows, part.data_ptr(), 7, 101
        )
        assert (
            torch.equal(part[:, 7:101], want[:, 7:101])
            and part[:, :7].isnan().all()
            and part[:, 101:].isnan().all()
        )


@needs_kernel
@pytest.mark.parametrize("ggml_type", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_k_quant_panels_give_each_rows_own_result(ggml_type):
    """gguf_kpanel.c (Q4_K / Q6_K against 8 or more rows, each super-block unpacked for every
    row, llama.cpp's lanes formed one weight row per lane) at the bundled down_proj's width (8
    super-blocks a row), 37 weight rows (two panels of 16 and a partial one) and 45 activation
    rows (tiles of 6 and a partial one): each row's result is bit for bit its result alone (the
    one-row fused path), and the product stays llama.cpp's in float64."""
    k = 2048
    raw = torch.from_numpy(random_blocks(ggml_type, 37, k, seed=21))
    x = awkward_activations(45, k, seed=22)
    together = cpu_kernels.gguf_matmul(x, raw, int(ggml_type), k)
    for r in (0, 7, 22, 44):
        assert torch.equal(cpu_kernels.gguf_matmul(x[r : r + 1], raw, int(ggml_type), k)[0], together[r])
    expected = reference_product(x, raw.numpy(), ggml_type)
    scale = np.abs(x.numpy()).astype(np.float64) @ np.abs(quants.dequantize(raw.numpy(), ggml_type)).T
    assert np.abs(together.numpy() - expected).max() <= 2e-6 * scale.max()


@needs_kernel
@pytest.mark.parametrize("ggml_type", [T.Q5_0, T.Q4_K, T.Q8_0], ids=lambda t: t.name)
def test_threads_and_column_chunks_change_no_value(ggml_type):
    """gguf_matmul_q8_mt hands out chunks of output columns to whichever thread is free: the
    product over 3 threads (uneven chunks, a partial last one) equals the one-thread product
    and, column for column, the products of the rows alone."""
    block = GGML_QUANT_SIZES[ggml_type][0]
    k = block * 20 if block == 32 else block * 2
    raw = torch.from_numpy(random_blocks(ggml_type, 700, k, seed=8))
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(9))
    lib = cpu_kernels.library()
    one, three = torch.empty(5, 700), torch.empty(5, 700)
    lib.gguf_matmul_q8_mt(int(ggml_type), raw.data_ptr(), 700, k, x.data_ptr(), 5, one.data_ptr(), 1)
    lib.gguf_matmul_q8_mt(int(ggml_type), raw.data_ptr(), 700, k, x.data_ptr(), 5, three.data_ptr(), 3)
    assert torch.equal(one, three)
    alone = torch.empty(1, 700)
    lib.gguf_matmul_q8_mt(
        int(ggml_type), raw.data_ptr(), 700, k, x[2:3].contiguous().data_ptr(), 1, alone.data_ptr(), 3
    )
    assert torch.equal(alone[0], three[2])


@needs_kernel
def test_products_write_a_given_output():
    """gguf_matmul(out=...) writes the product into the tensor it is given (the benchmarks reuse
    one) and refuses one of another shape or dtype."""
    raw = torch.from_numpy(random_blocks(T.Q8_0, 40, 640, seed=13))
    x = torch.randn(5, 640, generator=torch.Generator().manual_seed(14))
    out = torch.full((5, 40), float("nan"))
    assert cpu_kernels.gguf_matmul(x, raw, int(T.Q8_0), 640, out=out) is out
    assert torch.equal(out, cpu_kernels.gguf_matmul(x, raw, int(T.Q8_0), 640))
    assert cpu_kernels.gguf_matmul(x, raw, int(T.Q8_0), 640, out=torch.empty(5, 41)) is None
    assert cpu_kernels.gguf_matmul(x, raw, int(T.Q8_0), 640, out=torch.empty(5, 40).double()) is None


@needs_kernel
def test_two_rows_against_a_large_matrix_take_the_fused_path_right():
    """Two activation rows against more than 16 MiB of blocks of 32 in one call run fused
    (gguf_dot.h panels_take_rows; the panels below it), reading the activations' unsigned and
    transposed copies: each row's result is its result alone, and a call over fewer weight
    rows (the panels) gives the same values."""
    n, k = 16400, 1024  # 17.8 MB of Q8_0
    raw = torch.from_numpy(random_blocks(T.Q8_0, n, k, seed=15))
    x = awkward_activations(2, k, seed=16)
    lib = cpu_kernels.library()
    both, alone = torch.empty(2, n), torch.empty(2, n)
    lib.gguf_matmul_rows(int(T.Q8_0), raw.data_ptr(), n, k, x.data_ptr(), 2, both.data_ptr(), 0, n)
    for r in range(2):
        lib.gguf_matvec(
            int(T.Q8_0), raw.data_ptr(), k, x[r].contiguous().data_ptr(), alone[r].data_ptr(), 0, n
        )
    assert torch.equal(both, alone)
    part = torch.empty(2, n)
    lib.gguf_matmul_rows(int(T.Q8_0), raw.data_ptr(), n, k, x.data_ptr(), 2, part.data_ptr(), 0, 100)
    assert torch.equal(part[:, :100], both[:, :100])
