"""The C kernels' Python entry points: torch tensors in, torch tensors out, or None.

Only where torch has nothing fast on the CPU: the int8 matrix-vector product of the output
projection, and for training LoRA's input dropout with a mask rebuilt from a seed, the
cross-entropy gradient of bfloat16 logits, RMSNorm's forward and backward, GeGLU's forward
and backward, and NF4 dequantization, each one pass where torch takes several (with
bfloat16 tensors between them). The training kernels reproduce torch's results: dropout's
mask is a function of seed and index only, RMSNorm's and GeGLU's roundings are torch's (see
each function). Each function returns None when its kernel does not apply (no compiler,
another OS, a device, dtype or layout it does not take) and the caller runs torch's ops;
`GEMMAKIT_NO_C_KERNELS=1` turns the kernels off. The C sources are csrc/ (one unit per op
family, declared in csrc/gemmakit_kernels.h), built by kernels/build.py; the decode step has
its own driver, inference/c_decode.py.

Large calls are split over torch's own OpenMP threads: the library is built with -fopenmp
and binds to the libgomp torch has loaded (csrc/split.c); small ones run on the calling
thread (see SPLIT_DROPOUT). Where the compiler has no OpenMP the library is built without it
and runs each call on the calling thread.
"""

from __future__ import annotations

import ctypes
import math

import torch

from gemmakit.kernels import build, candidates

# Below this many rows gemv_int8 leaves the product to torch: it is for the 262k-row output projection.
MIN_ROWS = 16384


# The kernels' shared library, or None: one cache with the torch-free callers (build.kept_library)
library = build.kept_library


def gemv_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """x (K,) float32 times int8 `weight` (N, K) with float32 row scales (N,): (N,) float32.

    None when the kernel does not apply (no compiler, not CPU, wrong dtypes or layout).
    """
    N, K = weight.shape
    if (
        N < MIN_ROWS
        or weight.device.type != "cpu"
        or weight.dtype != torch.int8
        or not weight.is_contiguous()
        or x.dtype != torch.float32
        or scale.dtype != torch.float32
    ):
        return None
    lib = library()
    if lib is None:
        return None
    x, scale = x.contiguous(), scale.contiguous()
    out = torch.empty(N, dtype=torch.float32)
    lib.gemv_int8_mt(x.data_ptr(), weight.data_ptr(), scale.data_ptr(), out.data_ptr(), N, K, _threads(N, 0))
    return out


# Rows per task when a GGUF tensor is quantized over several threads: small enough to balance
# two to sixteen threads over a 640-row tensor, large enough that a task outlasts its hand-off.
GGUF_QUANTIZE_ROWS_PER_TASK = 32


def gguf_quantize_rows(
    x: torch.Tensor, ggml_type: int, imatrix: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Rows of x (n, k) float32 as the blocks of ggml type `ggml_type` (gguf_quantize.c): (n,
    row bytes) uint8, bytes as llama.cpp's quantizer writes them; `imatrix` (k,) float32 column
    weights or None. None when the kernel does not apply (no compiler, not CPU, a type it does
    not write or k not a whole number of its blocks). Rows are split over torch's threads
    (ctypes releases the GIL for the call)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2:
        return None
    lib = library()
    if lib is None:
        return None
    x = x.contiguous()
    n, k = x.shape
    if imatrix is not None:
        imatrix = imatrix.to(torch.float32).contiguous()
        if imatrix.shape != (k,):
            return None
    im = imatrix.data_ptr() if imatrix is not None else None
    row_bytes = lib.gguf_quantize_rows(ggml_type, x.data_ptr(), None, k, 0, 0, im)
    if row_bytes < 0:
        return None
    out = torch.empty((n, row_bytes), dtype=torch.uint8)
    starts = range(0, n, GGUF_QUANTIZE_ROWS_PER_TASK)

    def run(lo: int) -> None:
        hi = min(n, lo + GGUF_QUANTIZE_ROWS_PER_TASK)
        lib.gguf_quantize_rows(ggml_type, x.data_ptr(), out.data_ptr(), k, lo, hi, im)

    threads = _threads(n, 2 * GGUF_QUANTIZE_ROWS_PER_TASK)
    if threads == 1:
        for lo in starts:
            run(lo)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, starts))
    return out


