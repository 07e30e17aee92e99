"""The C kernels outside the decode step: int8 matrix-vector, LoRA dropout, cross-entropy gradient."""

import pytest
import torch
import torch.nn.functional as F

from gemmakit.kernels import build as kernel_build
from gemmakit.kernels import cpu as cpu_kernels
from gemmakit.quant import Int8Linear

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


def _mask_bits(seed: int, i: int) -> int:
    """csrc/dropout.c's mask_bits in Python: splitmix64's finalizer of seed + pair index."""
    m = 2**64 - 1
    z = (seed + (i >> 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    z ^= z >> 31
    return z >> 32 if i & 1 else z & 0xFFFFFFFF


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_ranges_match_the_hash_elementwise(dtype):
    # Odd starts (one scalar element before the 16-wide blocks), whole blocks, ranges too short
    # for a block, and tails: each element's fate is its own hash's, whatever the range.
    x = torch.randn(700, dtype=dtype)
    seed, threshold, scale = 2**64 - 12345, round(0.3 * 2**32), 1 / 0.7  # a seed that wraps
    lib = cpu_kernels.library()
    bf16 = int(dtype == torch.bfloat16)
    for start, stop in [(0, 700), (1, 300), (3, 40), (5, 21), (7, 22), (17, 50), (333, 699), (64, 96)]:
        out = torch.full_like(x, 7.0)
        lib.dropout(x.data_ptr(), out.data_ptr(), start, stop, seed, threshold, scale, bf16)
        keep = torch.tensor([_mask_bits(seed, i) >= threshold for i in range(start, stop)])
        # float32 product, rounded once to the dtype (to nearest even, as .to() does)
        want = torch.where(
            keep, (x[start:stop].float() * torch.tensor(scale, dtype=torch.float32)).to(dtype), 0
        )
        assert torch.equal(out[start:stop], want), (start, stop)
        assert (out[:start] == 7).all() and (out[stop:] == 7).all()  # nothing outside the range
        assert not torch.signbit(out[start:stop][~keep]).any()  # dropped: +0


def _bf16_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bfloat16 values apart a and b are (signed magnitudes made monotonic)."""
    ia, ib = (t.view(torch.int16).int() for t in (a, b))
    ia, ib = (torch.where(i < 0, -(i & 0x7FFF), i) for i in (ia, ib))
    return (ia - ib).abs()


def _scalar_library(flags):
    """The library built without (part of) AVX-512: its scalar or integer-rounding paths."""
    lib = kernel_build.compile_library(kernel_build.FLAGS + flags)
    if lib is None:
        pytest.skip("the compiler rejects " + " ".join(flags))
    return lib


@needs_kernel
@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-avx512bf16",)])
def test_fallbacks_agree_with_the_vector_kernels(flags):
    """The scalar loops (no AVX-512) and the integer bfloat16 rounding (no AVX512-BF16) give the
    vector path's dropout bit for bit, and its RMSNorm and GeGLU to a float32 rounding."""
    other, lib = _scalar_library(flags), cpu_kernels.library()
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        bf16 = int(dtype == torch.bfloat16)
        x = (torch.randn(12_345, generator=g) * 4).to(dtype)
        outs = [torch.empty_like(x), torch.empty_like(x)]
        for lib_, out in zip((lib, other), outs):
            lib_.dropout(x.data_ptr(), out.data_ptr(), 3, x.numel(), 99, 2**31, 2.0, bf16)
        assert torch.equal(outs[0][3:], outs[1][3:])
        rows, C = 40, 37
        x2, gain = x[: rows * C].view(rows, C), torch.rand(C, generator=g) + 0.5
        grad = torch.randn(rows, C, generator=g).to(dtype)
        res = []
        for lib_ in (lib, other):
            y, rstd, dx = torch.empty_like(x2), torch.empty(rows), torch.empty_like(x2)
            lib_.rms_norm_forward(
                x2.data_ptr(), gain.data_ptr(), y.data_ptr(), rstd.data_ptr(), C, 1e-6, 0, rows, bf16
            )
            args = (grad.data_ptr(), x2.data_ptr(), rstd.data_ptr(), gain.data_ptr(), dx.data_ptr())
            lib_.rms_norm_backward(*args, C, 0, rows, bf16)
            gate, up = x[:5000], x[5000:10000]
            act, gg, gu = torch.empty_like(gate), torch.empty_like(gate), torch.empty_like(gate)
            lib_.geglu_forward(gate.data_ptr(), up.data_ptr(), act.data_ptr(), 0, 5000, bf16)
            args = (x[10000:].data_ptr(), gate.data_ptr(), up.data_ptr(), gg.data_ptr(), gu.data_ptr())
            lib_.geglu_backward(*args, 0, 2345, bf16)
            res.append((y, rstd, dx, act, gg[:2345], gu[:2345]))
        for a, b in zip(*res):
            if dtype == torch.bfloat16 and a.dtype == dtype:
                assert _bf16_steps(a, b).max() <= 1
            else:  # the mean in dx cancels: a float32 rounding of the largest value
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


@needs_kernel
def test_split_over_threads_matches_one_call(monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(37, 111, generator=g).bfloat16()  # rows and lengths that split unevenly
    up, grad, gain = torch.randn_like(x), torch.randn_like(x), torch.rand(111, generator=g) + 0.5

    def run():
        y, rstd = cpu_kernels.rms_norm(x, gain, 1e-6)
        return (
            cpu_kernels.dropout(x, 0.3, seed=5), y, rstd, cpu_kernels.rms_norm_backward(grad, x, rstd, gain),
            cpu_kernels.geglu(x, up), *cpu_kernels.geglu_backward(grad, x, up),
        )  # fmt: skip

    whole = run()
    for name in ("SPLIT_DROPOUT", "SPLIT_RMS_NORM", "SPLIT_GEGLU"):
        monkeypatch.setattr(cpu_kernels, name, 1)
    for a, b in zip(whole, run(), strict=True):
        assert torch.equal(a, b)


@needs_kernel
def test_split_entry_points_without_openmp(monkeypatch):
    """Where the compiler has no OpenMP the library is built without it: its split entry
    points then run the parts one after another, with the same results."""
    plain = kernel_build.compile_library(kernel_build.FLAGS)  # no -fopenmp
    assert plain is not None
    x = torch.randn(37, 111, generator=torch.Generator().manual_seed(3)).bfloat16()
    up, grad, gain = torch.randn_like(x), torch.randn_like(x), torch.rand(111) + 0.5
    for name in ("SPLIT_DROPOUT", "SPLIT_RMS_NORM", "SPLIT_GEGLU"):
        monkeypatch.setattr(cpu_kernels, name, 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # three parts, whatever the machine

    def run():
        y, rstd = cpu_kernels.rms_norm(x, gain, 1e-6)
        return (cpu_kernels.dropout(x, 0.3, seed=5), y, rstd, cpu_kernels.rms_norm_backward(grad, x, rstd, gain),
                cpu_kernels.geglu(x, up), *cpu_kernels.geglu_backward(grad, x, up))  # fmt: skip

    with_openmp = run()
    monkeypatch.setattr(cpu_kernels, "library", lambda: plain)
    for a, b in zip(with_openmp, run(), strict=True):
        assert torch.equal(a, b)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [640, 256, 37, 2560])  # hidden, head_dim, a tail, torch's chunked sum
def test_rms_norm_matches_torch(dtype, C):
    g = torch.Generator().manual_seed(C)
    x = (torch.randn(3, 41, C, generator=g) * 3).to(dtype)
    gain = torch.rand(C, generator=g) + 0.5
    y, rstd = cpu_kernels.rms_norm(x, gain, 1e-6)
    want_y, want_rstd = torch.ops.aten._fused_rms_norm(x.float(), [C], gain, 1e-6)
    want_y = want_y.to(dtype)
    assert y.dtype == dtype and y.shape == x.shape and rstd.shape == want_rstd.shape == (3, 41, 1)
    torch.testing.assert_close(rstd, want_rstd, rtol=1e-6, atol=0)
    if dtype == torch.float32:
        torch.testing.assert_close(y, want_y, rtol=2.5e-7, atol=1e-30)  # a couple of ulps
    else:
        assert (y == want_y).float().mean() >= 0.99
        assert _bf16_steps(y, want_y).max() <= 1
    # The backward with this rstd is autograd's of F.rms_norm.
    grad = torch.randn(x.shape, generator=g).to(dtype)
    xr = x.double().requires_grad_()
    F.rms_norm(xr, [C], gain.double(), 1e-6).backward(grad.double())
    dx = cpu_kernels.rms_norm_backward(grad, x, rstd, gain)
    scale = xr.grad.abs().amax(-1, keepdim=True)
    tol = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
    assert torch.all((dx.double() - xr.grad).abs() <= tol * scale)


def _geglu_torch(gate, up, grad):
    """torch's F.gelu(gate, approximate="tanh") * up and its autograd gradients, with every
    element in torch's vector loops (SLEEF's tanhf): padded to whole 32-lane vectors and at most
    16384 elements, which torch's GELU kernels run on one thread, so none falls in a scalar
    tail loop (glibc's tanhf, which saturates later and differs in the last bit)."""
    n = gate.numel()
    assert n + (-n % 32) <= 16384
    gate, up, grad = (F.pad(t.reshape(-1), (0, -n % 32)) for t in (gate, up, grad))
    gate, up = gate.requires_grad_(), up.requires_grad_()
    out = F.gelu(gate, approximate="tanh") * up
    out.backward(grad)
    return out.detach()[:n], gate.grad[:n], up.grad[:n]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geglu_matches_torch_forward_and_backward(dtype):
    g = torch.Generator().manual_seed(3)
    gate = torch.randn(2, 25, 323, generator=g) * 3  # |x| up to ~12; 16150 = 16 * 1009 + 6
    # x^3 overflows at 1e13; tanh saturates from |x| ~ 5.1 (SLEEF's cutoff: inner > 8.66)
    gate.view(-1)[:12] = torch.tensor([0, -0.0, 1e-8, -4.0, 5.1, -5.1, 8.7, -8.7, 10, -10, 1e13, -1e13])
    up, grad = torch.randn(gate.shape, generator=g), torch.randn(gate.shape, generator=g)
    gate, up, grad = gate.to(dtype), up.to(dtype), grad.to(dtype)
    got = (cpu_kernels.geglu(gate, up), *cpu_kernels.geglu_backward(grad, gate, up))
    for a, b in zip(got, _geglu_torch(gate, up, grad), strict=True):
        assert a.dtype == dtype and a.shape == gate.shape
        a = a.reshape(-1)
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            # torch's roundings of gelu(gate) and grad * up are reproduced: nearly all bits
            # agree, the rest by one bfloat16 step (from tanh's last float32 bit).
            assert (a == b).float().mean() >= 0.99
            assert _bf16_steps(a, b).max() <= 1


def test_new_kernels_decline_what_they_cannot_do():
    x, gain = torch.randn(4, 8), torch.ones(8)
    assert cpu_kernels.rms_norm(x.double(), gain, 1e-6) is None
    assert cpu_kernels.rms_norm(x, gain.bfloat16(), 1e-6) is None
    assert cpu_kernels.rms_norm(x, torch.ones(7), 1e-6) is None
    assert cpu_kernels.geglu(x, x.bfloat16()) is None
    assert cpu_kernels.geglu(x, x[:2]) is None
    assert cpu_kernels.geglu(x.double(), x.double()) is None
    assert cpu_kernels.geglu_backward(x, x, x.t()) is None


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_forward_is_torchs_to_the_bit(dtype):
    """The model's training path (C forward) must equal its eval path (F.rms_norm) bit for bit:
    rows shorter than a vector, tails, and sums long enough for torch's chunked levels."""
    for C in (1, 7, 8, 37, 640, 1152, 2560, 40_000):
        g = torch.Generator().manual_seed(C)
        x = (torch.randn(4, C, generator=g) * 3).to(dtype)
        gain = torch.rand(C, generator=g) + 0.5
        y, rstd = cpu_kernels.rms_norm(x, gain, 1e-6)
        want_y, want_rstd = torch.ops.aten._fused_rms_norm(x.float(), [C], gain, 1e-6)
        assert torch.equal(rstd, want_rstd), C
        assert torch.equal(y, want_y.to(dtype)), C
