"""Exact parameter accounting and memory planning from a config alone: no weights are read.

Every count comes from one tensor list (`Architecture.tensors()`, under Hugging Face's
state-dict names), so totals, the embedding split, per-precision weight bytes and the GGUF
type of each tensor all agree by construction. Gemma configs (`GemmaConfig`, a config.json, a
GGUF header) and the Llama, Mistral and Qwen2 families map into the same `Architecture`, which
is what lets the article's "7B" comparison run from the models' real config.json files.

Units: bytes everywhere; the printed GB is 10**9 bytes. Estimates state their rule in the
docstring of the function that makes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gemmakit.config import FULL, SLIDING, GemmaConfig, from_hf_config
from gemmakit.errors import ConfigError, ModelFileError

GB = 10**9

# --- The architecture description --------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    name: str  # HF state-dict name
    shape: tuple[int, ...]  # PyTorch order: (out_features, in_features) for linears
    # llama.cpp's tensor kind (token_embd, output, attn_q, attn_k, attn_v, attn_output,
    # ffn_gate, ffn_up, ffn_down), or "norm" / "bias"; the GGUF quantization rules key on it.
    kind: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_embedding(self) -> bool:
        return self.kind in ("token_embd", "output")

    @property
    def is_linear(self) -> bool:
        """A projection inside a block: what bitsandbytes quantizes and LoRA adapts."""
        return self.kind.startswith(("attn_", "ffn_")) and len(self.shape) == 2


LINEAR_KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# The article's LoRA targets (q/k/v/o/gate/up/down projections).
DEFAULT_LORA_TARGETS = LINEAR_KINDS


@dataclass(frozen=True)
class Architecture:
    """What parameter and memory accounting needs to know about a decoder-only model."""

    name: str
    # The HF model_type: gemma, gemma2, gemma3_text, llama, mistral, qwen2.
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    # "full_attention" / "sliding_attention" per layer.
    layer_types: tuple[str, ...]
    max_position_embeddings: int
    tie_word_embeddings: bool
    sliding_window: int | None = None
    # RMSNorms inside each block: 2 (Gemma 1, Llama-style), 4 (Gemma 2/3 sandwich norms).
    norms_per_layer: int = 2
    # Gemma 3: RMSNorm over head_dim on q and k.
    qk_norm: bool = False
    # Qwen2: biases on q, k and v (not on o).
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    activation: str = "SwiGLU (SiLU)"
    rope_theta: float = 10000.0
    # RoPE base of the sliding layers when it differs from rope_theta (Gemma 3).
    rope_local_base_freq: float | None = None
    rope_scaling: str | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # Gemma multiplies the embeddings by sqrt(hidden_size).
    embedding_scaled: bool = False
    # Gemma 1/2 technical reports count a vocabulary padded to 256,128 rows.
    report_vocab_size: int | None = None
    # Vision tower + projector of a multimodal checkpoint (not part of the text model).
    vision_params: int = 0
    # Where the description came from: preset, config.json, GGUF.
    source: str = ""
    architecture: str = ""

    def __post_init__(self):
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(f"{self.name}: layer_types must cover all {self.num_layers} layers")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{self.name}: {self.num_heads} attention heads are not a multiple of "
                f"{self.num_kv_heads} key/value heads"
            )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_kind(self) -> str:
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        if self.num_kv_heads == 1:
            return "MQA"
        return f"GQA ({self.num_heads // self.num_kv_heads}:1)"

    @property
    def num_sliding(self) -> int:
        return sum(t == SLIDING for t in self.layer_types)

    @property
    def num_global(self) -> int:
        return self.num_layers - self.num_sliding

    def tensors(self) -> list[Tensor]:
        """Every parameter tensor, in the order llama.cpp's converter writes them."""
        H, V, inter = self.hidden_size, self.vocab_size, self.intermediate_size
        out = [Tensor("model.embed_tokens.weight", (V, H), "token_embd")]
        norm_names = ["input_layernorm", "post_attention_layernorm"]
        if self.norms_per_layer == 4:
            norm_names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        elif self.norms_per_layer != 2:
            raise ConfigError(f"{self.name}: {self.norms_per_layer} norms per layer is not supported")
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            for proj, kind, rows in (
                ("q_proj", "attn_q", self.q_dim),
                ("k_proj", "attn_k", self.kv_dim),
                ("v_proj", "attn_v", self.kv_dim),
            ):
                out.append(Tensor(f"{p}self_attn.{proj}.weight", (rows, H), kind))
                if self.qkv_bias:
                    out.append(Tensor(f"{p}self_attn.{proj}.bias", (rows,), "bias"))
            out.append(Tensor(f"{p}self_attn.o_proj.weight", (H, self.q_dim), "attn_output"))
            if self.o_bias:
                out.append(Tensor(f"{p}self_attn.o_proj.bias", (H,), "bias"))
            if self.qk_norm:
                out.append(Tensor(f"{p}self_attn.q_norm.weight", (self.head_dim,), "norm"))
                out.append(Tensor(f"{p}self_attn.k_norm.weight", (self.head_dim,), "norm"))
            for proj, kind, shape in (
                ("gate_proj", "ffn_gate", (inter, H)),
                ("up_proj", "ffn_up", (inter, H)),
                ("down_proj", "ffn_down", (H, inter)),
            ):
                out.append(Tensor(f"{p}mlp.{proj}.weight", shape, kind))
                if self.mlp_bias:
                    out.append(Tensor(f"{p}mlp.{proj}.bias", (shape[0],), "bias"))
            out += [Tensor(f"{p}{n}.weight", (H,), "norm") for n in norm_names]
        out.append(Tensor("model.norm.weight", (H,), "norm"))
        if not self.tie_word_embeddings:
            out.append(Tensor("lm_head.weight", (V, H), "output"))
        return out


