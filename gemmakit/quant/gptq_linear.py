"""A linear layer with GPTQ-packed 4-bit weights (calibrated 4-bit from GPTQ or AWQ).

Its state dict is the GPTQ checkpoint's own tensors (`qweight`, `qzeros`, `scales`,
`g_idx`, layout in `packed4`), so a model holding these modules writes and reads the files
transformers and vLLM load. For the matmul the weight is repacked once, on first use, into
torch's CPU int4 kernel layout (`_convert_weight_to_int4pack_for_cpu`): that kernel computes
(q - 8) * scale + zero per group, so zero = (8 - z) * scale reproduces GPTQ's (q - z) * scale;
it reads scales and zeros in bfloat16, so its products carry that rounding (as `Int4Linear`'s
do). An act-order weight (g_idx not sorted) has its input columns permuted so that groups are
contiguous, and the activations are permuted the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gemmakit import ops
from gemmakit.quant.integer import tinygemm_layout
from gemmakit.quant.linear import QuantizedEmbedding, QuantizedLinear
from gemmakit.quant.packed4 import C_CHUNK, c_layout, gptq_pack, gptq_unpack

TINYGEMM_GROUPS = (32, 64, 128, 256)  # the group sizes torch's int4 CPU kernel takes


class GPTQLinear(QuantizedLinear):
    """4-bit weight-only linear in GPTQ's v1 checkpoint layout.

    Buffers: `qweight` int32 (K/8, N), `qzeros` int32 (G, N/8), `scales` fp16 (G, N),
    `g_idx` int32 (K,).
    """

    kind = "gptq"

    def __init__(self, in_features: int, out_features: int, group_size: int, compute_dtype=torch.float32):
        super().__init__(in_features, out_features, compute_dtype)
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features // 8, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32) // group_size)
        self._kernel = None
        self._c = None

    @classmethod
    def from_quantized(cls, q: dict, group_size: int, compute_dtype=torch.float32, desc_act: bool = False):
        """From `gptq.gptq_quantize`'s levels (N, K), scales (N, G), zeros (N, G), g_idx (K,)."""
        N, K = q["levels"].shape
        module = cls(K, N, group_size, compute_dtype)
        qweight, qzeros = gptq_pack(q["levels"], q["zeros"])
        module.qweight.copy_(qweight)
        module.qzeros.copy_(qzeros)
        module.scales.copy_(q["scales"].t())
        module.g_idx.copy_(q["g_idx"])
        return module

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(levels (N, K) uint8, zeros (N, G) int32)."""
        return gptq_unpack(self.qweight, self.qzeros)

    def dequantize(self, dtype=None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        levels, zeros = self.unpacked()
        g = self.g_idx.long()
        scales = self.scales.float().t()  # (N, G)
        return ((levels.float() - zeros[:, g].float()) * scales[:, g]).to(dtype)

    def _matmul(self, x):
        kernel = self._kernel_weights(x)
        if kernel is None:
            return F.linear(x, self.dequantize(x.dtype))
        weight, scale_zero, perm = kernel
        if perm is not None:
            x = x[..., perm]
        return ops.int4_linear(x, weight, self.group_size, scale_zero, True, self.dequantize)

    def _kernel_weights(self, x):
        """(packed weight, (G, N, 2) bfloat16 scales/zeros, column permutation or None), or None
        where torch's int4 CPU kernel does not apply."""
        if self._kernel is not None:
            return self._kernel or None
        usable = (
            x.device.type == "cpu"
            and ops.int_kernels_vectorized()
            and tinygemm_layout() is not None
            and self.group_size in TINYGEMM_GROUPS
            and self.out_features % 16 == 0
        )
        self._kernel = ()
        if not usable:
            return None
        g = self.g_idx.long()
        perm = torch.argsort(g, stable=True)
        if not torch.equal(g[perm], torch.arange(self.in_features) // self.group_size):
            return None  # groups of unequal sizes: dequantize instead
        levels, zeros = self.unpacked()
        scales = self.scales.float()  # (G, N)
        zero = (8 - zeros.t().float()) * scales  # tinygemm: (q - 8) * scale + zero
        scale_zero = torch.stack([scales, zero], dim=-1).to(torch.bfloat16).contiguous()
        ordered = levels[:, perm].int().contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(ordered, 2)
        sorted_already = torch.equal(perm, torch.arange(self.in_features))
        self._kernel = (packed, scale_zero, None if sorted_already else perm)
        return self._kernel

    def c_tensors(self) -> dict | None:
        """The weights as csrc/packed4.c reads them, built once: `q` (N, K/2) uint8 in group
        order (`packed4.c_layout`), `scale` and `min` (N, G) float32 with w = q * scale + min
        (min = -zero * scale, exact), `perm` (K,) int32, the input column of each stored
        column (None when in order). None where the kernel does not take this weight (groups
        of unequal sizes, or a group size that is not a multiple of 32)."""
        if self._c is None:
            self._c = self._build_c_tensors() or ()
        return self._c or None

    def _build_c_tensors(self) -> dict | None:
        K, group_size = self.in_features, self.group_size
        if group_size % C_CHUNK or K % group_size or self.qweight.device.type != "cpu":
            return None
        g = self.g_idx.long()
        perm = torch.argsort(g, stable=True)
        if not torch.equal(g[perm], torch.arange(K) // group_size):
            return None
        levels, zeros = self.unpacked()
        scale = self.scales.float().t().contiguous()  # (N, G)
        in_order = torch.equal(perm, torch.arange(K))
        return {
            "q": c_layout(levels if in_order else levels[:, perm]),
            "scale": scale,
            "min": (-zeros.float() * scale).contiguous(),
            "perm": None if in_order else perm.to(torch.int32).contiguous(),
        }

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel = self._c = None  # new weights: repack on next use
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._kernel = self._c = None
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def swap_in_gptq(model, qweight_names, group_size: int, compute_dtype=torch.float32):
    """Replaces the linears whose `<module>.qweight` is in `qweight_names` by empty
    GPTQLinear modules of the same shape (to load a GPTQ checkpoint's tensors into)."""
    for name in qweight_names:
        path = name.removesuffix(".qweight")
        parent_name, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, leaf)
        with torch.device("cpu"):
            setattr(parent, leaf, GPTQLinear(old.in_features, old.out_features, group_size, compute_dtype))
    model.quantization = {"kind": "gptq", "group_size": group_size, "embeddings": False}
    return model


# Output-head rows converted to float32 per chunk on the torch path: bounds the temporary
# float copy to 16384 x K floats (40 MB at K = 640) instead of the whole 262,144-row matrix.
HEAD_CHUNK_ROWS = 16384
EMBEDDING_KEY = "model.embed_tokens.weight"  # the tied embedding's native state-dict name


class StoredHalfLinear(QuantizedLinear):
    """A bias-free linear whose weight stays bfloat16 as the checkpoint stores it while the
    model computes in float32: a GPTQ/AWQ checkpoint's unquantized embedding / output head.

    Products are float32 x float32(w): the bfloat16 -> float32 widening is exact, so the
    logits are those of a float32 copy of the stored weight, at half its memory and half the
    bytes per decode step (the C step reads the rows as `W_BF16`)."""

    kind = "bf16"

    def __init__(self, weight: torch.Tensor, compute_dtype=torch.float32):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, compute_dtype)
        self.register_buffer("weight", weight.detach().contiguous())

    def dequantize(self, dtype=None) -> torch.Tensor:
        return self.weight.to(dtype or self.compute_dtype)

    def rows(self, ids, dtype=None) -> torch.Tensor:
        return self.weight[ids].to(dtype or self.compute_dtype)

    def _matmul(self, x):
        if x.dtype == self.weight.dtype:
            return F.linear(x, self.weight)
        chunks = self.weight.split(HEAD_CHUNK_ROWS)
        return torch.cat([F.linear(x, chunk.to(x.dtype)) for chunk in chunks], dim=-1)


