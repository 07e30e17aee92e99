"""Weight-only quantization of Gemma: NF4 (QLoRA layout), int8 per channel, int4 group-wise.

`quantize_model(model, kind)` swaps the linear layers of the blocks (q/k/v/o, gate/up/down) for
quantized modules in place; for int8/int4 it can also quantize the tied embedding / lm_head
matrix, which is 63% of Gemma 3 270M's parameters and most of its decode time.

Every quantized linear is an `nn.Module` whose `forward(x)` is differentiable with respect to
x (the weight is frozen: QLoRA trains adapters on top of `base(x)`) and whose `dequantize()`
returns the float weight (for merging and export). State-dict names stay HF-like: the
quantized data sits at `<module>.weight` and its statistics beside it
(`weight_absmax`, `weight_scale`, ...).

Formats:
- **nf4**: bitsandbytes' `quantize_4bit(quant_type="nf4", compress_statistics=True)`, bit for
  bit (QLoRA, arXiv 2305.14314 §3; bitsandbytes functional.py and backends/default/ops.py):
  absmax per block of 64 consecutive values of the flattened weight, each value mapped to the
  nearest of the 16 NF4 levels (midpoint buckets), packed two per byte with the first value in
  the high nibble. Double quantization: offset = mean(absmax) is subtracted and the result is
  quantized with bitsandbytes' signed 8-bit dynamic map in blocks of 256, each with a float32
  absmax. Cost: 4 + 8/64 + 32/(64*256) = 4.127 bits per weight.
- **int8**: symmetric per output channel, scale = max|w_row| / 127, round half to even;
  matmul with `torch.ops.aten._weight_int8pack_mm` on CPU.
- **int4**: asymmetric per group of `group_size` input columns, levels 0..15 between the
  group's min and max, matmul with `torch.ops.aten._weight_int4pack_mm_for_cpu` (the CPU
  "tinygemm" kernel), whose dequantization is (q - 8) * scale + zero.

Kernels (measured on this project's 2-core AVX512 machine, torch 2.13): torch's int8/int4 CPU
kernels are vectorized for bfloat16 activations only; with float32 activations they run a
scalar loop 10x slower than a float32 matmul. So on an AVX512 CPU the activations of these
matmuls are rounded to bfloat16 (as the kernels require) and the result cast back: on Gemma 3
270M's lm_head that is 25 ms (int8) and 15 ms (int4) against 90 ms in float32. Elsewhere (CUDA,
other CPUs) the weight is dequantized and multiplied in the activations' dtype. NF4 uses
bitsandbytes' kernels when it is installed (its CPU dequantization is 10x faster than ours and
bit-identical to it), else the pure-PyTorch dequantization here.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.config import PROJECTIONS
from gemmakit.errors import GemmakitError
from gemmakit.kernels import cpu as cpu_kernels

KINDS = ("nf4", "int8", "int4")
# The linear layers of a block that get quantized (the LoRA targets of the article's recipe).
TARGETS = PROJECTIONS

# --- NF4 -----------------------------------------------------------------------------------

# The 16 NF4 levels (normal-distribution quantiles, exact zero, asymmetric: 7 negative and 8
# positive), as bitsandbytes' get_4bit_type("nf4") lists them (field-notes §5).
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


# --- int8 / int4 ---------------------------------------------------------------------------


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


def _tinygemm_rows(packed: torch.Tensor, rows: torch.Tensor, N: int, K: int, layout) -> torch.Tensor:
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
            torch.equal(_tinygemm_rows(packed, torch.arange(len(p)), len(p), 64, layout).int(), p)
            for p, packed in probes
        ):
            return layout
    return None


def fast_cpu_kernels() -> bool:
    """Whether torch's int8/int4 weight-only CPU kernels have their vectorized (AVX512) path."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """x as the (M, K) contiguous bfloat16 matrix the CPU kernels run fast on."""
    return x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()