# --- Building an Architecture ------------------------------------------------------------


def from_gemma_config(cfg: GemmaConfig, name: str | None = None, source: str = "") -> Architecture:
    factor = cfg.rope_scaling_factor
    return Architecture(
        name=name or cfg.name or cfg.model_type,
        model_type=cfg.model_type,
        architecture=cfg.architecture,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        layer_types=cfg.layer_types,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        sliding_window=cfg.sliding_window if SLIDING in cfg.layer_types else None,
        norms_per_layer=4 if cfg.use_post_norms else 2,
        qk_norm=cfg.use_qk_norm,
        activation="GeGLU (tanh GELU)",
        rope_theta=cfg.rope_theta,
        rope_local_base_freq=cfg.rope_local_base_freq if SLIDING in cfg.layer_types else None,
        rope_scaling=f"linear x{factor:g} on global layers" if factor != 1.0 else None,
        attn_logit_softcapping=cfg.attn_logit_softcapping,
        final_logit_softcapping=cfg.final_logit_softcapping,
        embedding_scaled=True,
        # Gemma and Gemma 2 reports (arXiv 2403.08295 Table 2, 2408.00118) and gemma.cpp
        # count 256,128 embedding rows; config.json and the checkpoints hold 256,000.
        report_vocab_size=256128
        if cfg.vocab_size == 256000 and cfg.model_type in ("gemma", "gemma2")
        else None,
        source=source,
    )


# transformers' Gemma3TextConfig defaults: the original gemma-3-{4,12,27}b config.json files
# give only the keys that differ from them inside text_config.
_GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262208, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    query_pre_attn_scalar=256, max_position_embeddings=131072, rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0, sliding_window=4096, rms_norm_eps=1e-6,
)  # fmt: skip

