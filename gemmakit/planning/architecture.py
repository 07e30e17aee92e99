"""What parameter and memory accounting knows about a decoder-only model, and where it comes from.

`Architecture` describes Gemma 1/2/3, Llama, Mistral and Qwen2 text models alike; its
`tensors()` list, under Hugging Face state-dict names, is the one source every count and byte
figure in `gemmakit.planning` is computed from. Gemma architectures are always derived from a
`GemmaConfig` (a preset, `gemmakit.hf_config.from_hf_config` on a config.json, or
`gemmakit.formats.gguf.config_from_gguf` on a GGUF header), so inspect reads a Gemma model
exactly as the loader does. The other families are read here, from their config.json keys or
llama.cpp's GGUF metadata keys. Nothing here reads tensor data.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from gemmakit.config import FULL, PROJECTIONS, SLIDING, GemmaConfig
from gemmakit.errors import ConfigError, ModelFileError
from gemmakit.formats.gguf import GGUF_ARCHITECTURES, GGUFFile, config_from_gguf, hf_to_gguf_name
from gemmakit.hf_config import from_hf_config

# Tensor kinds besides the projections (whose kind is their name in `PROJECTIONS`).
EMBEDDING, OUTPUT, NORM, BIAS = "embed_tokens", "lm_head", "norm", "bias"


@dataclass(frozen=True)
class Tensor:
    name: str  # HF state-dict name
    shape: tuple[int, ...]  # PyTorch order: (out_features, in_features) for linears
    # A projection's HF name (q_proj ... down_proj), or EMBEDDING, OUTPUT, NORM, BIAS: the
    # GGUF quantization rules and the LoRA targets key on it.
    kind: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_embedding(self) -> bool:
        return self.kind in (EMBEDDING, OUTPUT)

    @property
    def is_linear(self) -> bool:
        """A projection inside a block: what bitsandbytes quantizes and LoRA adapts."""
        return self.kind in PROJECTIONS and len(self.shape) == 2


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
    # The HF architecture (GemmaForCausalLM, LlamaForCausalLM ...), or a non-Gemma GGUF file's
    # general.architecture (llama, qwen2).
    architecture: str = ""

    def __post_init__(self):
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(f"{self.name}: layer_types must cover all {self.num_layers} layers")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{self.name}: {self.num_heads} attention heads are not a multiple of "
                f"{self.num_kv_heads} key/value heads"
            )
        if self.norms_per_layer not in (2, 4):
            raise ConfigError(f"{self.name}: {self.norms_per_layer} norms per layer is not supported")

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
        """Every parameter tensor: the embedding, each block (its projections, then its norms),
        the final norm, and lm_head when it is not tied to the embedding."""
        H, V = self.hidden_size, self.vocab_size
        out = [Tensor("model.embed_tokens.weight", (V, H), EMBEDDING)]
        for i in range(self.num_layers):
            out += self._block_tensors(f"model.layers.{i}.")
        out.append(Tensor("model.norm.weight", (H,), NORM))
        if not self.tie_word_embeddings:
            out.append(Tensor("lm_head.weight", (V, H), OUTPUT))
        return out

    def _block_tensors(self, prefix: str) -> list[Tensor]:
        H, inter, q, kv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        # projection -> (parent module, (out_features, in_features), has a bias)
        layout = {
            "q_proj": ("self_attn", (q, H), self.qkv_bias),
            "k_proj": ("self_attn", (kv, H), self.qkv_bias),
            "v_proj": ("self_attn", (kv, H), self.qkv_bias),
            "o_proj": ("self_attn", (H, q), self.o_bias),
            "gate_proj": ("mlp", (inter, H), self.mlp_bias),
            "up_proj": ("mlp", (inter, H), self.mlp_bias),
            "down_proj": ("mlp", (H, inter), self.mlp_bias),
        }
        out = []
        for proj in PROJECTIONS:
            parent, shape, bias = layout[proj]
            out.append(Tensor(f"{prefix}{parent}.{proj}.weight", shape, proj))
            if bias:
                out.append(Tensor(f"{prefix}{parent}.{proj}.bias", shape[:1], BIAS))
        norms = ["input_layernorm", "post_attention_layernorm"]
        if self.norms_per_layer == 4:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        if self.qk_norm:
            norms += ["self_attn.q_norm", "self_attn.k_norm"]
        for norm in norms:
            width = self.head_dim if norm.startswith("self_attn.") else H
            out.append(Tensor(f"{prefix}{norm}.weight", (width,), NORM))
        return out


# --- Gemma: always through GemmaConfig ---------------------------------------------------------


def from_gemma_config(cfg: GemmaConfig, name: str | None = None, source: str = "") -> Architecture:
    factor = cfg.rope_scaling_factor
    sliding = SLIDING in cfg.layer_types
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
        sliding_window=cfg.sliding_window if sliding else None,
        norms_per_layer=4 if cfg.use_post_norms else 2,
        qk_norm=cfg.use_qk_norm,
        activation="GeGLU (tanh GELU)",
        rope_theta=cfg.rope_theta,
        rope_local_base_freq=cfg.rope_local_base_freq if sliding else None,
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


def _gemma_from_hf(raw: dict[str, Any], name: str, source: str) -> Architecture:
    try:
        cfg = from_hf_config(raw, name=name)
    except KeyError as e:
        raise ConfigError(f"{name}: config.json lacks {e.args[0]!r}") from None
    arch = from_gemma_config(cfg, name=name, source=source)
    # A multimodal Gemma 3 config: from_hf_config reads its text half; count the vision half.
    multimodal = "text_config" in raw or raw.get("model_type") == "gemma3"
    vision = siglip_params(raw.get("vision_config") or {}, cfg.hidden_size) if multimodal else 0
    if vision:
        arch = dataclasses.replace(arch, vision_params=vision, architecture="Gemma3ForConditionalGeneration")
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


# --- config.json: Gemma through from_hf_config, the Llama families here -----------------------

# HF architecture -> model_type of the Llama-style families counted here.
_LLAMA_FAMILIES = {
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

    Gemma configs go through `gemmakit.hf_config.from_hf_config`, so inspect reads them exactly as
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
        head_dim=int(raw.get("head_dim") or hidden // heads),
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


# --- GGUF header: Gemma through config_from_gguf, llama and qwen2 here ---------------------------

# GGUF architectures (general.architecture) besides Gemma's that inspect reads.
_LLAMA_GGUF_ARCHITECTURES = ("llama", "qwen2")


def from_gguf(g: GGUFFile) -> Architecture:
    """An Architecture from a GGUF header (`gemmakit.formats.gguf.GGUFFile`); no tensor data is read."""
    if g.architecture in GGUF_ARCHITECTURES:
        return from_gemma_config(config_from_gguf(g), name=g.path.stem, source="GGUF")
    if g.architecture not in _LLAMA_GGUF_ARCHITECTURES:
        *names, last = [*GGUF_ARCHITECTURES, *_LLAMA_GGUF_ARCHITECTURES]
        raise ModelFileError(
            f"{g.path}: GGUF architecture {g.architecture or 'missing'!r}; inspect reads "
            f"{', '.join(names)} and {last} GGUF files"
        )
    return _llama_family_from_gguf(g)


def _llama_family_from_gguf(g: GGUFFile) -> Architecture:
    """llama.cpp's metadata keys (`{arch}.embedding_length` ...) of a llama or qwen2 file."""
    arch = g.architecture

    def get(key, default=None):
        value = g.metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelFileError(f"{g.path}: metadata key {arch}.{key} is missing")
        return value

    def has(hf_name: str) -> bool:
        return hf_to_gguf_name(hf_name) in g.tensors

    hidden, heads, layers = (
        int(get("embedding_length")),
        int(get("attention.head_count")),
        int(get("block_count")),
    )
    window = g.metadata.get(f"{arch}.attention.sliding_window")
    return Architecture(
        name=g.path.stem, model_type=arch, architecture=arch, source="GGUF",
        vocab_size=g.tensors[hf_to_gguf_name("model.embed_tokens.weight")].shape[0],
        hidden_size=hidden, intermediate_size=int(get("feed_forward_length")), num_layers=layers,
        num_heads=heads, num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", hidden // heads)),
        layer_types=(SLIDING if window else FULL,) * layers,
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings=not has("lm_head.weight"),
        sliding_window=int(window) if window else None,
        qkv_bias=has("model.layers.0.self_attn.q_proj.bias"),
        rope_theta=float(get("rope.freq_base", 10000.0)),
    )  # fmt: skip