# --- modules -------------------------------------------------------------------------------


class _FrozenWeightMatmul(torch.autograd.Function):
    """y = x W^T with a frozen quantized W: the backward dequantizes W again instead of keeping
    a float copy alive between forward and backward (what makes QLoRA memory-light)."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return module._matmul(x)

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.module.dequantize(grad.dtype)
        return grad @ weight, None  # (..., N) @ (N, K) -> (..., K)


class QuantizedLinear(nn.Module):
    """Base class: a bias-free linear layer with a frozen quantized weight of shape (N, K)."""

    kind = ""

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenWeightMatmul.apply(x, self)
        return self._matmul(x)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight (N, K) this module computes with."""
        raise NotImplementedError

    def rows(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dequantized rows `ids` of the weight: an embedding lookup on the same data."""
        return self.dequantize(dtype)[ids]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


class NF4Linear(QuantizedLinear):
    """NF4 with double quantization, in bitsandbytes' exact layout (QLoRA).

    Buffers: `weight` (uint8 (N*K/2,), packed), `weight_absmax` (uint8 codes),
    `weight_nested_absmax` (float32), `weight_offset` (float32 scalar).
    """

    kind = "nf4"

    def __init__(self, weight: torch.Tensor):
        N, K = weight.shape
        super().__init__(K, N, weight.dtype)
        q = nf4_quantize(weight)
        self.register_buffer("weight", q["packed"])
        self.register_buffer("weight_absmax", q["absmax"])
        self.register_buffer("weight_nested_absmax", q["nested_absmax"])
        self.register_buffer("weight_offset", q["offset"])

    def absmax(self) -> torch.Tensor:
        return nf4_absmax(self.weight_absmax, self.weight_nested_absmax, self.weight_offset)

    def dequantize(self, dtype=None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        shape = (self.out_features, self.in_features)
        if self.weight.device.type == "cpu":  # one C pass, bitsandbytes' values (~10x faster)
            out = cpu_kernels.nf4_dequantize(self.weight, self.absmax(), NF4_CODE, shape, dtype)
            if out is not None:
                return out
        if _bnb() is not None:  # the same values, computed by bitsandbytes' kernels
            state = self.bnb_quant_state(torch.float32)
            return _bnb().functional.dequantize_4bit(self.weight[:, None], state).to(dtype)
        return nf4_dequantize(self.weight, self.absmax(), shape, dtype)

    def _matmul(self, x):
        # On the CPU bitsandbytes dequantizes and multiplies too (its fused kernel needs the
        # `kernels` package from the hub): the C dequantization does the first part faster.
        cpu_kernel = x.device.type == "cpu" and cpu_kernels.library() is not None
        if (
            not cpu_kernel
            and _bnb() is not None
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        ):
            return _bnb().matmul_4bit(x, self.weight[:, None].t(), self.bnb_quant_state(x.dtype))
        return F.linear(x, self.dequantize(x.dtype))

    def bnb_quant_state(self, dtype: torch.dtype | None = None):
        """The equivalent `bitsandbytes.functional.QuantState` (same buffers, no copy)."""
        functional = _bnb().functional
        nf4_code, dynamic = _code_tables(self.weight.device)
        nested = functional.QuantState(
            absmax=self.weight_nested_absmax, code=dynamic,
            blocksize=NF4_STATS_BLOCK, dtype=torch.float32,
        )  # fmt: skip
        return functional.QuantState(
            absmax=self.weight_absmax, shape=torch.Size((self.out_features, self.in_features)),
            code=nf4_code, blocksize=NF4_BLOCK, quant_type="nf4",
            dtype=dtype or self.compute_dtype, offset=self.weight_offset, state2=nested,
        )  # fmt: skip


class Int8Linear(QuantizedLinear):
    """int8 weight-only, one scale per output channel.

    Buffers: `weight` (int8 (N, K)), `weight_scale` (N,) in the compute dtype.
    """

    kind = "int8"

    def __init__(self, weight: torch.Tensor):
        N, K = weight.shape
        super().__init__(K, N, weight.dtype)
        q, scale = (torch.cat(parts) for parts in zip(*map(int8_quantize, row_chunks(weight))))
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale.to(weight.dtype))
        self._kernel_scale = self._f32_scale = None

    def dequantize(self, dtype=None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        return (self.weight.float() * self.weight_scale.float()[:, None]).to(dtype)

    def rows(self, ids, dtype=None):
        dtype = dtype or self.compute_dtype
        return (self.weight[ids].float() * self.weight_scale[ids].float()[..., None]).to(dtype)

    def _matmul(self, x):
        if x.numel() == self.in_features and self.out_features >= cpu_kernels.MIN_ROWS:
            # One token through a big matrix (the decode step's lm_head): the C kernel.
            if self._f32_scale is None:
                self._f32_scale = self.weight_scale.float()
            y = cpu_kernels.gemv_int8(x.reshape(-1).float(), self.weight, self._f32_scale)
            if y is not None:
                return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        if self.weight.device.type == "cpu" and fast_cpu_kernels() and x.dtype != torch.float16:
            if self._kernel_scale is None:  # the kernel wants scales in the activations' dtype
                self._kernel_scale = self.weight_scale.to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(_kernel_input(x), self.weight, self._kernel_scale)
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        # x (W_q * s)^T == (x W_q^T) * s: no scaled copy of the weight is made.
        return F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)

    def _apply(self, fn, *args, **kwargs):
        self._kernel_scale = self._f32_scale = None  # rebuilt on the new device/dtype when next needed
        return super()._apply(fn, *args, **kwargs)


class Int4Linear(QuantizedLinear):
    """int4 weight-only, asymmetric per group of `group_size` input columns.

    On an AVX512 CPU `weight` holds the tinygemm kernel's packed layout (uint8 (N, K/2)) and
    `weight_scale_zero` its (K/g, N, 2) scales and zeros in bfloat16; elsewhere `weight`
    holds plain nibbles (column 2j low, 2j+1 high), the scales are in the compute dtype and
    the matmul dequantizes.
    """

    kind = "int4"

    def __init__(self, weight: torch.Tensor, group_size: int = 32):
        N, K = weight.shape
        super().__init__(K, N, weight.dtype)
        if K % group_size:
            raise GemmakitError(f"int4: in_features {K} is not a multiple of the group size {group_size}")
        self.group_size = group_size
        # A meta weight is a CPU model being rebuilt from gemmakit's quantized cache.
        kernel = weight.device.type in ("cpu", "meta") and fast_cpu_kernels() and N % 16 == 0
        self.layout = tinygemm_layout() if kernel else None
        # The kernel reads scales and zeros in bfloat16 (torchao's int4 layout does too);
        # dequantize() uses the same rounded values, so both describe one weight.
        sz_dtype = torch.bfloat16 if self.layout is not None else weight.dtype
        packed, scale_zero = [], []
        for chunk in row_chunks(weight):
            q, scale, lo = int4_quantize(chunk, group_size)
            # tinygemm dequantizes (q - 8) * scale + zero, so zero = min + 8 * scale.
            zero = lo + 8 * scale
            scale_zero.append(torch.stack([scale.t(), zero.t()], dim=-1).to(sz_dtype))  # (K/g, n, 2)
            if self.layout is not None:  # rows are packed in blocks of 64: chunks concatenate
                packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 2))
            else:
                packed.append(q[:, 0::2] | (q[:, 1::2] << 4))
        self.register_buffer("weight", torch.cat(packed))
        self.register_buffer("weight_scale_zero", torch.cat(scale_zero, dim=1).contiguous())

    def levels(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The 4-bit levels (rows, K) as uint8 (all rows when ids is None)."""
        N, K = self.out_features, self.in_features
        rows = torch.arange(N, device=self.weight.device) if ids is None else ids.reshape(-1)
        if self.layout is not None:
            return _tinygemm_rows(self.weight, rows, N, K, self.layout)
        packed = self.weight[rows]
        return torch.stack([packed & 15, packed >> 4], dim=-1).view(-1, K)

    def rows(self, ids, dtype=None):
        dtype = dtype or self.compute_dtype
        flat = ids.reshape(-1)
        q = self.levels(flat).float().view(flat.numel(), -1, self.group_size)  # (n, K/g, g)
        sz = self.weight_scale_zero[:, flat].float()  # (K/g, n, 2)
        scale, zero = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]
        out = ((q - 8) * scale + zero).view(flat.numel(), self.in_features)
        return out.to(dtype).view(*ids.shape, self.in_features)

    def dequantize(self, dtype=None) -> torch.Tensor:
        return self.rows(torch.arange(self.out_features, device=self.weight.device), dtype)

    def _matmul(self, x):
        if self.layout is None or x.dtype == torch.float16:
            return F.linear(x, self.dequantize(x.dtype))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            _kernel_input(x), self.weight, self.group_size, self.weight_scale_zero
        )
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