_LLAMA_FAMILIES = {
    # architecture -> (model_type, q/k/v bias, sliding window honoured)
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_GEMMA_MODEL_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text")
_GEMMA_ARCHS = (
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration",
)
# Keys that mean a different parameter layout than the dense decoder counted here.
_UNSUPPORTED_KEYS = ("num_local_experts", "num_experts", "moe_intermediate_size", "n_routed_experts")


def from_hf_dict(raw: dict[str, Any], name: str, source: str = "config.json") -> Architecture:
    """An Architecture from a transformers config.json dict (Gemma 1/2/3, Llama, Mistral, Qwen2).

    Gemma configs go through `gemmakit.config.from_hf_config`, so inspect reads them exactly as
    the model loader does.

    Raises:
        ConfigError: an architecture outside those families, or a mixture-of-experts config.
    """
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type", "")
    if any(a in _GEMMA_ARCHS for a in archs) or model_type in _GEMMA_MODEL_TYPES:
        return _gemma_from_hf(raw, name, source)
    family = next((_LLAMA_FAMILIES[a] for a in archs if a in _LLAMA_FAMILIES), None)
    family = family or (model_type if model_type in _LLAMA_FAMILIES.values() else None)
    if family is None:
        found = ", ".join(archs) or model_type or "none given"
        raise ConfigError(
            f"{name}: architecture {found} is not one inspect can count; it reads Gemma 1/2/3, "
            "Llama, Mistral and Qwen2 configs"
        )
    moe = [k for k in _UNSUPPORTED_KEYS if raw.get(k)]
    if moe:
        raise ConfigError(f"{name}: mixture-of-experts configs ({', '.join(moe)}) are not supported")
    try:
        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        layers, inter = int(raw["num_hidden_layers"]), int(raw["intermediate_size"])
        vocab = int(raw["vocab_size"])
    except KeyError as e:
        raise ConfigError(f"{name}: config.json lacks {e.args[0]!r}") from None
    head_dim = raw.get("head_dim") or hidden // heads
    window = raw.get("sliding_window")
    if family == "mistral":  # every layer slides when a window is set (Mistral 7B v0.1: 4096)
        types = (SLIDING if window else FULL,) * layers
    elif family == "qwen2" and raw.get("use_sliding_window") and window:
        # transformers Qwen2: layers from max_window_layers on use the window.
        first = int(raw.get("max_window_layers", layers))
        types = tuple(SLIDING if i >= first else FULL for i in range(layers))
    else:
        types = (FULL,) * layers
    scaling = raw.get("rope_scaling") or None
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type") or "?"
        scaling = f"{kind} x{scaling.get('factor', 1):g}"
    attention_bias = bool(raw.get("attention_bias", False))
    return Architecture(
        name=name,
        model_type=family,
        architecture=next(iter(archs), ""),
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        layer_types=types,
        max_position_embeddings=int(raw.get("max_position_embeddings") or 2048),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        sliding_window=int(window) if window and SLIDING in types else None,
        # transformers' Qwen2Attention hard-codes bias=True on q/k/v and False on o.
        qkv_bias=family == "qwen2" or attention_bias,
        o_bias=family == "llama" and attention_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        rope_theta=float(raw.get("rope_theta") or 10000.0),
        rope_scaling=scaling,
        source=source,
    )


def _gemma_from_hf(raw: dict[str, Any], name: str, source: str) -> Architecture:
    raw = dict(raw)
    vision = 0
    if "text_config" in raw or raw.get("model_type") == "gemma3":
        text = {**_GEMMA3_TEXT_DEFAULTS, **(raw.get("text_config") or {})}
        vision = siglip_params(raw.get("vision_config") or {}, int(text.get("hidden_size", 0)))
        raw["text_config"] = text
    # gemma-2-9b's config.json repeats the window under an older key; equal values are harmless.
    if raw.get("sliding_window_size") in (None, raw.get("sliding_window")):
        raw.pop("sliding_window_size", None)
    try:
        cfg = from_hf_config(raw, name=name)
    except KeyError as e:
        raise ConfigError(f"{name}: config.json lacks {e.args[0]!r}") from None
    arch = from_gemma_config(cfg, name=name, source=source)
    if vision:
        arch = _replace(arch, vision_params=vision, architecture="Gemma3ForConditionalGeneration")
    return arch


def siglip_params(vision: dict[str, Any], text_hidden: int) -> int:
    """SigLIP vision tower (no pooling head) plus Gemma 3's projection into the text width.

    transformers SiglipVisionModel: a patch conv with bias, a position embedding per patch,
    per layer two LayerNorms (weight + bias), q/k/v/o and fc1/fc2 with biases, a final
    LayerNorm; Gemma3MultiModalProjector: a (vision, text) matrix and an RMSNorm.
    """
    if not vision:
        return 0
    d, inter = int(vision.get("hidden_size", 1152)), int(vision.get("intermediate_size", 4304))
    layers, patch = int(vision.get("num_hidden_layers", 27)), int(vision.get("patch_size", 14))
    image, channels = int(vision.get("image_size", 896)), int(vision.get("num_channels", 3))
    per_layer = 2 * 2 * d + 4 * (d * d + d) + (d * inter + inter) + (inter * d + d)
    embed = channels * patch * patch * d + d + (image // patch) ** 2 * d
    head = (
        0
        if not vision.get("vision_use_head", False)
        else d * d * 4 + 4 * d + d * inter * 2 + inter + d + 3 * d
    )
    projector = d * text_hidden + d
    return embed + layers * per_layer + 2 * d + head + projector


def from_gguf(g) -> Architecture:
    """An Architecture from a GGUF header (`gemmakit.formats.gguf.GGUFFile`); no tensor data is read."""
    from gemmakit.formats.gguf import GGUF_ARCHITECTURES, config_from_gguf

    arch = g.architecture
    if arch in GGUF_ARCHITECTURES:
        return from_gemma_config(config_from_gguf(g), name=g.path.stem, source="GGUF")
    md = g.metadata
    if arch not in ("llama", "qwen2"):
        raise ModelFileError(
            f"{g.path}: GGUF architecture {arch or 'missing'!r}; inspect reads gemma, gemma2, "
            "gemma3, llama and qwen2 GGUF files"
        )

    def get(key, default=None):
        value = md.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelFileError(f"{g.path}: metadata key {arch}.{key} is missing")
        return value

    hidden, heads, layers = (
        int(get("embedding_length")),
        int(get("attention.head_count")),
        int(get("block_count")),
    )
    window = md.get(f"{arch}.attention.sliding_window")
    types = (SLIDING if window else FULL,) * layers
    return Architecture(
        name=g.path.stem, model_type=arch, architecture=arch, source="GGUF",
        vocab_size=g.tensors["token_embd.weight"].shape[0], hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")), num_layers=layers, num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", hidden // heads)), layer_types=types,
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in g.tensors,
        sliding_window=int(window) if window else None,
        qkv_bias="blk.0.attn_q.bias" in g.tensors, rope_theta=float(get("rope.freq_base", 10000.0)),
    )  # fmt: skip


def _replace(arch: Architecture, **changes) -> Architecture:
    import dataclasses

    return dataclasses.replace(arch, **changes)


# --- Parameter counts ---------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCounts:
    # Text model: every tensor, tied embeddings once.
    text: int
    # Input embedding, plus the output projection when it is not tied.
    embedding: int
    non_embedding: int
    # Vision tower and projector of a multimodal checkpoint (0 for text models).
    vision: int = 0
    # What the Gemma 1/2 reports print for the embedding (padded vocabulary), if different.
    report_embedding: int | None = None

    @property
    def total(self) -> int:
        return self.text + self.vision


def count_params(arch: Architecture) -> ParamCounts:
    tensors = arch.tensors()
    text = sum(t.numel for t in tensors)
    embedding = sum(t.numel for t in tensors if t.is_embedding)
    report = None
    if arch.report_vocab_size and arch.report_vocab_size != arch.vocab_size:
        copies = 1 if arch.tie_word_embeddings else 2
        report = copies * arch.report_vocab_size * arch.hidden_size
    return ParamCounts(text, embedding, text - embedding, arch.vision_params, report)


# --- Weight memory ---------------------------------------------------------------------------

# GGML block sizes and bytes per block (llama.cpp gguf-py constants.GGML_QUANT_SIZES).
GGML_BLOCKS = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18),
    "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q4_K": (256, 144),
    "Q5_K": (256, 176), "Q6_K": (256, 210),
}  # fmt: skip
GGUF_FTYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K"}
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "nf4", "q8_0", "q4_0", "q4_k_m")

