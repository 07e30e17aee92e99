"""csrc/bpe.c under AddressSanitizer and UndefinedBehaviorSanitizer: built alone with them, run
in a child process over the bundled vocabulary and made-up ones (texts, any ids, damaged
strings), it reads and writes nothing outside its buffers and gives the Python backend's ids
and text (slow: a sanitized build and a second interpreter)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gemmakit.kernels import build

pytestmark = pytest.mark.slow

CHILD = """
import ctypes, random, sys
import numpy as np
from gemmakit.formats import sentencepiece_bpe as sb
from gemmakit.formats.gguf import GGUFFile
from gemmakit.kernels import bindings, bpe
from gemmakit.model_source import resolve
from tests.test_sentencepiece_bpe import TEXTS, _made_up_texts, _made_up_vocabulary, _random_texts

lib = ctypes.CDLL(sys.argv[1])
for name, (restype, argtypes) in bindings.declarations().functions.items():
    if name.startswith("bpe_"):
        getattr(lib, name).restype, getattr(lib, name).argtypes = restype, argtypes
bpe.library = lambda: lib

def check(metadata, texts):
    native, python = sb.build(metadata), sb.build(metadata, native=False)
    assert isinstance(native, sb.NativeSentencePieceBPE)
    for text in texts:
        ids = native.encode_as_ids(text)
        assert ids == python.encode_as_ids(text), text
        assert native._native.decode(ids) == python.decode_ids(ids), text
    rng, size = random.Random(0), native.GetPieceSize()
    for _ in range(300):
        ids = [rng.randrange(size) for _ in range(rng.randrange(0, 300))]
        assert native._native.decode(ids) == python.decode_ids(ids), ids

for byte_fallback in (True, False):
    check(_made_up_vocabulary(0, byte_fallback, joined="a"), _made_up_texts(1))
check(_made_up_vocabulary(2, True, duplicates=True), _made_up_texts(3))
check(GGUFFile(resolve(None).path).metadata, TEXTS + _random_texts(100))
header = _made_up_vocabulary(0, True)
_, count, data = header.array_bytes("tokenizer.ggml.tokens")
for cut in (1, 9, len(data) - 1):  # strings that end inside a piece: refused, nothing read past them
    try:
        bpe.Vocabulary(lib, data[:cut], np.zeros(count, np.float32), np.ones(count, np.int32))
        raise AssertionError(f"strings cut at {cut} accepted")
    except ValueError:
        pass
print("clean")
"""


def _runtime(compiler: str, name: str) -> str | None:
    path = subprocess.run(
        [compiler, f"-print-file-name={name}"], capture_output=True, text=True
    ).stdout.strip()
    return path if os.path.isabs(path) and Path(path).exists() else None


def test_bpe_c_is_clean_under_the_sanitizers(tmp_path):
    compiler = shutil.which(os.environ.get("CC", "cc"))
    runtimes = [compiler and _runtime(compiler, n) for n in ("libasan.so", "libubsan.so")]
    if compiler is None or not all(runtimes):
        pytest.skip("no compiler with AddressSanitizer and UndefinedBehaviorSanitizer here")
    folder = tmp_path / "csrc"
    folder.mkdir()
    for name, data in build.sources().items():
        (folder / name).write_bytes(data)
    library = tmp_path / "bpe_sanitized.so"
    subprocess.run([compiler, "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                    "-fno-omit-frame-pointer", "-shared", "-fPIC", "-o", str(library), str(folder / "bpe.c")],
                   check=True)  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "LD_PRELOAD": ":".join(runtimes), "ASAN_OPTIONS": "detect_leaks=0",
           "GEMMAKIT_NO_CACHE": "1", "PYTHONPATH": str(root)}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", CHILD, str(library)], capture_output=True, text=True, env=env,
                         cwd=root)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "clean", out.stderr[-3000:]