class QuantizedEmbedding(nn.Module):
    """An embedding lookup that dequantizes only the gathered rows of a quantized matrix.

    With tied weights it shares the data of the quantized lm_head (`source`), so the
    262144 x 640 matrix of Gemma 3 270M is stored once. The module is registered under its
    source's name only (`lm_head`), so the state dict holds the matrix once too.
    """

    def __init__(self, source: QuantizedLinear, padding_idx: int | None = None):
        super().__init__()
        # A plain attribute, not a submodule: the tied matrix is owned by lm_head.
        self.__dict__["source"] = source
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = source.out_features, source.in_features

    @property
    def weight(self) -> torch.Tensor:
        """An empty (0, C) tensor carrying the compute dtype and device.

        Code that only asks the embedding for its dtype/device (KV-cache allocation) keeps
        working; the matrix itself is `dequantize()`.
        """
        ref = self.source.weight
        return torch.empty((0, self.embedding_dim), dtype=self.source.compute_dtype, device=ref.device)

    def dequantize(self, dtype=None) -> torch.Tensor:
        return self.source.dequantize(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.source.rows(ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.source.kind} (tied to lm_head)"


_CLASSES = {"nf4": NF4Linear, "int8": Int8Linear, "int4": Int4Linear}


@functools.cache
def _code_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 levels and the dynamic map on `device`, copied there once."""
    return NF4_CODE.to(device), dynamic_map().to(device)


@functools.cache
def _bnb():
    # bitsandbytes' CPU backend logs a warning on import when it cannot download an optional
    # kernel from the Hugging Face hub (it falls back to its bundled ones, which we use).
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except Exception:  # missing, or broken for this platform
        return None
    finally:
        quiet.setLevel(level)
    return bitsandbytes


# --- whole models --------------------------------------------------------------------------


def quantize_model(
    model: nn.Module,
    kind: str,
    embeddings: bool | str | None = None,
    group_size: int = 32,
    progress: bool = False,
    sources: dict | None = None,
) -> nn.Module:
    """Quantizes a Gemma model in place and returns it.

    Args:
        model: a `gemmakit.model.gemma.Gemma` in float32/bfloat16/float16.
        kind: "nf4", "int8" or "int4".
        embeddings: also quantize the embedding / lm_head matrix (rows are dequantized on
            lookup): True (same kind), False, or "int8"/"int4". Default: int8 for int8 and
            int4 (the output layer is the most sensitive tensor; llama.cpp's quantizer keeps
            it at 6-8 bits too), none for nf4 (bitsandbytes and QLoRA keep it in 16 bits).
        group_size: int4 group size (32, 64 or 128). 32, llama.cpp's Q4_0 block, costs half a
            bit more per weight than 64 and measurably less perplexity on Gemma 3 270M
            (+24% against +37% over fp32 on the bundled text, linear layers only).
        progress: show a progress bar.
        sources: weights to quantize instead of the modules' own, by state-dict name, as
            callables returning a tensor or a lazy row source (see `row_chunks`): a model
            built on the meta device is quantized while its weights stream from disk.

    Raises:
        GemmakitError: unknown kind, an already quantized model, or nf4 with embeddings.
    """
    if kind not in KINDS:
        raise GemmakitError(f"unknown quantization {kind!r}; choose one of {', '.join(KINDS)}")
    if group_size not in (32, 64, 128):
        raise GemmakitError(f"int4 group size must be 32, 64 or 128, not {group_size}")
    if is_quantized(model):
        raise GemmakitError("the model is already quantized")
    if embeddings is None:
        embeddings = "int8" if kind != "nf4" else False
    if embeddings is True:
        embeddings = kind
    if embeddings == "nf4" or (embeddings and embeddings not in ("int8", "int4")):
        raise GemmakitError(
            "the embedding can be quantized to int8 or int4 only (nf4 quantizes the linear layers)"
        )

    def maker(k):
        return (lambda w: Int4Linear(w, group_size)) if k == "int4" else _CLASSES[k]

    make = maker(kind)
    sources = sources or {}
    targets = []
    for path, parent in model.model.layers.named_modules(prefix="model.layers"):
        for name in TARGETS:
            module = getattr(parent, name, None)
            if isinstance(module, nn.Linear):
                targets.append((parent, name, f"{path}.{name}.weight"))
            elif isinstance(getattr(module, "base", None), nn.Linear):  # a LoRA wrapper's base
                targets.append((module, "base", f"{path}.{name}.base.weight"))
    from tqdm import tqdm

    def weight(module, key):
        return sources[key]() if key in sources else module.weight

    with torch.no_grad():
        for parent, name, key in tqdm(
            targets, desc=f"quantizing ({kind})", disable=not progress, leave=False
        ):
            setattr(parent, name, make(weight(getattr(parent, name), key)))
        if embeddings:
            embed = model.model.embed_tokens
            tied = model.lm_head.weight is embed.weight
            head_key = "model.embed_tokens.weight" if tied else "lm_head.weight"
            head = maker(embeddings)(weight(model.lm_head, head_key))
            model.lm_head = head
            source = head if tied else maker(embeddings)(weight(embed, "model.embed_tokens.weight"))
            if not tied:  # an untied embedding owns its own quantized matrix
                model.model.add_module("embed_tokens_q", source)
            model.model.embed_tokens = QuantizedEmbedding(source, embed.padding_idx)
    model.quantization = {"kind": kind, "embeddings": embeddings, "group_size": group_size}
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def model_memory(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each shared storage counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def float_memory(model: nn.Module) -> int:
    """Bytes the model would hold with every quantized weight in its compute dtype."""
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    as_float = sum(m.in_features * m.out_features * m.compute_dtype.itemsize for m in quantized)
    return model_memory(model) - sum(model_memory(m) for m in quantized) + as_float


def dequantized_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's float state dict under its native names, quantized weights dequantized.

    Tied weights appear under both names, as in `Gemma.state_dict()`.
    """
    out: dict[str, torch.Tensor] = {}
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    for name, t in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module == "model.embed_tokens_q":  # an untied quantized embedding, added below
            continue
        if module in quantized:
            if leaf == "weight":
                out[name] = quantized[module].dequantize(dtype or quantized[module].compute_dtype)
            continue
        out[name] = t if dtype is None or not t.is_floating_point() else t.to(dtype)
    embed = getattr(model.model, "embed_tokens", None)
    if isinstance(embed, QuantizedEmbedding):
        out["model.embed_tokens.weight"] = embed.dequantize(dtype or embed.source.compute_dtype)
    return out