# bitsandbytes NF4 with double quantization (QLoRA paper §3, bitsandbytes functional.py):
# 4-bit codes, one 8-bit absmax per 64 weights, one fp32 absmax per 256 of those.
NF4_BLOCK, NF4_DQ_BLOCK = 64, 256
NF4_BITS_PER_WEIGHT = 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * NF4_DQ_BLOCK)  # 4.127


def nf4_bytes(numel: int) -> int:
    """Bytes of one NF4+DQ tensor: packed codes, 8-bit block absmax, fp32 second-level absmax."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NF4_DQ_BLOCK)


def int8_bytes(t: Tensor) -> int:
    """LLM.int8 (bitsandbytes Linear8bitLt): int8 weights plus one fp32 scale per output row."""
    return t.numel + 4 * t.shape[0]


def weight_bytes(arch: Architecture, precision: str) -> int:
    """Bytes of the text model's weights in one precision.

    int8 and nf4 follow bitsandbytes through transformers: only the projections inside the
    blocks are quantized; embeddings, lm_head, norms and biases stay 16-bit. The GGUF types
    follow llama.cpp's quantizer (`gguf_tensor_types`) and count tensor data only.
    """
    tensors = arch.tensors()
    if precision == "fp32":
        return 4 * sum(t.numel for t in tensors)
    if precision in ("bf16", "fp16"):
        return 2 * sum(t.numel for t in tensors)
    if precision in ("int8", "nf4"):
        quant = int8_bytes if precision == "int8" else (lambda t: nf4_bytes(t.numel))
        return sum(quant(t) if t.is_linear else 2 * t.numel for t in tensors)
    if precision in GGUF_FTYPES:
        return sum(gguf_bytes(arch, precision).values())
    raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    # llama.cpp src/llama-quant.cpp, use_more_bits: first and last eighth, every third between.
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def gguf_tensor_types(arch: Architecture, ftype: str) -> dict[str, str]:
    """The GGML type llama-quantize gives each tensor for ftype q8_0, q4_0 or q4_k_m.

    The rule, from llama.cpp src/llama-quant.cpp (llama_tensor_get_type):
      * 1-D tensors (norms, biases) stay F32;
      * the output matrix (or, when tied, token_embd) becomes Q6_K, or Q8_0 if its rows
        are not a multiple of the base type's block; Q8_0 files keep it Q8_0;
      * Q4_K_M: Q4_K everywhere, except attn_v and ffn_down on the layers where
        use_more_bits(i, n) holds (first and last eighth, every third between): Q6_K;
      * k-quants need rows that are a multiple of 256: otherwise Q4_K falls back to Q5_0,
        Q5_K to Q5_1, Q6_K to Q8_0 (and anything else to F16).
    """
    if ftype not in GGUF_FTYPES:
        raise ValueError(f"unknown GGUF type {ftype!r}; known: {', '.join(GGUF_FTYPES)}")
    base = GGUF_FTYPES[ftype]
    tensors = arch.tensors()
    n_v = sum(t.kind == "attn_v" for t in tensors)
    n_down = sum(t.kind == "ffn_down" for t in tensors)
    i_v = i_down = 0
    out = {}
    for t in tensors:
        if len(t.shape) < 2:
            out[t.name] = "F32"
            continue
        row = t.shape[-1]  # ggml ne[0]
        new = base
        if t.kind == "output" or (t.kind == "token_embd" and arch.tie_word_embeddings):
            if row % GGML_BLOCKS[base][0]:
                new = "Q8_0"
            elif base != "Q8_0":
                new = "Q6_K"
        elif t.kind == "attn_v":
            if ftype == "q4_k_m" and _use_more_bits(i_v, n_v):
                new = "Q6_K"
            i_v += 1
        elif t.kind == "ffn_down":
            if ftype == "q4_k_m" and _use_more_bits(i_down, n_down):
                new = "Q6_K"
            i_down += 1
        if row % GGML_BLOCKS[new][0]:
            new = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}.get(new, "F16")
            if row % GGML_BLOCKS[new][0]:
                new = "F16"
        out[t.name] = new
    return out


def ggml_nbytes(numel: int, ggml_type: str) -> int:
    block, size = GGML_BLOCKS[ggml_type]
    return numel // block * size


def gguf_bytes(arch: Architecture, ftype: str) -> dict[str, int]:
    """Tensor-data bytes per GGML type of a llama-quantize'd file (see gguf_tensor_types)."""
    types = gguf_tensor_types(arch, ftype)
    out: dict[str, int] = {}
    for t in arch.tensors():
        out[types[t.name]] = out.get(types[t.name], 0) + ggml_nbytes(t.numel, types[t.name])
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# --- KV cache ----------------------------------------------------------------------------------

