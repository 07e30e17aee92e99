"""What a native load of the bundled GGUF holds in memory: its block matrices as views of the
memory-mapped file (no copy), the tied embedding once, float32 only for the norms, and a
tokenizer that has not built the vocabulary's Python strings."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.test_tokenizer_cache import TEXT, tokenizer_state


def file_mappings(path) -> list[tuple[int, int]]:
    """The address ranges where this process has `path` memory-mapped (Linux)."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == str(path):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


@pytest.fixture(scope="module")
def native():
    from gemmakit.loading import load

    return load(device="cpu")  # dtype auto: the file's own block types


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_native_load_copies_no_matrix(native):
    from gemmakit.quant import GGUFLinear

    mapped = file_mappings(native.source.path.resolve())
    assert mapped, "the GGUF is not memory-mapped"
    linears = {id(m): m for m in native.model.modules() if isinstance(m, GGUFLinear)}
    assert len(linears) == 18 * 7 + 1  # seven projections a layer, the tied embedding / lm_head
    for m in linears.values():
        start = m.weight.data_ptr()
        end = start + m.weight.numel()
        assert any(lo <= start and end <= hi for lo, hi in mapped), "a block matrix was copied"
    # The tied embedding reads the lm_head's bytes: the 262k x 640 table is held once.
    assert native.model.model.embed_tokens.source is native.model.lm_head
    floats = [t for t in native.model.state_dict().values() if t.is_floating_point()]
    assert sum(t.nbytes for t in floats) < 2**20  # the norms, nothing else
    assert all(t.dtype == torch.float32 for t in floats)


def test_native_tokenizer_is_lazy_and_equals_the_folders(native, bundled):
    """The GGUF's tokenizer (cached SentencePiece model, vocabulary lists not built) tokenizes
    as the converted folder's tokenizer.model does."""
    from gemmakit.formats.gguf import GGUFFile
    from gemmakit.formats.tokenizer import Tokenizer
    from gemmakit.loading import READY, converted_folder, load_tokenizer

    # `bundled` wrote the converted folder if an earlier load had not; its tokenizer came from
    # the GGUF when it did write it, so read the folder's own.
    folder = converted_folder(bundled.source)
    assert (folder / READY).exists()
    folders = Tokenizer.from_folder(folder)
    again = load_tokenizer(native.source, GGUFFile(native.source.path))
    for tok in (native.tokenizer, again):  # the first load may have built it; the second reads it
        state = tokenizer_state(tok)
        assert state["ids"] == folders.encode(TEXT)
        assert state["decoded"] == folders.decode(state["ids"])
        assert state["stop_ids"] == folders.stop_ids
    assert again._pieces is None  # nothing above needed the 262k strings
    # The same pieces, the user-defined whitespace runs written with real spaces in the GGUF
    # (SentencePiece's tokenizer.model escapes them).
    assert [p.replace(" ", "\u2581") for p in again.pieces] == folders.pieces


def test_generating_from_the_bundled_gguf_imports_only_what_it_uses():
    """Each import stays resident for the whole run (peak RSS), so `gemmakit generate` on a GGUF
    loads none of the packages only other paths use: gguf-py (writing, legacy dequantization),
    safetensors (HF folders), Jinja (chat templates), the server's and the grammar's."""
    from tests.conftest import run_fresh_python

    code = (
        "import sys\n"
        "from gemmakit.cli import main\n"
        "assert main(['generate', 'Hi', '--max-new-tokens', '2', '--greedy']) == 0\n"
        "unused = ('gguf', 'safetensors', 'jinja2', 'yaml', 'transformers', 'fastapi', 'uvicorn', 'xgrammar')\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & set(unused))\n"
        "assert not loaded, loaded\n"
    )
    run_fresh_python(code, timeout=300)
