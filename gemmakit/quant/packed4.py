"""The packed 4-bit layouts of GPTQ and AWQ checkpoints, as integer tensors.

Both store 4-bit levels q (0..15) eight to an int32, and dequantize w = (q - zero) * scale per
group of input columns; they differ in which axis is packed and in what order:

- GPTQ (`checkpoint_format: gptq`, AutoGPTQ / gptqmodel "v1"): `qweight` (K/8, N) packs 8
  consecutive input rows k = 8i..8i+7 into row i, value j at bits 4j; `qzeros` (G, N/8) packs
  8 consecutive output columns the same way and stores zero - 1 (the v1 format's offset, which
  gptqmodel's `convert_gptq_v1_to_v2_format` undoes); `scales` (G, N) fp16; `g_idx` (K,) the
  group of each input column (act-order permutes it).
- AWQ GEMM (`version: gemm`, AutoAWQ `WQLinear_GEMM`): `qweight` (K, N/8) packs 8 output
  columns per int32 in the interleaved order [0, 2, 4, 6, 1, 3, 5, 7] (slot j at bits 4j holds
  column AWQ_ORDER[j]); `qzeros` (K/g, N/8) the same, zeros stored as they are; `scales`
  (K/g, N) fp16.
"""

from __future__ import annotations

import torch

# AutoAWQ awq/modules/linear/gemm.py (pack) and awq/utils/packing_utils.py (AWQ_ORDER).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def _pack_last(values: torch.Tensor, order=None) -> torch.Tensor:
    """int32 (..., M/8) from levels (..., M) in 0..15: slot j of each word holds value order[j]."""
    v = values.to(torch.int64).reshape(*values.shape[:-1], -1, 8)
    if order is not None:
        v = v[..., list(order)]
    words = (v << _SHIFTS.to(torch.int64)).sum(-1)
    # A word with its top bit set is a negative int32 (two's complement), as the files hold it.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_last(packed: torch.Tensor, order=None) -> torch.Tensor:
    """Levels (..., M*8) uint8 from int32 words (..., M), the inverse of `_pack_last`."""
    v = (packed.to(torch.int32)[..., None] >> _SHIFTS) & 15
    if order is not None:
        inverse = [order.index(j) for j in range(8)]
        v = v[..., inverse]
    return v.reshape(*packed.shape[:-1], -1).to(torch.uint8)


def gptq_pack(levels: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight (K/8, N), qzeros (G, N/8)) int32 from levels (N, K) and zeros (N, G), ints 0..15.

    Zeros must be at least 1: the v1 format stores zero - 1."""
    if int(zeros.min()) < 1:
        raise ValueError("GPTQ v1 zeros must be >= 1")
    N, K = levels.shape
    qweight = _pack_last(levels.t().reshape(K // 8, 8, N).transpose(1, 2).reshape(K // 8, N * 8))
    qzeros = _pack_last(zeros.t() - 1)
    return qweight, qzeros


def gptq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels (N, K) uint8, zeros (N, G) int) from GPTQ v1 qweight (K/8, N) and qzeros (G, N/8)."""
    levels = _unpack_last(qweight.t().contiguous())  # (N, K)
    zeros = _unpack_last(qzeros).to(torch.int32) + 1  # v1 stores zero - 1
    return levels, zeros.t().contiguous()


def awq_pack(levels: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight (K, N/8), qzeros (G, N/8)) int32 from levels (N, K) and zeros (N, G)."""
    return _pack_last(levels.t().contiguous(), AWQ_ORDER), _pack_last(zeros.t().contiguous(), AWQ_ORDER)


def awq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels (N, K) uint8, zeros (N, G) int) from AWQ GEMM qweight (K, N/8) and qzeros (G, N/8)."""
    levels = _unpack_last(qweight, AWQ_ORDER).t().contiguous()
    zeros = _unpack_last(qzeros, AWQ_ORDER).to(torch.int32).t().contiguous()
    return levels, zeros


def gptq_state_to_awq(state: dict) -> dict:
    """A state dict's GPTQ tensors in AWQ GEMM's layout (g_idx dropped: it must be in order)."""
    out = {}
    for name, t in state.items():
        if not name.endswith(".qweight"):
            if not name.endswith((".qzeros", ".g_idx")):
                out[name] = t
            continue
        prefix = name.removesuffix(".qweight")
        g_idx = state[prefix + ".g_idx"].long()
        group_size = len(g_idx) // state[prefix + ".scales"].shape[0]
        if not torch.equal(g_idx, torch.arange(len(g_idx)) // group_size):
            raise ValueError("AWQ's layout has no act-order: quantize without desc_act")
        levels, zeros = gptq_unpack(t, state[prefix + ".qzeros"])
        out[name], out[prefix + ".qzeros"] = awq_pack(levels, zeros)
    return out


def awq_state_to_gptq(state: dict) -> dict:
    """An AWQ GEMM state dict's tensors in GPTQ's v1 layout (zeros must be at least 1)."""
    out = dict(state)
    for name in [n for n in state if n.endswith(".qweight")]:
        prefix = name.removesuffix(".qweight")
        levels, zeros = awq_unpack(state[name], state[prefix + ".qzeros"])
        if int(zeros.min()) < 1:
            raise ValueError(f"{prefix}: an AWQ zero point of 0 has no GPTQ v1 form")
        out[name], out[prefix + ".qzeros"] = gptq_pack(levels, zeros)
        K = levels.shape[1]
        out[prefix + ".g_idx"] = (torch.arange(K) // (K // state[prefix + ".scales"].shape[0])).to(
            torch.int32
        )
    return out


C_CHUNK = 32  # columns per 16 bytes in packed4.c's layout


def c_layout(levels: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 of levels (N, K) in 0..15, in csrc/packed4.c's layout: each 32 columns in
    16 bytes, column j in the low nibble of byte j and column j + 16 in its high nibble (one
    16-byte load widens to two vectors of consecutive columns). K must be a multiple of 32."""
    N, K = levels.shape
    v = levels.to(torch.uint8).reshape(N, K // C_CHUNK, 2, C_CHUNK // 2)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(N, K // 2).contiguous()


def c_unlayout(packed: torch.Tensor) -> torch.Tensor:
    """Levels (N, K) uint8 from `c_layout`'s bytes (N, K/2), its inverse."""
    N, half = packed.shape
    v = packed.reshape(N, half // 16, 1, 16)
    return torch.cat([v & 15, v >> 4], dim=2).reshape(N, half * 2)
