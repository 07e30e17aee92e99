"""Products with quantized weights: which kernel multiplies int8, int4 and NF4 weights.

torch's int8/int4 CPU kernels are vectorized for bfloat16 activations only (with float32
activations they run a scalar loop), so on an AVX512 CPU the activations of these matmuls are
rounded to bfloat16, as the kernels require, and the result cast back. Elsewhere (CUDA, other
CPUs) the weight is dequantized and multiplied in the activations' dtype. One token through
the 262k-row int8 lm_head goes to the C matrix-vector kernel. NF4 is dequantized by a C kernel
on the CPU (bitsandbytes' values) and multiplied by torch.
"""

# Measured with torch 2.13 on a 2-core AVX512 CPU: the int8/int4 kernels with float32
# activations ran 10x slower than a float32 matmul; on Gemma 3 270M's lm_head the bfloat16
# path took 25 ms (int8) and 15 ms (int4) against 90 ms in float32. The C NF4 dequantization
# is ~10x faster than bitsandbytes' CPU one.

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from gemmakit.kernels import cpu as cpu_kernels


def int_kernels_vectorized() -> bool:
    """Whether torch's int8/int4 weight-only CPU kernels have their vectorized (AVX512) path."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """x as the (M, K) contiguous bfloat16 matrix the CPU kernels run fast on."""
    return x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    scale_as: Callable[[torch.dtype], torch.Tensor],
) -> torch.Tensor:
    """x (W_q * s)^T for an int8 weight with one scale per output row.

    One token through a big matrix: the C kernel, in float32. On a CPU where torch's int8
    kernel is vectorized: that kernel, with x rounded to bfloat16. Else (x W_q^T) * s.

    Args:
        x: (..., K).
        weight: int8 (N, K).
        scale: (N,) in the compute dtype.
        scale_as: scale_as(dtype) is `scale` in that dtype (kept by the caller between calls).
    """
    N, K = weight.shape
    if x.numel() == K and N >= cpu_kernels.MIN_ROWS:
        # One token through a big matrix (the decode step's lm_head): the C kernel.
        y = cpu_kernels.gemv_int8(x.reshape(-1).float(), weight, scale_as(torch.float32))
        if y is not None:
            return y.to(x.dtype).view(*x.shape[:-1], N)
    if weight.device.type == "cpu" and int_kernels_vectorized() and x.dtype != torch.float16:
        # The kernel wants scales in the activations' dtype.
        y = torch.ops.aten._weight_int8pack_mm(_kernel_input(x), weight, scale_as(torch.bfloat16))
        return y.to(x.dtype).view(*x.shape[:-1], N)
    # x (W_q * s)^T == (x W_q^T) * s: no scaled copy of the weight is made.
    return F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)


def int4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    group_size: int,
    scale_zero: torch.Tensor,
    tinygemm: bool,
    dequantize: Callable[[torch.dtype], torch.Tensor],
) -> torch.Tensor:
    """x W^T for an int4 weight (N, K): torch's tinygemm CPU kernel, with x rounded to
    bfloat16, where the weight is in its packed layout (`tinygemm`), else dequantize(x.dtype)
    and a float product.

    scale_zero: (K/g, N, 2) bfloat16 scales and zeros, as the kernel reads them.
    """
    if not tinygemm or x.dtype == torch.float16:
        return F.linear(x, dequantize(x.dtype))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(_kernel_input(x), weight, group_size, scale_zero)
    return y.to(x.dtype).view(*x.shape[:-1], scale_zero.shape[1])


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: Callable[[], torch.Tensor],
    code: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """The float weight of an NF4 tensor in one C pass on the CPU (bitsandbytes' values), or
    None where that kernel does not run: the caller then uses bitsandbytes or the reference.

    absmax() gives the float32 absmax per block of 64; called only when the kernel runs.
    """
    if packed.device.type != "cpu":
        return None
    return cpu_kernels.nf4_dequantize(packed, absmax(), code, shape, dtype)


def nf4_linear(
    x: torch.Tensor,
    dequantize: Callable[[torch.dtype], torch.Tensor],
    bnb_matmul: Callable[[torch.Tensor], torch.Tensor | None],
) -> torch.Tensor:
    """x W^T for an NF4 weight: bitsandbytes' matmul_4bit (bnb_matmul, None where it cannot
    run) off the CPU, else dequantize(x.dtype) and a float product.

    On the CPU bitsandbytes dequantizes and multiplies too (its fused kernel needs the
    `kernels` package from the hub): the C dequantization does the first part faster.
    """
    if not (x.device.type == "cpu" and cpu_kernels.library() is not None):
        y = bnb_matmul(x)
        if y is not None:
            return y
    return F.linear(x, dequantize(x.dtype))