KV_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


@dataclass(frozen=True)
class KVCacheSize:
    dtype: str
    context: int
    batch: int
    # 2 (K and V) * layers * kv_heads * head_dim * bytes: a token in every layer.
    bytes_per_token: float
    # With sliding layers capped at their window (a ring buffer, as gemmakit's cache does).
    total: int
    # Every layer holding the whole context (what a cache unaware of windows allocates).
    total_no_window: int


def kv_cache(arch: Architecture, context: int, batch: int = 1, dtype: str = "bf16") -> KVCacheSize:
    per_layer_token = 2 * arch.num_kv_heads * arch.head_dim * KV_BYTES[dtype]
    slots = sum(min(context, arch.sliding_window) if t == SLIDING and arch.sliding_window else context
                for t in arch.layer_types)  # fmt: skip
    return KVCacheSize(
        dtype=dtype,
        context=context,
        batch=batch,
        bytes_per_token=per_layer_token * arch.num_layers,
        total=round(batch * slots * per_layer_token),
        total_no_window=round(batch * context * arch.num_layers * per_layer_token),
    )


# --- Activations -------------------------------------------------------------------------------

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def inference_activation_bytes(arch: Architecture, batch: int, tokens: int, dtype: str = "fp32") -> int:
    """Peak transient memory of one no-grad forward over `tokens` new tokens (all logits kept).

    The largest live set is either the MLP (hidden state, its norm, and three intermediate-
    sized tensors: gelu(gate), up and their product) or the end (hidden state plus the logits
    over the whole vocabulary, which dominate for Gemma's 256k vocabulary).
    """
    a = DTYPE_BYTES[dtype]
    n = batch * tokens
    mlp = n * a * (3 * arch.hidden_size + 3 * arch.intermediate_size)
    # Attention with a boolean mask: q, k, v, output and one head's scores at a time.
    attn = (
        n * a * (3 * arch.hidden_size + 2 * arch.q_dim + 2 * arch.kv_dim)
        + batch * arch.num_heads * tokens * tokens * 4
    )
    logits = n * a * (2 * arch.hidden_size + arch.vocab_size * (2 if arch.final_logit_softcapping else 1))
    return max(mlp, attn, logits)


def lora_params(arch: Architecture, rank: int, targets=DEFAULT_LORA_TARGETS) -> int:
    """Adapter parameters: rank * (in + out) per adapted projection."""
    return sum(rank * (t.shape[0] + t.shape[1]) for t in arch.tensors() if t.kind in targets and t.is_linear)


