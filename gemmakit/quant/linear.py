"""Quantized linear layers and the embedding that shares their data.

Every quantized linear is an `nn.Module` whose `forward(x)` is differentiable with respect to
x (the weight is frozen: QLoRA trains adapters on top of `base(x)`) and whose `dequantize()`
returns the float weight (for merging and export). State-dict names stay HF-like: the
quantized data sits at `<module>.weight` and its statistics beside it (`weight_absmax`,
`weight_scale`, ...). Which kernel multiplies is `gemmakit.ops`' choice.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit import ops
from gemmakit.errors import GemmakitError
from gemmakit.quant.integer import int4_quantize, int8_quantize, row_chunks, tinygemm_layout, tinygemm_rows
from gemmakit.quant.nf4 import (
    NF4_BLOCK,
    NF4_CODE,
    NF4_STATS_BLOCK,
    dynamic_map,
    nf4_absmax,
    nf4_dequantize,
    nf4_quantize,
)


class FrozenWeightMatmul(torch.autograd.Function):
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
            return FrozenWeightMatmul.apply(x, self)
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
        out = ops.nf4_dequantize(self.weight, self.absmax, NF4_CODE, shape, dtype)
        if out is not None:
            return out
        if _bnb() is not None:  # the same values, computed by bitsandbytes' kernels
            state = self.bnb_quant_state(torch.float32)
            return _bnb().functional.dequantize_4bit(self.weight[:, None], state).to(dtype)
        return nf4_dequantize(self.weight, self.absmax(), shape, dtype)

    def _matmul(self, x):
        return ops.nf4_linear(x, self.dequantize, self._bnb_matmul)

    def _bnb_matmul(self, x):
        """bitsandbytes' matmul_4bit on the same buffers, or None without bitsandbytes."""
        if _bnb() is None or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return None
        return _bnb().matmul_4bit(x, self.weight[:, None].t(), self.bnb_quant_state(x.dtype))

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
        self._scales = {}

    def dequantize(self, dtype=None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        return (self.weight.float() * self.weight_scale.float()[:, None]).to(dtype)

    def rows(self, ids, dtype=None):
        dtype = dtype or self.compute_dtype
        return (self.weight[ids].float() * self.weight_scale[ids].float()[..., None]).to(dtype)

    def scale_as(self, dtype: torch.dtype) -> torch.Tensor:
        """weight_scale in `dtype`, kept between calls (the kernels want float32 or bfloat16)."""
        if dtype not in self._scales:
            self._scales[dtype] = self.weight_scale.to(dtype)
        return self._scales[dtype]

    def _matmul(self, x):
        return ops.int8_linear(x, self.weight, self.weight_scale, self.scale_as)

    def _apply(self, fn, *args, **kwargs):
        self._scales = {}  # rebuilt on the new device/dtype when next needed
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
        kernel = weight.device.type in ("cpu", "meta") and ops.int_kernels_vectorized() and N % 16 == 0
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
            return tinygemm_rows(self.weight, rows, N, K, self.layout)
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
        return ops.int4_linear(
            x, self.weight, self.group_size, self.weight_scale_zero, self.layout is not None, self.dequantize
        )


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


LINEAR_CLASSES = {"nf4": NF4Linear, "int8": Int8Linear, "int4": Int4Linear}


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
