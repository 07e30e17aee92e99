"""NF4 with double quantization, in bitsandbytes' exact layout (QLoRA).

bitsandbytes' `quantize_4bit(quant_type="nf4", compress_statistics=True)`, bit for bit (QLoRA,
arXiv 2305.14314 §3; bitsandbytes functional.py and backends/default/ops.py): absmax per block
of 64 consecutive values of the flattened weight, each value mapped to the nearest of the 16
NF4 levels (midpoint buckets), packed two per byte with the first value in the high nibble.
Double quantization: offset = mean(absmax) is subtracted and the result is quantized with
bitsandbytes' signed 8-bit dynamic map in blocks of 256, each with a float32 absmax.
Cost: 4 + 8/64 + 32/(64*256) = 4.127 bits per weight.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

# The 16 NF4 levels (normal-distribution quantiles, exact zero, asymmetric: 7 negative and 8
# positive), as bitsandbytes' get_4bit_type("nf4") lists them.
NF4_CODE = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    dtype=torch.float32,
)  # fmt: skip
NF4_BLOCK = 64  # first-level block (bitsandbytes quantize_4bit default)
NF4_STATS_BLOCK = 256  # second-level block over the absmax (compress_statistics)


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map (create_dynamic_map(signed=True)).

    Dynamic tree quantization (Dettmers 2015, arXiv 1511.04561): for exponent e = 0..6 the
    map holds the midpoints of 2**e + 1 evenly spaced points in [0.1, 1], times 10**(e - 6),
    with both signs, plus 0 and 1, sorted: 256 values. Computed in float32 throughout, as
    bitsandbytes does, so the values match it bit for bit (tested).
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += (10 ** (e - 6) * means).tolist() + (-(10 ** (e - 6)) * means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def _nearest_level(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    # Nearest level by midpoints: a value exactly on a midpoint goes to the lower level
    # (torch.bucketize, right=False), as bitsandbytes' reference implementation does.
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, bounds.to(scaled.device), out_int32=True).to(torch.uint8)


def _blockwise_absmax(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block, values scaled into [-1, 1]) with bitsandbytes' exact arithmetic.

    Full blocks are scaled by a multiplication with 1/absmax and a trailing partial block by a
    division, as in bitsandbytes; the difference matters for bit-exactness.
    """
    n = flat.numel()
    full = n - n % block
    body = flat[:full].view(-1, block)
    absmax = body.abs().amax(dim=-1)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max()
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max.clamp(min=1e-38), -1, 1)])
    return absmax, scaled


def _blockwise_scale(values: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """values (n,) times a per-block scale, blocks of `block` consecutive values."""
    n = values.numel()
    full = n - n % block
    out = (values[:full].view(-1, block) * scales[: full // block, None]).view(-1)
    if full < n:
        out = torch.cat([out, values[full:] * scales[-1]])
    return out


def nf4_quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Quantizes a weight to NF4 with double quantization (bitsandbytes layout).

    Returns:
        `packed` (uint8, numel/2; first value in the high nibble), `absmax` (uint8 codes of
        absmax - offset in the dynamic map, one per block of 64), `nested_absmax` (float32, one
        per 256 blocks) and `offset` (float32 scalar, the mean absmax).
    """
    if weight.is_meta:  # shapes only: a model rebuilt from the quantized cache
        blocks = -(-weight.numel() // NF4_BLOCK)
        empty = functools.partial(torch.empty, device="meta")
        return {"packed": empty((weight.numel() + 1) // 2, dtype=torch.uint8),
                "absmax": empty(blocks, dtype=torch.uint8),
                "nested_absmax": empty(-(-blocks // NF4_STATS_BLOCK), dtype=torch.float32),
                "offset": empty((), dtype=torch.float32)}  # fmt: skip
    flat = weight.detach().reshape(-1).float()
    absmax, scaled = _blockwise_absmax(flat, NF4_BLOCK)
    if scaled.numel() % 2:
        scaled = F.pad(scaled, (0, 1))
    q = _nearest_level(scaled, NF4_CODE)
    packed = (q[0::2] << 4) | q[1::2]
    offset = absmax.mean()
    nested, scaled_stats = _blockwise_absmax(absmax - offset, NF4_STATS_BLOCK)
    codes = _nearest_level(scaled_stats, dynamic_map())
    return {"packed": packed, "absmax": codes, "nested_absmax": nested, "offset": offset}


def nf4_absmax(codes: torch.Tensor, nested: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The float32 absmax per 64-block from its double-quantized form."""
    table = dynamic_map().to(codes.device)
    return _blockwise_scale(table[codes.long()], nested, NF4_STATS_BLOCK) + offset


@functools.cache
def _nf4_byte_table(device: torch.device) -> torch.Tensor:
    """(256, 2): the two NF4 values a packed byte stands for (high nibble first)."""
    b = torch.arange(256)
    return torch.stack([NF4_CODE[b >> 4], NF4_CODE[b & 15]], dim=1).to(device)


def nf4_dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], dtype=torch.float32
) -> torch.Tensor:
    """Float weight from packed NF4 and its float32 absmax (code value * absmax, in float32)."""
    n = math.prod(shape)
    values = _nf4_byte_table(packed.device)[packed.reshape(-1).long()].view(-1)[:n]
    return _blockwise_scale(values, absmax, NF4_BLOCK).view(shape).to(dtype)