def _activation_bytes_per_token_layer(
    arch: Architecture, a: int, full: bool, lora: dict | None, cpu_kernels: bool = False
) -> float:
    """Bytes autograd keeps per token per block for the backward pass (fused attention).

    PyTorch saves a linear layer's input only when its weight is trained, so the items are:
      * each RMSNorm keeps its float32 input (4 B per channel), and its float32 normalized
        output too when the norm weight is trained (full fine-tuning); QK-norm likewise over
        q and k;
      * fused attention (SDPA) keeps q, k, v and its output (a each), no T x T matrix; eager
        soft-capped attention is added by the caller;
      * the GeGLU/SwiGLU MLP keeps gate, act(gate) and up (a each);
      * full fine-tuning adds the inputs of the trained projections: q/k/v (shared), o,
        gate/up (shared) and down (a each);
      * LoRA: gemmakit's LoRALinear casts the adapters to the activations' dtype (PEFT casts
        the input to float32 instead), so what they keep is in the compute dtype (a). With
        dropout, each adapted projection keeps its dropped-out input and the dropout mask:
        PyTorch's CPU dropout multiplies by a noise tensor of the input's dtype (a; CUDA's
        fused kernel keeps a 1 B bool mask, so a is an upper bound there). Without dropout
        they keep the inputs themselves, shared as above. Plus the rank-r intermediate (a).
        Not per token, so left out: below float32, the adapters' copies in the compute
        dtype (a B per adapter parameter per forward; 7.6 MB for the 270M at r=16).
    Checked against the tensors autograd saves on Gemma 3 270M (LoRA r=16, dropout 0.05,
    batch 2 x 128, float32 and bfloat16): within 0.2% per token and layer.
    `cpu_kernels`: gemmakit's LoRA trainer on the CPU, where a frozen norm keeps its input in
    the compute dtype (its backward is one C pass), GeGLU keeps gate and up only (its
    backward recomputes the activation in C), and an adapter keeps no dropped-out copy or
    mask (the mask is rebuilt from a seed): the shared inputs and the rank-r output only.
    """
    hidden, inter, q, kv = arch.hidden_size, arch.intermediate_size, arch.q_dim, arch.kv_dim
    norm_bytes = 8 if full else (a if cpu_kernels else 4)
    total = arch.norms_per_layer * hidden * norm_bytes
    if arch.qk_norm:
        total += (q + kv) * norm_bytes
    total += a * (2 * q + 2 * kv)  # SDPA: q, k, v, output
    total += a * (2 if cpu_kernels else 3) * inter  # MLP: gate, act(gate) (not in C), up
    linear_inputs = a * (hidden + q + hidden + inter)
    if full:
        total += linear_inputs
    if lora:
        dropout = lora["dropout"] > 0 and not cpu_kernels
        if not dropout:  # the inputs as they are, shared by q/k/v and gate/up
            total += linear_inputs
        adapted = [t for t in arch.tensors() if t.kind in lora["targets"] and t.is_linear]
        adapted = adapted[: len(adapted) // arch.num_layers]
        for t in adapted:
            # dropout output + its mask, both (B, T, in) in the compute dtype; A's output.
            total += (2 * a * t.shape[1] if dropout else 0) + a * lora["rank"]
    return total


def _eager_attention_bytes_per_token_layer(arch: Architecture, a: int, seq_len: int) -> float:
    """Soft-capped (Gemma 2) attention runs eagerly: repeated K/V and the T x S score maps."""
    if arch.attn_logit_softcapping is None:
        return 0.0
    groups_kv = 2 * a * arch.q_dim if arch.num_kv_heads != arch.num_heads else 0
    # tanh output (a), float32 softmax output (4), probabilities in the compute dtype (a).
    return groups_kv + arch.num_heads * seq_len * (2 * a + 4)


# --- Training memory ---------------------------------------------------------------------------

TRAINING_METHODS = {
    # key: (label, weights trained, base weights stored as, optimizer)
    "full": ("full fine-tune, AdamW", "all", None, "adamw"),
    "full_8bit": ("full fine-tune, 8-bit AdamW", "all", None, "adamw8bit"),
    "lora": ("LoRA, AdamW", "lora", None, "adamw"),
    "qlora": ("QLoRA (NF4), paged 8-bit AdamW", "lora", "nf4", "adamw8bit"),
}
# bitsandbytes 8-bit optimizers: two uint8 states with one fp32 absmax per 256-value block;
# tensors under 4096 values keep 32-bit states (Optimizer8bit min_8bit_size).
ADAM8_BLOCK, ADAM8_MIN_SIZE = 256, 4096


def _adam_bytes(sizes: list[int], optimizer: str) -> int:
    if optimizer == "adamw":
        return 8 * sum(sizes)
    return sum(2 * n + 8 * math.ceil(n / ADAM8_BLOCK) if n >= ADAM8_MIN_SIZE else 8 * n for n in sizes)


def logits_bytes_per_token(arch: Architecture, a: int) -> int:
    """Cross-entropy over the vocabulary, per token: logits in the compute dtype, their float32
    copy (skipped when computing in fp32), the soft-capped float32 logits (Gemma 2), the
    float32 log-softmax kept for backward, and the float32 gradient made during backward."""
    per_logit = a + (4 if a < 4 else 0) + (4 if arch.final_logit_softcapping else 0) + 4 + 4
    return arch.vocab_size * per_logit


def training_memory(
    arch: Architecture,
    method: str,
    batch: int = 4,
    seq_len: int = 512,
    dtype: str = "bf16",
    lora_rank: int = 16,
    lora_dropout: float = 0.05,
    ce_chunk: int = 256,
    cpu_kernels: bool = False,
) -> dict[str, Any]:
    """Memory of one training step of the text model, item by item (bytes).

    `cpu_kernels` models gemmakit's own LoRA trainer on the CPU (see
    `_activation_bytes_per_token_layer`; its loss keeps no float32 logits: a float32 head's
    loss is one attention call, a bfloat16 chunk's gradient is made in place); the default is
    the generic plain-PyTorch step.

    * weights: full fine-tuning keeps all weights in `dtype` (no fp32 master copy); LoRA keeps
      the frozen base in `dtype`, QLoRA in NF4+DQ with embeddings and norms in 16-bit, and
      both add fp32 adapters (rank `lora_rank` on q/k/v/o/gate/up/down);
    * gradients: one per trained weight, in its dtype;
    * optimizer: AdamW keeps two fp32 states per trained weight (8 B); 8-bit AdamW two uint8
      states plus an fp32 absmax per 256 values (tensors under 4096 values stay 32-bit);
    * activations: see `_activation_bytes_per_token_layer`, times layers and batch * seq_len;
      with gradient checkpointing only each block's input is kept (a B per channel), plus one
      block's activations while it is recomputed;
    * logits: `logits_bytes_per_token` times batch * seq_len tokens, or times `ce_chunk`
      tokens for a chunked cross-entropy that never builds the whole (B, T, V) tensor.
    """
    if method not in TRAINING_METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(TRAINING_METHODS)}")
    label, trained, base_format, optimizer = TRAINING_METHODS[method]
    a = DTYPE_BYTES[dtype]
    tensors = arch.tensors()
    n_tokens = batch * seq_len
    if trained == "all":
        sizes = [t.numel for t in tensors]
        trainable = sum(sizes)
        weights = a * trainable
        grads = a * trainable
        lora = None
    else:
        sizes = [
            lora_rank * d
            for t in tensors
            if t.kind in DEFAULT_LORA_TARGETS and t.is_linear
            for d in (t.shape[1], t.shape[0])  # A: (r, in), B: (out, r)
        ]
        trainable = sum(sizes)
        base = weight_bytes(arch, "nf4") if base_format == "nf4" else a * sum(t.numel for t in tensors)
        weights = base + 4 * trainable
        grads = 4 * trainable
        lora = {"rank": lora_rank, "dropout": lora_dropout, "targets": DEFAULT_LORA_TARGETS}
    opt = _adam_bytes(sizes, optimizer)
    cpu_kernels = cpu_kernels and lora is not None
    per_layer = _activation_bytes_per_token_layer(arch, a, trained == "all", lora, cpu_kernels)
    per_layer += _eager_attention_bytes_per_token_layer(arch, a, seq_len)
    # Outside the blocks: the scaled embedding output and the final norm's float32 input.
    outside = n_tokens * (a * arch.hidden_size + 4 * arch.hidden_size)
    activations = round(n_tokens * per_layer * arch.num_layers + outside)
    checkpointed = round(n_tokens * (a * arch.hidden_size * arch.num_layers + per_layer) + outside)
    per_token_logits = logits_bytes_per_token(arch, a)
    if cpu_kernels and arch.final_logit_softcapping is None:
        # float32: the attention call's output and the target rows, (N, C) each; bfloat16:
        # the chunk's logits, overwritten by their gradient.
        per_token_logits = 8 * arch.hidden_size if a == 4 else a * arch.vocab_size
    logits_full = n_tokens * per_token_logits
    logits_chunked = min(n_tokens, ce_chunk) * per_token_logits
    fixed = weights + grads + opt
    return {
        "label": label,
        "optimizer": optimizer,
        "trainable_params": trainable,
        "weights": weights,
        "gradients": grads,
        "optimizer_states": opt,
        "activations": activations,
        "activations_checkpointed": checkpointed,
        "logits": logits_full,
        "logits_chunked": logits_chunked,
        "total": fixed + activations + logits_full,
        "total_checkpointed_chunked": fixed + checkpointed + logits_chunked,
    }


