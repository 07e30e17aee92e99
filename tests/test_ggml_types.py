"""gemmakit's table of ggml types against gguf-py's, and the GGUF reader without gguf-py."""

import gguf
import pytest

from gemmakit.formats.ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType
from tests.conftest import run_fresh_python

# gguf-py 0.19 gives Q8_1 40 bytes; ggml-common.h's block_q8_1 is two ggml_half and 32 int8
# (36), as llama.cpp's own gguf-py says. Q8_1 only ever holds activations, never a stored weight.
GGUF_PY_DIFFERS = {"Q8_1"}


@pytest.mark.parametrize("theirs", list(gguf.GGMLQuantizationType), ids=lambda t: t.name)
def test_each_type_has_gguf_pys_id_and_block_size(theirs):
    ours = GGMLQuantizationType[theirs.name]
    assert int(ours) == int(theirs)
    if theirs.name not in GGUF_PY_DIFFERS:
        assert GGML_QUANT_SIZES[ours] == gguf.GGML_QUANT_SIZES[theirs]


def test_no_type_of_ours_is_missing_from_gguf_py():
    assert {t.name for t in GGMLQuantizationType} == {t.name for t in gguf.GGMLQuantizationType}
    assert GGML_QUANT_SIZES.keys() == set(GGMLQuantizationType)
    assert GGML_QUANT_SIZES[GGMLQuantizationType.Q8_1] == (32, 36)


def test_our_types_index_gguf_pys_tables():
    """A type read by formats/gguf.py works where gguf-py expects its own member."""
    for t in GGMLQuantizationType:
        assert t == gguf.GGMLQuantizationType(int(t)) and hash(t) == hash(gguf.GGMLQuantizationType(int(t)))
    assert gguf.GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K] == (256, 144)
    assert gguf.GGMLQuantizationType(GGMLQuantizationType.Q6_K) is gguf.GGMLQuantizationType.Q6_K


def test_reading_a_gguf_header_imports_no_gguf_py():
    from gemmakit.loading import default_gguf

    bundled_gguf = default_gguf()
    code = (
        "import sys\n"
        "from gemmakit.formats.gguf import GGUFFile, config_from_gguf\n"
        f"g = GGUFFile({str(bundled_gguf)!r})\n"
        "config_from_gguf(g)\n"
        "assert g.tensors['token_embd.weight'].ggml_type.name == 'Q8_0'\n"
        "left = [m for m in sys.modules if m == 'gguf' or m.startswith('gguf.')]\n"
        "assert not left, left\n"
        "import gguf\n"  # and the package, imported after, is whole
        "assert gguf.constants.GGMLQuantizationType and gguf.GGUFReader and gguf.GGUFWriter\n"
    )
    run_fresh_python(code)
