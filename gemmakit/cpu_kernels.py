"""Small C kernels for the CPU decode step, compiled on first use and cached.

Only where torch has nothing fast: the int8 matrix-vector product of the output projection,
the whole single-sequence decode step (driven by gemmakit/c_decode.py), LoRA's input
dropout with a mask rebuilt from a seed, the cross-entropy gradient of bfloat16 logits and
RMSNorm's backward, all in csrc/cpu_kernels.c. The library is built with the machine's C compiler (`$CC`, else `cc`)
and `-O3 -march=native` into the gemmakit cache, keyed by the source and the compiler, in
about a second; with no compiler, or on another OS, `library()` returns None and callers use
torch's kernels. `GEMMAKIT_NO_C_KERNELS=1` turns the kernels off.

The rows are split over Python threads (ctypes releases the GIL during the call), as many as
torch uses, so the kernel runs at memory speed without a second OpenMP runtime spinning
beside torch's.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import torch

# Below this many rows the thread hand-off costs more than torch's kernel takes.
MIN_ROWS = 16384


@functools.cache
def library() -> ctypes.CDLL | None:
    """csrc/cpu_kernels.c built into a shared library (once per source and compiler), or None."""
    if os.environ.get("GEMMAKIT_NO_C_KERNELS") or not sys.platform.startswith("linux"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    source = resources.files("gemmakit").joinpath("csrc/cpu_kernels.c").read_bytes()
    flags = ["-O3", "-march=native", "-shared", "-fPIC", "-pthread"]
    key = hashlib.sha1(source + compiler.encode() + " ".join(flags).encode()).hexdigest()[:16]
    from gemmakit.loading import cache_dir

    target = cache_dir() / "kernels" / f"cpu_kernels-{key}.so"
    if not target.exists():
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        src = tmp.with_suffix(".c")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            src.write_bytes(source)
            subprocess.run(
                [compiler, *flags, "-o", str(tmp), str(src)], check=True, capture_output=True, timeout=120
            )
            os.replace(tmp, target)
        except (OSError, subprocess.SubprocessError):
            return None
        finally:
            for leftover in (src, tmp):
                leftover.unlink(missing_ok=True)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError:
        return None
    lib.gemv_int8.restype = None
    lib.gemv_int8.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    lib.softmax_xent_bf16.restype = None
    lib.softmax_xent_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    lib.rms_norm_backward.restype = None
    lib.rms_norm_backward.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4
    lib.dropout.restype = None
    lib.dropout.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [
        ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, ctypes.c_int64,
    ]  # fmt: skip
    return lib


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="gemmakit-gemv")


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
    args = (x.data_ptr(), weight.data_ptr(), scale.data_ptr(), out.data_ptr())
    _split(N, lambda lo, hi: lib.gemv_int8(*args, lo, hi, K))
    return out


def _split(n: int, run):
    """run(lo, hi) over [0, n), split between torch's number of threads."""
    threads = max(1, torch.get_num_threads())
    if threads == 1:
        run(0, n)
        return
    bounds = [n * i // threads for i in range(threads + 1)]
    jobs = [_pool(threads).submit(run, lo, hi) for lo, hi in zip(bounds, bounds[1:])]
    for job in jobs:
        job.result()


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
    args = (x.data_ptr(), out.data_ptr())
    tail = (seed & (2**64 - 1), threshold, 1.0 / (1.0 - p), int(x.dtype == torch.bfloat16))
    # Below ~64k elements a thread hand-off costs more than the loop.
    if x.numel() < 65536:
        lib.dropout(*args, 0, x.numel(), *tail)
    else:
        _split(x.numel(), lambda lo, hi: lib.dropout(*args, lo, hi, *tail))
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
    args = (logits.data_ptr(), targets.data_ptr(), lse.data_ptr(), vocab)
    _split(n, lambda lo, hi: lib.softmax_xent_bf16(*args, lo, hi))
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
    args = (grad.data_ptr(), x.data_ptr(), rstd.data_ptr(), gain.data_ptr(), out.data_ptr(), C)
    flag = int(x.dtype == torch.bfloat16)
    _split(rows, lambda lo, hi: lib.rms_norm_backward(*args, lo, hi, flag))
    return out