def packed_checkpoint_state(model, state: dict, quantization_config: dict, compute_dtype, path):
    """(state, head) of a GPTQ/AWQ checkpoint for `model`, whose linears named by the state's
    `qweight`s become empty `GPTQLinear`s: AWQ's tensors repacked in GPTQ's layout, and the
    bf16 tied embedding taken out (`pop_stored_head`; None when it is not kept so)."""
    from gemmakit.errors import ModelFileError
    from gemmakit.quant.packed4 import awq_state_to_gptq

    if quantization_config["quant_method"] == "awq":
        try:
            state = awq_state_to_gptq(state)
        except (ValueError, KeyError, RuntimeError) as e:
            raise ModelFileError(f"{path}: {e}") from None
    qweights = [k for k in state if k.endswith(".qweight")]
    swap_in_gptq(model, qweights, quantization_config["group_size"], compute_dtype)
    return state, pop_stored_head(state, model.config, compute_dtype)


def pop_stored_head(state: dict, config, compute_dtype) -> torch.Tensor | None:
    """The tied embedding of a GPTQ/AWQ checkpoint's state dict, taken out of `state` when it
    is stored in bfloat16 and the model computes in float32 (`swap_in_stored_head` then keeps
    it so); None (and `state` untouched) otherwise. A float16 or float32 embedding is left to
    the float32 cast: float16 values are not all bfloat16 ones."""
    weight = state.get(EMBEDDING_KEY)
    if (
        weight is None
        or not config.tie_word_embeddings
        or weight.dtype != torch.bfloat16
        or compute_dtype != torch.float32
    ):
        return None
    return state.pop(EMBEDDING_KEY)


def swap_in_stored_head(model, weight: torch.Tensor):
    """The model's tied embedding and output head as one `StoredHalfLinear` over `weight`."""
    head = StoredHalfLinear(weight, model.dtype)
    padding = getattr(model.model.embed_tokens, "padding_idx", None)
    model.lm_head = head
    model.model.embed_tokens = QuantizedEmbedding(head, padding)
    return model


def keep_head_in_bf16(model):
    """A float32 model's tied embedding / output head rounded to bfloat16 and kept so, as the
    GPTQ/AWQ folders gemmakit writes hold it (half the bytes a decode step reads; measured
    +0.02% perplexity on the bundled model, README quality section)."""
    embed = model.model.embed_tokens
    if (
        model.dtype == torch.float32
        and model.config.tie_word_embeddings
        and type(embed) is torch.nn.Embedding
    ):
        swap_in_stored_head(model, embed.weight.detach().bfloat16())
    return model


def stored_head_as_embedding(model, state: dict) -> dict:
    """`state` with a `StoredHalfLinear` head under the tied embedding's name, as checkpoints
    store it (the state dict names it `lm_head.weight`, which writers drop when tied)."""
    if isinstance(model.lm_head, StoredHalfLinear) and "lm_head.weight" in state:
        state[EMBEDDING_KEY] = state.pop("lm_head.weight")
    return state