# Element counts from which a kernel is split over torch's threads (below, one thread runs
# it): where handing the work over costs more than the second thread saves. Measured on a
# 2-core VM right after a torch matmul (its OpenMP workers spinning), one thread against
# two, bfloat16, ms: dropout 0.126 / 0.068 at 128k elements; RMSNorm backward 0.151 / 0.129
# at 512 x 256, 0.067 / 0.099 at 64 x 256; GeGLU backward 0.141 / 0.110 at 32k.
SPLIT_DROPOUT = 1 << 17
SPLIT_RMS_NORM = 1 << 17
SPLIT_GEGLU = 1 << 15
SPLIT_NF4 = 1 << 17


def handles(t: torch.Tensor) -> bool:
    """Whether the training kernels run on t: a float32 or bfloat16 CPU tensor, with the
    library built."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) and library() is not None


def _threads(n: int, min_split: int) -> int:
    """Threads for a call over n elements: torch's number from min_split on, else 1."""
    return 1 if n < min_split else max(1, torch.get_num_threads())


def dropout(x: torch.Tensor, p: float, seed: int, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """x with each element zeroed with probability p, the rest scaled by 1 / (1 - p).

    The mask depends on `seed` and the element's index only, so calling again with the same
    seed on a tensor of the same size applies the same mask (the backward of LoRA's dropout
    does). `out` may be x itself. None when the kernel does not apply (no compiler, not a
    contiguous float32/bfloat16 CPU tensor).
    """
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or not x.is_contiguous():
        return None
    lib = library()
    if lib is None:
        return None
    out = torch.empty_like(x) if out is None else out
    threshold = min(round(p * 2**32), 2**32 - 1)
    n, bf16 = x.numel(), int(x.dtype == torch.bfloat16)
    scale = 1.0 / (1.0 - p)
    lib.dropout_mt(
        x.data_ptr(),
        out.data_ptr(),
        n,
        seed & (2**64 - 1),
        threshold,
        scale,
        bf16,
        _threads(n, SPLIT_DROPOUT),
    )
    return out


def softmax_xent_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """In place: bfloat16 logits (N, V) become softmax - onehot(targets); returns the float32
    log-sum-exp of each row (N,) (so the loss is lse - logit[target], read before the call).

    None, and `logits` untouched, when the kernel does not apply.
    """
    if (
        logits.device.type != "cpu"
        or logits.dtype != torch.bfloat16
        or logits.dim() != 2
        or not logits.is_contiguous()
    ):
        return None
    lib = library()
    if lib is None:
        return None
    n, vocab = logits.shape
    targets = targets.to(torch.int64).contiguous()
    lse = torch.empty(n, dtype=torch.float32)
    lib.softmax_xent_bf16_mt(logits.data_ptr(), targets.data_ptr(), lse.data_ptr(), vocab, n, _threads(n, 0))
    return lse


def rms_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, gain: torch.Tensor
) -> torch.Tensor | None:
    """dL/dx of y = x * rstd * gain (RMSNorm over the last dim), in x's dtype, or None.

    grad and x: (..., C) float32 or bfloat16 (the same); rstd: one float32 per row; gain:
    float32 (C,).
    """
    if (
        x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.bfloat16)
        or grad.dtype != x.dtype
        or rstd.dtype != torch.float32
        or gain.dtype != torch.float32
    ):
        return None
    lib = library()
    if lib is None:
        return None
    C = x.shape[-1]
    grad, x, rstd, gain = grad.contiguous(), x.contiguous(), rstd.contiguous(), gain.contiguous()
    out = torch.empty_like(x)
    rows = x.numel() // C
    args = (grad.data_ptr(), x.data_ptr(), rstd.data_ptr(), gain.data_ptr(), out.data_ptr(), C, rows)
    lib.rms_norm_backward_mt(*args, int(x.dtype == torch.bfloat16), _threads(x.numel(), SPLIT_RMS_NORM))
    return out


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """RMSNorm over the last dim: (y, rstd), or None when the kernel does not apply.

    Args:
        x: (..., C) float32 or bfloat16 on the CPU.
        gain: float32 (C,), the (1 + w) of Gemma's norms.
        eps: added to the mean square.

    Returns:
        y in x's dtype and rstd = 1 / sqrt(mean(x^2) + eps), float32 of shape (..., 1):
        `aten._fused_rms_norm(x.float(), [C], gain, eps)` with y cast to x's dtype, in one
        pass. torch's bits wherever the CPU has AVX2 (the squares are added in the order of
        torch's CPU sum over 8-lane vectors, its AVX2 and AVX-512 builds alike); without AVX2
        rstd may differ from torch's in the last bit.
    """
    if (
        x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.bfloat16)
        or x.dim() == 0
        or x.shape[-1] == 0
        or gain.dtype != torch.float32
        or gain.shape != x.shape[-1:]
    ):
        return None
    lib = library()
    if lib is None:
        return None
    C = x.shape[-1]
    x, gain = x.contiguous(), gain.contiguous()
    y = torch.empty_like(x)
    rstd = torch.empty(*x.shape[:-1], 1, dtype=torch.float32)
    args = (x.data_ptr(), gain.data_ptr(), y.data_ptr(), rstd.data_ptr(), C, float(eps), x.numel() // C)
    lib.rms_norm_forward_mt(*args, int(x.dtype == torch.bfloat16), _threads(x.numel(), SPLIT_RMS_NORM))
    return y, rstd


def _geglu_applies(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    return (
        first.device.type == "cpu"
        and first.dtype in (torch.float32, torch.bfloat16)
        and all(
            t.device == first.device and t.dtype == first.dtype and t.shape == first.shape for t in tensors
        )
    )


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """F.gelu(gate, approximate="tanh") * up in one pass, or None when the kernel does not apply.

    gate and up: the same shape, both float32 or both bfloat16, on the CPU. The result is
    torch's (for bfloat16 with its rounding of gelu(gate) to bfloat16 before the product) up
    to rare last-bit differences of tanh.
    """
    if not _geglu_applies(gate, up):
        return None
    lib = library()
    if lib is None:
        return None
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n, bf16 = gate.numel(), int(gate.dtype == torch.bfloat16)
    lib.geglu_forward_mt(gate.data_ptr(), up.data_ptr(), out.data_ptr(), n, bf16, _threads(n, SPLIT_GEGLU))
    return out


def geglu_backward(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The gradients (grad_gate, grad_up) of F.gelu(gate, approximate="tanh") * up, as torch's
    autograd computes them (gelu_backward of grad * up; grad * gelu(gate)), in one pass.

    All three the same shape and dtype (float32 or bfloat16), on the CPU; None otherwise.
    """
    if not _geglu_applies(grad, gate, up):
        return None
    lib = library()
    if lib is None:
        return None
    grad, gate, up = grad.contiguous(), gate.contiguous(), up.contiguous()
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    args = (grad.data_ptr(), gate.data_ptr(), up.data_ptr(), grad_gate.data_ptr(), grad_up.data_ptr())
    n, bf16 = gate.numel(), int(gate.dtype == torch.bfloat16)
    lib.geglu_backward_mt(*args, n, bf16, _threads(n, SPLIT_GEGLU))
    return grad_gate, grad_up


def nf4_dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor | None:
    """The float weight of `shape` from NF4: code[nibble] * absmax[block of 64], in float32,
    rounded once to `dtype` (float32 or bfloat16); bitsandbytes' dequantize_4bit's bits.

    packed: uint8, two values a byte (the first in the high nibble); absmax: float32, one per
    64 values; code: the 16 float32 levels. None when the kernel does not apply.
    """
    n = math.prod(shape)
    if (
        packed.device.type != "cpu"
        or packed.dtype != torch.uint8
        or packed.numel() * 2 < n
        or absmax.dtype != torch.float32
        or absmax.numel() * 64 < n
        or code.dtype != torch.float32
        or code.numel() != 16
        or dtype not in (torch.float32, torch.bfloat16)
    ):
        return None
    lib = library()
    if lib is None:
        return None
    packed, absmax, code = packed.contiguous(), absmax.contiguous(), code.contiguous()
    out = torch.empty(shape, dtype=dtype)
    args = (packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), out.data_ptr(), n)
    lib.nf4_dequantize_mt(*args, int(dtype == torch.bfloat16), _threads(n, SPLIT_NF4))
    return out


# --- GGUF block types (csrc/gguf_blocks.c, gguf_act.c, gguf_dot.c) -------------------------
# Rows of x up to which the float32 product (gguf_matmul(..., rounded=False)) runs the C
# multi-row kernel (each block read once for all rows); above, the weight is dequantized in
# tiles and torch's float32 matmul runs. Measured on one thread of a loaded 2-core machine
# (best of 7), the bundled model's layer 0, ms, C / dequantize + matmul: Q5_0 2048 x 640 at 1,
# 8, 16 rows 0.14 / 0.42, 0.74 / 0.70, 1.14 / 0.88; Q6_K 640 x 2048 0.53 / 0.56, 0.87 / 0.94,
# 1.33 / 1.14; Q4_K 640 x 1024 0.13 / 0.15, 0.30 / 0.34, 0.50 / 0.44.
GGUF_MATMUL_MAX_ROWS = 8

# ggml type ids of the activation blocks gguf_quantize_activations makes
GGUF_ACTIVATION_TYPES = {8: 32, 9: 32, 15: 256}  # Q8_0, Q8_1, Q8_K: values per block


def _gguf_applies(raw: torch.Tensor, ggml_type: int, k: int):
    """The library when its GGUF kernels take `raw` (uint8 (n, row bytes), CPU, contiguous)."""
    if raw.device.type != "cpu" or raw.dtype != torch.uint8 or raw.dim() != 2 or not raw.is_contiguous():
        return None
    lib = library()
    if lib is None or lib.gguf_row_bytes(ggml_type, k) != raw.shape[1]:
        return None
    return lib


def gguf_row_bytes(ggml_type: int, k: int) -> int | None:
    """Bytes of one row of k values of a ggml block type, or None when the C kernels do not
    run the type (or k is not a whole number of its blocks, or there is no library)."""
    lib = library()
    if lib is None:
        return None
    size = lib.gguf_row_bytes(ggml_type, k)
    return None if size < 0 else size


def gguf_dequantize(raw: torch.Tensor, ggml_type: int, k: int) -> torch.Tensor | None:
    """The (n, k) float32 values of n rows of GGUF blocks, bit for bit the `gguf` package's
    `quants.dequantize`; None when the kernel does not apply."""
    lib = _gguf_applies(raw, ggml_type, k)
    if lib is None:
        return None
    n = raw.shape[0]
    out = torch.empty((n, k), dtype=torch.float32)
    lib.gguf_dequantize_rows_mt(ggml_type, raw.data_ptr(), n, k, out.data_ptr(), _threads(n * k, SPLIT_NF4))
    return out


def gguf_rows(raw: torch.Tensor, ggml_type: int, k: int, ids: torch.Tensor) -> torch.Tensor | None:
    """Rows `ids` (any shape) of a GGUF matrix as float32 (*ids.shape, k): an embedding lookup."""
    lib = _gguf_applies(raw, ggml_type, k)
    if lib is None or ids.device.type != "cpu":
        return None
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= raw.shape[0]):
        raise IndexError(f"token id out of range for an embedding of {raw.shape[0]} rows")
    out = torch.empty((flat.numel(), k), dtype=torch.float32)
    count = flat.numel()
    lib.gguf_gather_rows_mt(ggml_type, raw.data_ptr(), k, flat.data_ptr(), count, out.data_ptr(),
                            _threads(count * k, SPLIT_NF4))  # fmt: skip
    return out.view(*ids.shape, k)


def gguf_matmul(
    x: torch.Tensor,
    raw: torch.Tensor,
    ggml_type: int,
    k: int,
    rounded: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """x (M, k) float32 times the transposed (n, k) GGUF matrix: (M, n) float32, each block
    read once for all M rows. `rounded`: x rounded to llama.cpp's 8-bit activation blocks once
    for the call and integer dots (llama.cpp's product; a row's result does not depend on M);
    else the blocks dequantized in registers or L1 and multiplied with x in float32. `out`: a
    contiguous float32 (M, n) CPU tensor written instead of a new one (benchmarks reuse it, so
    that a fresh tensor's page faults are not timed). None where it does not apply."""
    lib = _gguf_applies(raw, ggml_type, k)
    if lib is None or x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k or x.device.type != "cpu":
        return None
    x = x.contiguous()
    rows, n = x.shape[0], raw.shape[0]
    if out is None:
        out = torch.empty((rows, n), dtype=torch.float32)
    elif (
        out.shape != (rows, n)
        or out.dtype != torch.float32
        or not out.is_contiguous()
        or out.device.type != "cpu"
    ):
        return None
    product = lib.gguf_matmul_q8_mt if rounded else lib.gguf_matmul_f32_mt
    product(ggml_type, raw.data_ptr(), n, k, x.data_ptr(), rows, out.data_ptr(), _threads(n, 0))
    return out


def gguf_quantize_activations(x: torch.Tensor, act_type: int) -> dict[str, torch.Tensor] | None:
    """x (M, k) float32 rounded to 8-bit blocks of ggml type `act_type` (Q8_0 8, Q8_1 9, Q8_K
    15) as llama.cpp does on x86: {"q": int8 (M, k), "d": float32 (M, blocks)} plus "s" (Q8_1,
    per 32) or "bsums" (Q8_K, int16 per 16). None where it does not apply."""
    lib = library()
    block = GGUF_ACTIVATION_TYPES.get(act_type)
    if lib is None or block is None or x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] % block:
        return None
    x = x.contiguous()
    rows, k = x.shape
    out = {"q": torch.empty((rows, k), dtype=torch.int8), "d": torch.empty((rows, k // block))}
    if act_type == 9:
        out["s"] = torch.empty((rows, k // 32))
    if act_type == 15:
        out["bsums"] = torch.empty((rows, k // 16), dtype=torch.int16)
    s, bsums = out.get("s"), out.get("bsums")
    lib.gguf_quantize_activations(
        act_type, x.data_ptr(), rows, k, out["q"].data_ptr(), out["d"].data_ptr(),
        None if s is None else s.data_ptr(), None if bsums is None else bsums.data_ptr(),
    )  # fmt: skip
    return out


# --- sampling (csrc/sample.c) ----------------------------------------------------------------


def sample_candidates(
    logits: torch.Tensor, temperature: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Each row's `count` largest of logits (R, V) float32 divided by temperature (R,): values
    (R, count) float32 and ids (R, count) int64, by logit descending with ties to the lower id,
    and each row's log-sum-exp of logits / temperature (R,). A row's result does not depend on
    the other rows. None when the kernel does not apply."""
    if (
        logits.device.type != "cpu"
        or logits.dtype != torch.float32
        or logits.dim() != 2
        or not logits.is_contiguous()
        or not 1 <= count <= logits.shape[1] < 2**31
    ):
        return None
    lib = library()
    if lib is None:
        return None
    temperature = temperature.to(torch.float32).contiguous()
    # One thread (the default): 16 rows take 3.6 ms on one (measured), too little to be worth a
    # parallel region beside the C decode step's own worker threads.
    found = candidates.sample_candidates(lib, logits.detach().numpy(), temperature.numpy(), count)
    return tuple(torch.from_numpy(a) for a in found)


def packed4_struct(tensors: dict, group_size: int):
    """The Packed4 struct (csrc/gemmakit_kernels.h) over `GPTQLinear.c_tensors()`; the caller
    keeps the tensors alive as long as the struct."""
    from gemmakit.kernels.bindings import declarations

    perm = tensors["perm"]
    return declarations().structs["Packed4"](
        q=tensors["q"].data_ptr(),
        scale=tensors["scale"].data_ptr(),
        min=tensors["min"].data_ptr(),
        perm=None if perm is None else perm.data_ptr(),
        group_size=group_size,
    )


def packed4_supported(k: int, group_size: int) -> bool:
    """Whether csrc/packed4.c takes a k-wide GPTQ/AWQ matrix with this group size."""
    lib = library()
    return lib is not None and bool(lib.packed4_supported(k, group_size))


def packed4_matmul(x: torch.Tensor, tensors: dict, n: int, group_size: int) -> torch.Tensor | None:
    """x (M, k) float32 times the transposed (n, k) GPTQ/AWQ matrix of `GPTQLinear.c_tensors()`:
    (M, n) float32, each output the float32 dot of its row with the exactly dequantized weight
    row. None where the kernel does not apply."""
    k = tensors["q"].shape[1] * 2
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k or x.device.type != "cpu":
        return None
    if not packed4_supported(k, group_size):
        return None
    x = x.contiguous()
    out = torch.empty((x.shape[0], n), dtype=torch.float32)
    library().packed4_matmul_rows(ctypes.byref(packed4_struct(tensors, group_size)), n, k, x.data_ptr(),
                                  x.shape[0], out.data_ptr(), 0, n)  # fmt: skip
    return out


def packed4_dequantize(tensors: dict, n: int, group_size: int) -> torch.Tensor | None:
    """The (n, k) float32 weight of `GPTQLinear.c_tensors()`, as packed4.c dequantizes it."""
    k = tensors["q"].shape[1] * 2
    if not packed4_supported(k, group_size):
        return None
    out = torch.empty((n, k), dtype=torch.float32)
    library().packed4_dequantize_rows(
        ctypes.byref(packed4_struct(tensors, group_size)), k, out.data_ptr(), 0, n
    )
    return out
