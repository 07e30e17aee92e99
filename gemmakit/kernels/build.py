"""Builds the C kernels (csrc/*.c) into one shared library, cached, and loads it with its bindings.

The machine's C compiler (`$CC`, else `cc`) compiles every unit with FLAGS in one call into
the kernel cache (`gemmakit.paths.kernel_cache_dir()`: the gemmakit cache's `kernels/`), keyed by a hash of every source
and header, the compiler's path and the flags, so an edited source or a changed flag builds a
new library and an unchanged one is loaded as it is. Without a compiler, when compiling fails,
or when the library cannot be loaded, `compile_library` returns None and callers keep torch's
kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

from gemmakit.files import atomic_write
from gemmakit.kernels import bindings
from gemmakit.paths import kernel_cache_dir

# The flags the library is built with (`library()` in kernels/cpu.py adds -fopenmp where the
# compiler has it); tests/test_cpu_kernels.py also builds it without AVX-512
# (`compile_library(FLAGS + ("-mno-avx512f",))`) to check the scalar loops. Only the
# GEMMAKIT_API functions of csrc/gemmakit_kernels.h are exported (-fvisibility=hidden).
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-pthread", "-fvisibility=hidden")

# A cold build of every unit, with room for a slow machine.
COMPILE_TIMEOUT_S = 120


def sources() -> dict[str, bytes]:
    """Every C unit and header of csrc/, by file name, in name order."""
    folder = resources.files("gemmakit.kernels").joinpath("csrc")
    files = (f for f in folder.iterdir() if f.name.endswith((".c", ".h")))
    return {f.name: f.read_bytes() for f in sorted(files, key=lambda f: f.name)}


def library_key(files: dict[str, bytes], compiler: str, flags: tuple[str, ...]) -> str:
    """The cache key of a build: every file's name and bytes, the compiler and the flags."""
    digest = hashlib.sha1()
    for name, data in files.items():
        digest.update(name.encode() + b"\0" + hashlib.sha1(data).digest())
    digest.update(compiler.encode() + b"\0" + " ".join(flags).encode())
    return digest.hexdigest()[:16]


def _compile(files: dict[str, bytes], compiler: str, flags: tuple[str, ...], target: Path) -> None:
    """Compiles `files` into `target` (raises OSError or SubprocessError on failure)."""
    with tempfile.TemporaryDirectory(prefix="gemmakit-kernels-") as folder:
        for name, data in files.items():
            (Path(folder) / name).write_bytes(data)
        units = [str(Path(folder) / name) for name in files if name.endswith(".c")]
        command = [compiler, *flags, "-o", str(target), *units]
        subprocess.run(command, check=True, capture_output=True, timeout=COMPILE_TIMEOUT_S)


def compile_library(flags: tuple[str, ...]) -> ctypes.CDLL | None:
    """csrc/ built with `flags` (cached by sources, compiler and flags) and loaded with every
    exported function's argument types (kernels/bindings.py), or None without a compiler or
    when the build or the load fails."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    files = sources()
    target = kernel_cache_dir() / f"gemmakit_kernels-{library_key(files, compiler, flags)}.so"
    if not target.exists():
        try:
            atomic_write(target, lambda tmp: _compile(files, compiler, flags, tmp))
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        return bindings.bind(ctypes.CDLL(str(target)))
    except (OSError, AttributeError):
        return None


def library() -> ctypes.CDLL | None:
    """The kernels' shared library (built once per source, compiler and flags), or None:
    without a compiler, off Linux, or with `GEMMAKIT_NO_C_KERNELS` set. Not kept: callers use
    `kept_library`.

    With OpenMP where the compiler has it (the library then binds to the libgomp torch has
    loaded, or the system's when torch is not imported), else without. Torch-free:
    `kernels/cpu.py` and the torch-free generation path load the same library."""
    if os.environ.get("GEMMAKIT_NO_C_KERNELS") or not sys.platform.startswith("linux"):
        return None
    return compile_library(FLAGS + ("-fopenmp",)) or compile_library(FLAGS)


@functools.cache
def kept_library() -> ctypes.CDLL | None:
    """`library()` once per process, for every caller: `kernels/cpu.py` (as its `library`), the
    tokenizer (`kernels/bpe.py`) and the torch-free path. Tests that change the environment
    clear its cache (`cpu.library.cache_clear()`)."""
    return library()
