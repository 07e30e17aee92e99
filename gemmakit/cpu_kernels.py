"""Small C kernels for the CPU decode step, compiled on first use and cached.

Only where torch has nothing fast: the int8 matrix-vector product of the output projection
and the whole single-sequence decode step (driven by gemmakit/c_decode.py), both in
csrc/cpu_kernels.c. The library is built with the machine's C compiler (`$CC`, else `cc`)
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
    threads = max(1, torch.get_num_threads())
    bounds = [N * i // threads for i in range(threads + 1)]
    args = (x.data_ptr(), weight.data_ptr(), scale.data_ptr(), out.data_ptr())
    if threads == 1:
        lib.gemv_int8(*args, 0, N, K)
        return out
    jobs = [_pool(threads).submit(lib.gemv_int8, *args, lo, hi, K) for lo, hi in zip(bounds, bounds[1:])]
    for job in jobs:
        job.result()
    return out