# --- The whole report --------------------------------------------------------------------------


@dataclass
class Options:
    context: int | None = None  # None: each model's max_position_embeddings
    batch: int | None = None  # None: 1 for the KV cache, 4 for training (the article's recipe)
    seq_len: int = 512
    kv_dtype: str = "bf16"
    train_dtype: str = "bf16"
    lora_rank: int = 16
    ce_chunk: int = 256


@dataclass
class Report:
    arch: Architecture
    params: ParamCounts
    memory: dict[str, int]
    kv: KVCacheSize
    training: dict[str, dict[str, Any]]
    train_batch: int
    chunk_tokens: int = 256
    gguf_file: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self, options: Options) -> dict[str, Any]:
        a = self.arch
        out = {
            "name": a.name,
            "source": a.source,
            "architecture": a.architecture,
            "model_type": a.model_type,
            "total_params": self.params.total,
            "text_params": self.params.text,
            "embedding_params": self.params.embedding,
            "non_embedding_params": self.params.non_embedding,
            "vision_params": self.params.vision,
            "report_embedding_params": self.params.report_embedding,
            "config": {
                "vocab_size": a.vocab_size,
                "hidden_size": a.hidden_size,
                "intermediate_size": a.intermediate_size,
                "num_layers": a.num_layers,
                "num_heads": a.num_heads,
                "num_kv_heads": a.num_kv_heads,
                "attention": a.attention_kind.split(" ")[0],
                "head_dim": a.head_dim,
                "max_position_embeddings": a.max_position_embeddings,
                "global_layers": a.num_global,
                "sliding_layers": a.num_sliding,
                "sliding_window": a.sliding_window,
                "rope_theta": a.rope_theta,
                "rope_local_base_freq": a.rope_local_base_freq,
                "rope_scaling": a.rope_scaling,
                "attn_logit_softcapping": a.attn_logit_softcapping,
                "final_logit_softcapping": a.final_logit_softcapping,
                "tie_word_embeddings": a.tie_word_embeddings,
                "norms_per_layer": a.norms_per_layer,
                "qk_norm": a.qk_norm,
                "qkv_bias": a.qkv_bias,
                "activation": a.activation,
            },
            "memory": dict(self.memory),
            "kv_cache": {
                "dtype": self.kv.dtype,
                "context": self.kv.context,
                "batch": self.kv.batch,
                "bytes_per_token": self.kv.bytes_per_token,
                "bytes": self.kv.total,
                "bytes_no_window": self.kv.total_no_window,
            },
            "training": {
                "batch": self.train_batch,
                "seq_len": options.seq_len,
                "dtype": options.train_dtype,
                "lora_rank": options.lora_rank,
                "ce_chunk_tokens": options.ce_chunk,
                "methods": self.training,
            },
            "notes": self.notes,
        }
        if self.gguf_file:
            out["gguf_file"] = self.gguf_file
        return out


