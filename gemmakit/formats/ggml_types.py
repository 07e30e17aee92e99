"""ggml's tensor types: their ids in a GGUF file and the size of their blocks.

The ids are `enum ggml_type` in llama.cpp's ggml/include/ggml.h; a type's block holds
`values` weights in `bytes` bytes (the `block_*` structs of ggml/src/ggml-common.h). gguf-py
has the same table in `gguf.constants`, but that module also builds every architecture's
tensor-name tables: importing it after torch takes 16-32 ms and 4.3 MiB of resident memory
right after the import (about 1.4 MiB of `gemmakit generate`'s peak, the rest reused by later
allocations; measured on a loaded machine), in a load that needs only these two columns.
`tests/test_ggml_types.py` checks this table against gguf-py's.

`GGMLQuantizationType` keeps gguf-py's class and member names, and is an IntEnum like it, so
a type from here equals, hashes and indexes gguf-py's tables as gguf-py's own member does.
"""

from __future__ import annotations

from enum import IntEnum


class GGMLQuantizationType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


_T = GGMLQuantizationType
K = 256  # QK_K: the super-block of the K and most IQ types
# type -> (values per block, bytes per block), from ggml-common.h's block structs: a ggml_half
# is 2 bytes, a float 4.
GGML_QUANT_SIZES: dict[GGMLQuantizationType, tuple[int, int]] = {
    _T.F32: (1, 4),
    _T.F16: (1, 2),
    _T.BF16: (1, 2),
    _T.F64: (1, 8),
    _T.I8: (1, 1),
    _T.I16: (1, 2),
    _T.I32: (1, 4),
    _T.I64: (1, 8),
    _T.Q4_0: (32, 2 + 16),  # d, 32 nibbles
    _T.Q4_1: (32, 2 + 2 + 16),  # d, m, 32 nibbles
    _T.Q5_0: (32, 2 + 4 + 16),  # d, the fifth bits, 32 nibbles
    _T.Q5_1: (32, 2 + 2 + 4 + 16),
    _T.Q8_0: (32, 2 + 32),
    _T.Q8_1: (32, 2 + 2 + 32),  # d, s = d * sum(qs), 32 int8 (block_q8_1)
    _T.Q2_K: (K, K // 16 + K // 4 + 2 + 2),  # scales, 2-bit quants, d, dmin
    _T.Q3_K: (K, K // 8 + K // 4 + 12 + 2),  # hmask, 2-bit quants, scales, d
    _T.Q4_K: (K, 2 + 2 + 12 + K // 2),  # d, dmin, scales, nibbles
    _T.Q5_K: (K, 2 + 2 + 12 + K // 8 + K // 2),  # d, dmin, scales, high bits, nibbles
    _T.Q6_K: (K, K // 2 + K // 4 + K // 16 + 2),  # low 4 bits, high 2 bits, scales, d
    _T.Q8_K: (K, 4 + K + K // 16 * 2),  # float d, int8 quants, int16 bsums
    _T.IQ2_XXS: (K, 2 + K // 4),
    _T.IQ2_XS: (K, 2 + K // 4 + K // 32),
    _T.IQ2_S: (K, 2 + K // 4 + K // 16),
    _T.IQ3_XXS: (K, 2 + K // 4 + K // 8),
    _T.IQ3_S: (K, 2 + K // 4 + K // 8 + K // 32 + 4),
    _T.IQ1_S: (K, 2 + K // 8 + K // 16),
    _T.IQ1_M: (K, K // 8 + K // 16 + K // 32),
    _T.IQ4_NL: (32, 2 + 16),
    _T.IQ4_XS: (K, 2 + 2 + K // 64 + K // 2),
    _T.TQ1_0: (K, 2 + 4 * 13),
    _T.TQ2_0: (K, 2 + 64),
    _T.MXFP4: (32, 1 + 16),  # e8m0 scale, 32 nibbles
    _T.NVFP4: (64, 4 + 32),  # 4 e4m3 scales, 64 nibbles
    _T.Q1_0: (128, 2 + 16),  # d, 128 sign bits
}
