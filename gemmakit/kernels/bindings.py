"""The ctypes side of the C kernels, derived from their one declaration, csrc/gemmakit_kernels.h.

The header declares every exported function (`GEMMAKIT_API` prototypes), the decode step's
structs (`typedef struct { ... } Name;`) and its constants (`enum { NAME = value, ... };`).
`parse` reads those three forms into ctypes argument types, `ctypes.Structure` classes and
integers, so a changed declaration reaches Python without being retyped here. The parser
knows the C the header uses and no more: fixed-width integers, int, float, double, void,
pointers (a pointer to a declared struct becomes a typed pointer, any other a void pointer,
which takes a tensor's `data_ptr()`), nested structs and fixed arrays. It raises on anything
else, so the header cannot drift into a form the bindings would misread.
"""

from __future__ import annotations

import ctypes
import functools
import re
from dataclasses import dataclass
from importlib import resources

HEADER = "gemmakit_kernels.h"

SCALARS = {
    "int8_t": ctypes.c_int8,
    "uint8_t": ctypes.c_uint8,
    "int16_t": ctypes.c_int16,
    "uint16_t": ctypes.c_uint16,
    "int32_t": ctypes.c_int32,
    "uint32_t": ctypes.c_uint32,
    "int64_t": ctypes.c_int64,
    "uint64_t": ctypes.c_uint64,
    "int": ctypes.c_int,
    "size_t": ctypes.c_size_t,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
}

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_ENUM = re.compile(r"\benum\s*\{([^}]*)\}\s*;")
_STRUCT = re.compile(r"\btypedef\s+struct\s*\{([^}]*)\}\s*(\w+)\s*;")
_FUNCTION = re.compile(r"\bGEMMAKIT_API\s+([^;(]+?)\s*\b(\w+)\s*\(([^)]*)\)\s*;")
# one declarator: pointer stars, a name, an optional fixed array length
_DECLARATOR = re.compile(r"^(\**)\s*(\w+)\s*(?:\[\s*(\d+)\s*\])?$")


@dataclass(frozen=True)
class Declarations:
    """What the header declares: enum constants, struct classes, and per exported function
    its ctypes result type (None for void) and argument types, in header order."""

    constants: dict[str, int]
    structs: dict[str, type[ctypes.Structure]]
    functions: dict[str, tuple[type | None, list[type]]]


def _base_type(words: str, structs: dict[str, type[ctypes.Structure]]):
    """The ctypes type of a base type spelling ("const float", "Mat", "void"); None for void."""
    names = [w for w in words.split() if w not in ("const", "volatile")]
    if len(names) != 1:
        raise ValueError(f"unsupported C type {words!r}")
    (name,) = names
    if name == "void":
        return None
    if name in SCALARS:
        return SCALARS[name]
    if name in structs:
        return structs[name]
    raise ValueError(f"unknown C type {name!r}")


def _apply(base, stars: str, length: str | None, what: str):
    """base with its pointer stars and array length applied."""
    if stars:
        if len(stars) == 1 and base is not None and issubclass(base, ctypes.Structure):
            typ = ctypes.POINTER(base)
        else:
            typ = ctypes.c_void_p  # data pointers: Python passes addresses (data_ptr())
    elif base is None:
        raise ValueError(f"{what} has type void")
    else:
        typ = base
    return typ * int(length) if length else typ


def _split_declaration(text: str) -> tuple[str, list[str]]:
    """'const float *a, *b[2]' -> ('const float', ['*a', '*b[2]'])."""
    first, *rest = (part.strip() for part in text.split(","))
    m = re.match(r"^(.*?)(\**\s*\w+\s*(?:\[\s*\d+\s*\])?)$", first, re.S)
    if m is None or not m.group(1).strip():
        raise ValueError(f"cannot read the declaration {text!r}")
    return m.group(1).strip(), [m.group(2), *rest]


def _fields(body: str, structs: dict[str, type[ctypes.Structure]]) -> list[tuple[str, type]]:
    fields = []
    for declaration in filter(None, (d.strip() for d in body.split(";"))):
        base_words, declarators = _split_declaration(declaration)
        base = _base_type(base_words, structs)
        for declarator in declarators:
            m = _DECLARATOR.match(declarator.replace(" ", ""))
            if m is None:
                raise ValueError(f"cannot read the field {declarator!r}")
            stars, name, length = m.groups()
            fields.append((name, _apply(base, stars, length, name)))
    return fields


def _parameter(text: str, structs: dict[str, type[ctypes.Structure]]) -> type:
    """The ctypes type of one parameter ("const Model *m", "int64_t n")."""
    base_words, (declarator,) = _split_declaration(text)
    m = _DECLARATOR.match(declarator.replace(" ", ""))
    if m is None or m.group(3):
        raise ValueError(f"cannot read the parameter {text!r}")
    return _apply(_base_type(base_words, structs), m.group(1), None, text)


def parse(header: str) -> Declarations:
    """The declarations of a header's text (see the module docstring for what it may hold)."""
    text = _COMMENT.sub(" ", header)
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    constants: dict[str, int] = {}
    for body in _ENUM.findall(text):
        value = -1
        for item in filter(None, (i.strip() for i in body.split(","))):
            name, _, given = (part.strip() for part in item.partition("="))
            value = int(given, 0) if given else value + 1
            constants[name] = value
    structs: dict[str, type[ctypes.Structure]] = {}
    for body, name in _STRUCT.findall(text):  # in order: a struct may hold the ones before it
        structs[name] = type(name, (ctypes.Structure,), {"_fields_": _fields(body, structs)})
    functions = {}
    for result, name, params in _FUNCTION.findall(text):
        base, stars = _base_type(result.replace("*", " "), structs), "*" * result.count("*")
        restype = _apply(base, stars, None, name) if stars or base is not None else None
        params = params.strip()
        argtypes = [] if params in ("", "void") else [_parameter(p, structs) for p in params.split(",")]
        functions[name] = (restype, argtypes)
    return Declarations(constants, structs, functions)


def header_text() -> str:
    """csrc/gemmakit_kernels.h as installed with the package."""
    return resources.files("gemmakit.kernels").joinpath("csrc", HEADER).read_text()


@functools.cache
def declarations() -> Declarations:
    """The installed header's declarations, parsed once: one set of struct classes per process."""
    return parse(header_text())


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Sets the result and argument types of every exported function on `lib` (an
    AttributeError if the library lacks one the header declares)."""
    for name, (restype, argtypes) in declarations().functions.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib
