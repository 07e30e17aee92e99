"""RoPE frequencies as float32 values, standard library only: the torch model
(`model/layers.py`) and the torch-free generation path (`inference/gguf_step.py`) read the
same numbers, bit for bit.

Each value is transformers' compute_default_rope_parameters in float32, every step computed
in float64 and rounded once to float32: the exponent 2i / head_dim, the power base^exponent,
its reciprocal, the division by the scaling factor. A float32 quotient computed in float64 and
rounded is the correctly rounded one (53 >= 2 * 24 + 2 bits; Figueroa, "When is double
rounding innocuous?", 1995); torch's vectorized float32 pow (Sleef, 1 ulp) differs from the
power rounded from float64 in 1-3 of 128 entries for head_dim 256, so computed here the
model's frequencies do not depend on torch's build, and the torch-free path reads the same.
"""

from __future__ import annotations

from array import array


def _f32(x: float) -> float:
    """x rounded to float32 (and back to a Python float, exactly)."""
    return array("f", [x])[0]


def rope_frequencies(head_dim: int, base: float, scale: float = 1.0, partial: float = 1.0) -> array:
    """The head_dim / 2 RoPE frequencies of a head, float32 (`array("f")`).

    Linear scaling divides the frequencies (positions / factor). With `partial` < 1
    ("proportional" RoPE, Gemma 4's global layers) only the first int(partial * head_dim // 2)
    rotate, their exponents still over the full head_dim; the rest are zero, so those dims
    pass through unrotated (transformers modeling_rope_utils._compute_proportional_rope_parameters).
    """
    rotated = int(partial * head_dim // 2)
    base, scale = _f32(base), _f32(scale)
    values = []
    for i in range(head_dim // 2):
        if i >= rotated:
            values.append(0.0)
            continue
        exponent = _f32(2 * i / head_dim)
        values.append(_f32(_f32(1.0 / _f32(base**exponent)) / scale))
    return array("f", values)