def make_report(arch: Architecture, options: Options | None = None) -> Report:
    o = options or Options()
    params = count_params(arch)
    memory = {p: weight_bytes(arch, p) for p in PRECISIONS}
    context = o.context or arch.max_position_embeddings
    kv = kv_cache(arch, context, o.batch or 1, o.kv_dtype)
    train_batch = o.batch or 4
    training = {
        m: training_memory(arch, m, train_batch, o.seq_len, o.train_dtype, o.lora_rank, ce_chunk=o.ce_chunk)
        for m in TRAINING_METHODS
    }
    report = Report(arch, params, memory, kv, training, train_batch, o.ce_chunk)
    report.notes = notes(report)
    return report


def _is_gemma_7b(a: Architecture) -> bool:
    return (a.vocab_size, a.hidden_size, a.num_layers, a.num_heads, a.model_type) == (
        256000,
        3072,
        28,
        16,
        "gemma",
    )


def notes(r: Report) -> list[str]:
    """Remarks printed under a model's numbers: where public figures differ, and why."""
    a, p, out = r.arch, r.params, []
    if p.report_embedding:
        out.append(
            f"The Gemma technical reports count {p.report_embedding:,} embedding parameters: "
            f"a vocabulary padded to {a.report_vocab_size:,} rows ({a.report_vocab_size:,} x "
            f"{a.hidden_size:,}); config.json and the checkpoint hold {a.vocab_size:,} rows "
            f"({p.embedding:,}). Non-embedding counts agree exactly."
        )
    if p.vision:
        out.append(
            f"Multimodal checkpoint: {p.vision:,} vision parameters (SigLIP tower + projector) "
            f"are in the total; memory and training figures are for the {p.text:,}-parameter "
            "text model gemmakit runs."
        )
    nf4, bf16 = r.memory["nf4"], r.memory["bf16"]
    emb16 = 2 * p.embedding
    if _is_gemma_7b(a):
        largest = max(t.numel for t in a.tensors() if t.is_linear)
        gap = 7.1 * GB - nf4
        out.append(
            f'The article\'s "Gemma 7B needs 7.1 GB in NF4": the NF4+DQ weights are '
            f"{nf4 / GB:.2f} GB, of which {emb16 / GB:.2f} GB is the 256k x 3072 embedding that "
            f"bitsandbytes leaves in 16-bit (it is an nn.Embedding, and tied to lm_head). The "
            f"other ~{gap / GB:.1f} GB is not weights: the CUDA context (0.3-0.5 GB, seen by "
            f"nvidia-smi but not by torch), the caching allocator's reserved-but-free blocks, "
            f"the 16-bit copy bitsandbytes dequantizes each matmul's weight into (up to "
            f"{2 * largest / 1e6:.0f} MB), and generation's activations and logits "
            f"({4 * a.vocab_size / 1e6:.1f} MB per token in fp32 over the 256k vocabulary)."
        )
    elif emb16 > 0.25 * nf4:
        out.append(
            f"The embedding is {p.embedding / p.text:.0%} of the parameters and int8/NF4 leave it "
            f"in 16-bit ({emb16 / GB:.2f} GB), so NF4 weights are {nf4 / bf16:.0%} of bf16, not "
            f"the {NF4_BITS_PER_WEIGHT / 16:.0%} that {NF4_BITS_PER_WEIGHT:.3f} of 16 bits suggests."
        )
    if a.final_logit_softcapping or a.qk_norm:
        out.append("fp16 overflows Gemma 2/3 activations (trained in bf16): use bf16 or fp32.")
    full = r.training["full"]
    if full["logits"] > full["activations"] / 4 and a.vocab_size > 100_000:
        out.append(
            f"Training logits over the {a.vocab_size:,}-token vocabulary take "
            f"{full['logits'] / GB:.1f} GB at batch {r.train_batch} (float32 logits, log-softmax and "
            f"gradient); a chunked cross-entropy ({r.chunk_tokens} tokens at a time) keeps "
            f"{full['logits_chunked'] / GB:.2f} GB."
        )
    return out


def vocab_ratios(archs: list[Architecture]) -> str | None:
    """'gemma-7b's 256,000-token vocabulary is 8.0x llama-2-7b (32,000), ...' for a comparison."""
    if len(archs) < 2:
        return None
    first, rest = archs[0], [x for x in archs[1:] if x.vocab_size != archs[0].vocab_size]
    if not rest:
        return f"All vocabularies have {first.vocab_size:,} tokens."
    parts = [f"{first.vocab_size / x.vocab_size:.1f}x {x.name} ({x.vocab_size:,})" for x in rest]
    return f"{first.name}'s {first.vocab_size:,}-token vocabulary is " + ", ".join(parts) + "."


# --- Formatting helpers ------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    if n >= GB:
        return f"{n / GB:.2f} GB"
    if n >= 10**6:
        return f"{n / 10**6:.0f} MB"
    if n >= 10**3:
        return f"{n / 10**3:.0f} kB"
    return f"{n:.0f} B"


def fmt_params(n: int) -> str:
    if n >= 10**9:
        return f"{n / 10**9:.2f}B"
    if n >= 10**6:
        return f"{n / 10**6:.0f}M"
    return f"{n:,}"
