"""int8 and int4 weight codecs, and the packed layout of torch's int4 CPU kernel.

- int8: symmetric per output channel, scale = max|w_row| / 127, round half to even.
- int4: asymmetric per group of `group_size` input columns, levels 0..15 between the
  group's min and max; torch's CPU "tinygemm" kernel dequantizes (q - 8) * scale + zero.
"""

from __future__ import annotations

import functools

import torch

# Rows quantized at a time (a multiple of tinygemm's 64-row blocks): quantizing the 262144 x 640
# embedding in one piece would hold several float32 copies of it (2+ GB) at once.
CHUNK_ROWS = 16384


def row_chunks(weight, rows: int | None = None):
    """Consecutive row blocks of a weight (N, K): a tensor, or a lazy source with `shape`,
    `dtype`, `device` and `rows(start, stop)` (gemmakit.loading reads the embedding so)."""
    N, rows = weight.shape[0], rows or CHUNK_ROWS
    for start in range(0, N, rows):
        stop = min(start + rows, N)
        yield weight[start:stop] if isinstance(weight, torch.Tensor) else weight.rows(start, stop)


def int8_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 (N, K), float32 scale (N,)): symmetric per output row, scale = max|w| / 127."""
    if weight.is_meta:  # shapes only: a model rebuilt from the quantized cache
        return torch.empty(weight.shape, dtype=torch.int8, device="meta"), torch.empty(
            weight.shape[0], device="meta"
        )
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int4_quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(levels 0..15 as uint8 (N, K), scale (N, K/g), minimum (N, K/g)), float32.

    Asymmetric: w ~ q * scale + minimum with scale = (max - min) / 15 per group of
    `group_size` consecutive input columns, so the error is at most scale / 2.
    """
    N, K = weight.shape
    if weight.is_meta:  # shapes only: a model rebuilt from the quantized cache
        stats = torch.empty((N, K // group_size), device="meta")
        return torch.empty((N, K), dtype=torch.uint8, device="meta"), stats, stats
    w = weight.detach().float().view(N, K // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return q.view(N, K), scale, lo


# The CPU tinygemm kernel's packed layout (aten/src/ATen/native/cpu/int4mm_kernel.cpp,
# weight_to_int4pack_kernel): rows go in blocks of BLOCK_N (64 with AVX512, 32 otherwise),
# each stored as (K, BLOCK_N/2) bytes. In a full block on AVX512/AVX2, byte d holds row d
# (low nibble) and row d + BLOCK_N/2 (high nibble); in a partial trailing block, and on
# non-vectorized builds, byte d holds rows 2d (low) and 2d + 1 (high). The layout is probed
# once at run time and used only if it round-trips, so a different build falls back to
# dequantize-then-matmul instead of silently reading garbage.
_LAYOUT_CANDIDATES = ((64, True), (32, True), (32, False), (64, False), (16, False))


def tinygemm_rows(packed: torch.Tensor, rows: torch.Tensor, N: int, K: int, layout) -> torch.Tensor:
    """The 4-bit levels (len(rows), K) of `rows` from a tinygemm-packed (N, K/2) tensor."""
    block, split = layout
    flat = packed.reshape(-1)
    full_blocks = N // block
    out = torch.empty((rows.numel(), K), dtype=torch.uint8, device=packed.device)
    in_full = rows < full_blocks * block
    if in_full.any():
        r = rows[in_full]
        body = flat[: full_blocks * block * K // 2].view(full_blocks, K, block // 2)
        b, d = r // block, r % block
        if split:  # byte d: row d low, row d + block/2 high
            byte = body[b, :, d % (block // 2)]
            out[in_full] = torch.where((d < block // 2)[:, None], byte & 15, byte >> 4)
        else:  # byte d: rows 2d (low) and 2d + 1 (high)
            byte = body[b, :, d // 2]
            out[in_full] = torch.where((d % 2 == 0)[:, None], byte & 15, byte >> 4)
    if not in_full.all():
        start = full_blocks * block
        tail = flat[start * K // 2 :].view(K, (N - start) // 2)
        d = rows[~in_full] - start
        byte = tail[:, d // 2].t()
        out[~in_full] = torch.where((d % 2 == 0)[:, None], byte & 15, byte >> 4)
    return out


@functools.cache
def tinygemm_layout():
    """The (block, split) layout of `_convert_weight_to_int4pack_for_cpu`, or None."""
    try:
        pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    except (AttributeError, RuntimeError):
        return None
    g = torch.Generator().manual_seed(0)
    probes = []
    for N in (128 + 16, 64 + 32):  # full blocks followed by a partial one
        probe = torch.randint(0, 16, (N, 64), generator=g, dtype=torch.int32)
        try:
            probes.append((probe, pack(probe, 2)))
        except RuntimeError:
            return None
    for layout in _LAYOUT_CANDIDATES:
        if all(
            torch.equal(tinygemm_rows(packed, torch.arange(len(p)), len(p), 64, layout).int(), p)
            for p, packed in probes
        ):
            return layout
    return None
