"""The ctypes bindings derived from csrc/gemmakit_kernels.h agree with the compiled library."""

import ctypes
import shutil
import subprocess

import pytest

from gemmakit.kernels import bindings
from gemmakit.kernels import build as kernel_build
from gemmakit.kernels import cpu as cpu_kernels

needs_kernel = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler here")


def _exported_functions(path: str) -> set[str]:
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm here")
    out = subprocess.run(
        [nm, "-D", "--defined-only", path], check=True, capture_output=True, text=True
    ).stdout
    return {line.split()[-1] for line in out.splitlines() if line.split()[-2:-1] == ["T"]}


@needs_kernel
def test_every_exported_function_is_declared_and_bound():
    lib = cpu_kernels.library()
    declared = bindings.declarations().functions
    assert _exported_functions(lib._name) == set(declared)  # nothing exported undeclared, and back
    for name, (restype, argtypes) in declared.items():
        fn = getattr(lib, name)
        assert fn.argtypes == argtypes and fn.restype == restype, name
    assert declared["decode_batch"][0] is ctypes.c_int
    assert declared["rms_norm_forward_mt"][1][5] is ctypes.c_double


@needs_kernel
def test_struct_layouts_are_the_compilers(tmp_path):
    """A C program built from the same header prints sizeof and offsetof of every field."""
    structs = bindings.declarations().structs
    lines = ["#include <stddef.h>", "#include <stdio.h>", '#include "gemmakit_kernels.h"', "int main(void) {"]
    for name, struct in structs.items():
        lines.append(f'    printf("{name} %zu\\n", sizeof({name}));')
        for field, _ in struct._fields_:
            lines.append(f'    printf("{name}.{field} %zu\\n", offsetof({name}, {field}));')
    lines += ["    return 0;", "}"]
    (tmp_path / "layout.c").write_text("\n".join(lines) + "\n")
    (tmp_path / bindings.HEADER).write_bytes(kernel_build.sources()[bindings.HEADER])
    compiler = shutil.which("cc")
    if compiler is None:
        pytest.skip("no cc here")
    subprocess.run([compiler, "-o", str(tmp_path / "layout"), str(tmp_path / "layout.c")], check=True)
    printed = subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True, text=True).stdout
    compiler_says = dict(line.rsplit(" ", 1) for line in printed.splitlines())
    ours = {}
    for name, struct in structs.items():
        ours[name] = str(ctypes.sizeof(struct))
        for field, _ in struct._fields_:
            ours[f"{name}.{field}"] = str(getattr(struct, field).offset)
    assert ours == compiler_says
    assert set(structs) == {"Mat", "Layer", "Model", "Batch", "Packed4", "BpeVocab"}


def test_constants_come_from_the_header():
    from gemmakit.inference import c_decode as decode

    assert bindings.declarations().constants == {
        "W_F32": 0, "W_INT8": 1, "W_BF16": 2, "W_GGUF_BASE": 100, "W_PACKED4": 3
    }  # fmt: skip
    assert (decode.W_F32, decode.W_INT8, decode.W_BF16, decode.W_PACKED4) == (0, 1, 2, 3)


HEADER = """
/* a comment with a fake prototype: GEMMAKIT_API void nothing(int x); */
#include <stdint.h>
enum { A = 3, B, C = 0x10 };
typedef struct {
    int64_t n;
    const float *p, *q[2]; // trailing comment
} Inner;
typedef struct {
    Inner inner, pair[2];
    const Inner *next;
    uint32_t small;
    double d;
} Outer;
GEMMAKIT_API int step(const Outer *o, Inner *i, int64_t n, uint64_t seed, float s, void *data);
GEMMAKIT_API void none(void);
"""


def test_parser_reads_a_small_header():
    d = bindings.parse(HEADER)
    assert d.constants == {"A": 3, "B": 4, "C": 16}
    Inner, Outer = d.structs["Inner"], d.structs["Outer"]
    assert Inner._fields_ == [("n", ctypes.c_int64), ("p", ctypes.c_void_p), ("q", ctypes.c_void_p * 2)]
    assert [name for name, _ in Outer._fields_] == ["inner", "pair", "next", "small", "d"]
    assert dict(Outer._fields_)["pair"] == Inner * 2
    assert ctypes.sizeof(Outer) == 32 * 3 + 8 + 8 + 8 and Outer.d.offset == 3 * 32 + 16
    restype, argtypes = d.functions["step"]
    assert restype is ctypes.c_int
    assert argtypes == [
        ctypes.POINTER(Outer),
        ctypes.POINTER(Inner),
        ctypes.c_int64,
        ctypes.c_uint64,
        ctypes.c_float,
        ctypes.c_void_p,
    ]
    assert d.functions["none"] == (None, [])
    assert "nothing" not in d.functions  # comments are not declarations


def test_a_changed_declaration_is_picked_up():
    changed = bindings.parse(HEADER.replace("uint32_t small;", "uint32_t small, extra[3];"))
    Outer = changed.structs["Outer"]
    assert [name for name, _ in Outer._fields_][-3:] == ["small", "extra", "d"]
    assert Outer.d.offset == 3 * 32 + 8 + 16
    changed = bindings.parse(HEADER.replace("int64_t n, uint64_t seed", "int64_t n, double seed"))
    assert changed.functions["step"][1][3] is ctypes.c_double


@pytest.mark.parametrize(
    "text",
    [
        "typedef struct { long double x; } S;",  # a type the parser does not know
        "typedef struct { Unknown u; } S;",
        "GEMMAKIT_API void f(struct Named *p);",
        "GEMMAKIT_API void f(int x[4]);",
    ],
)
def test_parser_refuses_what_it_cannot_read(text):
    with pytest.raises(ValueError):
        bindings.parse(text)


def test_library_key_covers_every_source_and_header():
    files = kernel_build.sources()
    assert bindings.HEADER in files and "norm.c" in files and "common.h" in files
    key = kernel_build.library_key(files, "/usr/bin/cc", kernel_build.FLAGS)
    for name in files:
        edited = dict(files, **{name: files[name] + b"\n"})
        assert kernel_build.library_key(edited, "/usr/bin/cc", kernel_build.FLAGS) != key, name
    assert kernel_build.library_key(files, "/usr/bin/gcc", kernel_build.FLAGS) != key
    assert kernel_build.library_key(files, "/usr/bin/cc", kernel_build.FLAGS + ("-fopenmp",)) != key
