"""What parameter and memory accounting knows about a decoder-only model, and where it comes from.

`Architecture` describes Gemma 1/2/3/3n/4, Llama, Mistral and Qwen2 text models alike; its
`tensors()` list, under Hugging Face state-dict names, is the one source every count and byte
figure in `gemmakit.planning` is computed from. Shapes that vary by layer (Gemma 3n/4: per-type
head dims and KV heads, KV-shared layers, per-layer MLP widths) sit in `layers`, one
`LayerShape` per block. Gemma architectures are always derived from a
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
from gemmakit.planning.towers import gemma4_audio_params, gemma4_vision_params, siglip_params

# Tensor kinds besides the projections (whose kind is their name in `PROJECTIONS`).
EMBEDDING, OUTPUT, NORM, BIAS = "embed_tokens", "lm_head", "norm", "bias"
# Gemma 3n/4: the per-layer embedding table (PLE), the routed experts' stacked weights, the
# other small tensors of these families (PLE gates and projections, AltUp, LAuReL, the router),
# and checkpoint buffers that are not parameters (Gemma 4's layer_scalar).
PER_LAYER_EMBEDDING, EXPERTS, AUX, BUFFER = "embed_tokens_per_layer", "experts", "aux", "buffer"


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
        """A projection inside a block: what weight-only quantization swaps and LoRA adapts."""
        return self.kind in PROJECTIONS and len(self.shape) == 2

    @property
    def is_parameter(self) -> bool:
        """A parameter (what transformers' numel counts), not a stored buffer."""
        return self.kind != BUFFER


@dataclass(frozen=True)
class LayerShape:
    """One block's attention and MLP shapes, where Gemma 3n/4 vary them by layer."""

    head_dim: int
    kv_heads: int
    intermediate_size: int
    # KV-shared layers (Gemma 3n/4's last num_kv_shared_layers) own no k_proj/v_proj/k_norm
    # and no cache: they attend over an earlier layer's keys and values.
    owns_kv: bool = True
    # Gemma 4 full-attention layers with attention_k_eq_v: no v_proj, the values are the keys.
    has_v_proj: bool = True


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
    # Vision and audio towers + their projectors of a multimodal checkpoint (not part of the
    # text model).
    vision_params: int = 0
    audio_params: int = 0
    # --- Gemma 3n / 4 (transformers modeling_gemma3n.py, modeling_gemma4.py) ------------------
    # One LayerShape per block; empty: every block has the shapes of the fields above.
    layers: tuple[LayerShape, ...] = ()
    # Per-layer embeddings: width of each layer's slice, rows of the table (0: none).
    per_layer_input_size: int = 0
    per_layer_vocab_size: int = 0
    # Gemma 3n/4 RMSNorm over head_dim on the values, without a weight (no parameters).
    v_norm: bool = False
    # Gemma 4: a one-element layer_scalar buffer per block, stored in the checkpoint.
    layer_scalar: bool = False
    # Gemma 4 mixture of experts beside the dense MLP: experts, chosen per token, expert width.
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    # Gemma 3n AltUp streams (0: none) and LAuReL rank (0: none).
    altup_num_inputs: int = 0
    laurel_rank: int = 0
    # "proportional" RoPE: the fraction of a global layer's head dim that rotates.
    rope_partial_rotary_factor: float = 1.0
    # The multimodal wrapper's towers that are not counted (e.g. "vision and audio"), if any.
    uncounted_towers: str = ""
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
        if self.layers and len(self.layers) != self.num_layers:
            raise ConfigError(f"{self.name}: layers must describe all {self.num_layers} blocks")

    def layer(self, i: int) -> LayerShape:
        """Block i's shapes."""
        if self.layers:
            return self.layers[i]
        return LayerShape(self.head_dim, self.num_kv_heads, self.intermediate_size)

    def layer_view(self, i: int) -> Architecture:
        """A one-block Architecture with block i's shapes as its scalar fields, for the
        estimates (activations) that read a block's dimensions from those fields."""
        s = self.layer(i)
        return dataclasses.replace(
            self, num_layers=1, layer_types=(self.layer_types[i],), layers=(s,),
            head_dim=s.head_dim, num_kv_heads=s.kv_heads, intermediate_size=s.intermediate_size,
        )  # fmt: skip

    @property
    def num_kv_shared_layers(self) -> int:
        return sum(not self.layer(i).owns_kv for i in range(self.num_layers))

    def type_shape(self, layer_type: str) -> LayerShape | None:
        """The shapes of the first block of a layer type (None if the model has none)."""
        return next((self.layer(i) for i, t in enumerate(self.layer_types) if t == layer_type), None)

    @property
    def k_eq_v_layers(self) -> int:
        """KV-owning blocks whose values are their keys (no v_proj; Gemma 4 attention_k_eq_v)."""
        return sum(s.owns_kv and not s.has_v_proj for s in map(self.layer, range(self.num_layers)))

    @property
    def varies_by_layer(self) -> bool:
        """Whether some block's shapes differ from the first's (Gemma 3n/4)."""
        return len(set(self.layers)) > 1

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
        """Every tensor of the checkpoint: the embeddings, each block (its projections, its
        norms, then the Gemma 3n/4 extras), the final norm, and lm_head when it is not tied
        to the embedding. Buffers (kind BUFFER) are listed but are not parameters."""
        H, V = self.hidden_size, self.vocab_size
        out = [Tensor("model.embed_tokens.weight", (V, H), EMBEDDING)]
        out += _model_extra_tensors(self)
        for i in range(self.num_layers):
            prefix = f"model.layers.{i}."
            out += self._block_tensors(i, prefix)
            out += _block_extra_tensors(self, prefix)
        out.append(Tensor("model.norm.weight", (H,), NORM))
        if not self.tie_word_embeddings:
            out.append(Tensor("lm_head.weight", (V, H), OUTPUT))
        return out

    def _block_tensors(self, i: int, prefix: str) -> list[Tensor]:
        s, H = self.layer(i), self.hidden_size
        inter, q, kv = s.intermediate_size, self.num_heads * s.head_dim, s.kv_heads * s.head_dim
        # projection -> (parent module, (out_features, in_features), has a bias); a KV-shared
        # layer has no k_proj/v_proj, a K = V layer no v_proj (transformers Gemma4TextAttention).
        layout = {
            "q_proj": ("self_attn", (q, H), self.qkv_bias),
            "k_proj": ("self_attn", (kv, H), self.qkv_bias) if s.owns_kv else None,
            "v_proj": ("self_attn", (kv, H), self.qkv_bias) if s.owns_kv and s.has_v_proj else None,
            "o_proj": ("self_attn", (H, q), self.o_bias),
            "gate_proj": ("mlp", (inter, H), self.mlp_bias),
            "up_proj": ("mlp", (inter, H), self.mlp_bias),
            "down_proj": ("mlp", (H, inter), self.mlp_bias),
        }
        out = []
        for proj in PROJECTIONS:
            if layout[proj] is None:
                continue
            parent, shape, bias = layout[proj]
            out.append(Tensor(f"{prefix}{parent}.{proj}.weight", shape, proj))
            if bias:
                out.append(Tensor(f"{prefix}{parent}.{proj}.bias", shape[:1], BIAS))
        norms = ["input_layernorm", "post_attention_layernorm"]
        if self.norms_per_layer == 4:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        if self.qk_norm:
            # v_norm, where there is one, has no weight (transformers with_scale=False).
            norms += ["self_attn.q_norm"] + (["self_attn.k_norm"] if s.owns_kv else [])
        for norm in norms:
            width = s.head_dim if norm.startswith("self_attn.") else H
            out.append(Tensor(f"{prefix}{norm}.weight", (width,), NORM))
        return out


# --- Gemma 3n / 4 tensors beside the Gemma 1-3 block --------------------------------------------


def _model_extra_tensors(a: Architecture) -> list[Tensor]:
    """Model-level tensors of Gemma 3n/4: the per-layer embedding table, its projection from
    the hidden state and its norm (transformers Gemma4TextModel / Gemma3nTextModel), and Gemma
    3n's AltUp stream projections in and out (altup_projections, altup_unembed_projections)."""
    H, L, P = a.hidden_size, a.num_layers, a.per_layer_input_size
    out = []
    if P:
        out += [
            Tensor(
                "model.embed_tokens_per_layer.weight", (a.per_layer_vocab_size, L * P), PER_LAYER_EMBEDDING
            ),
            Tensor("model.per_layer_model_projection.weight", (L * P, H), AUX),
            Tensor("model.per_layer_projection_norm.weight", (P,), NORM),
        ]
    for kind in ("altup_projections", "altup_unembed_projections"):
        # One (H, H) matrix per stream besides the active one.
        out += [
            Tensor(f"model.{kind}.{j}.weight", (H, H), AUX) for j in range(max(a.altup_num_inputs - 1, 0))
        ]
    return out


def _block_extra_tensors(a: Architecture, prefix: str) -> list[Tensor]:
    """A Gemma 3n/4 block's tensors beside attention and the dense MLP, by module:
    the per-layer input gate (Gemma4TextDecoderLayer), the router and experts
    (Gemma4TextRouter, Gemma4TextExperts: fused (E, 2 * I, H) gate_up_proj), AltUp
    (Gemma3nTextAltUp), LAuReL (Gemma3nTextLaurelBlock) and Gemma 4's layer_scalar buffer."""
    H, P, E, n, r = a.hidden_size, a.per_layer_input_size, a.num_experts, a.altup_num_inputs, a.laurel_rank
    out = []
    if P:
        out += [
            Tensor(f"{prefix}per_layer_input_gate.weight", (P, H), AUX),
            Tensor(f"{prefix}per_layer_projection.weight", (H, P), AUX),
            Tensor(f"{prefix}post_per_layer_input_norm.weight", (H,), NORM),
        ]
    if E:
        inter = a.moe_intermediate_size
        out += [
            Tensor(f"{prefix}router.proj.weight", (E, H), AUX),
            Tensor(f"{prefix}router.scale", (H,), AUX),
            Tensor(f"{prefix}router.per_expert_scale", (E,), AUX),
            Tensor(f"{prefix}experts.gate_up_proj", (E, 2 * inter, H), EXPERTS),
            Tensor(f"{prefix}experts.down_proj", (E, H, inter), EXPERTS),
        ]
        for norm in (
            "post_feedforward_layernorm_1",
            "post_feedforward_layernorm_2",
            "pre_feedforward_layernorm_2",
        ):
            out.append(Tensor(f"{prefix}{norm}.weight", (H,), NORM))
    if n:
        out += [
            Tensor(f"{prefix}altup.correct_output_scale", (H,), AUX),
            Tensor(f"{prefix}altup.correction_coefs.weight", (n, n), AUX),
            Tensor(f"{prefix}altup.prediction_coefs.weight", (n * n, n), AUX),
            Tensor(f"{prefix}altup.modality_router.weight", (n, H), AUX),
            Tensor(f"{prefix}altup.router_norm.weight", (H,), NORM),
        ]
    if r:
        out += [
            Tensor(f"{prefix}laurel.linear_left.weight", (r, H), AUX),
            Tensor(f"{prefix}laurel.linear_right.weight", (H, r), AUX),
            Tensor(f"{prefix}laurel.post_laurel_norm.weight", (H,), NORM),
        ]
    if a.layer_scalar:
        out.append(Tensor(f"{prefix}layer_scalar", (1,), BUFFER))
    return out


# --- Gemma: always through GemmaConfig ---------------------------------------------------------


def from_gemma_config(cfg: GemmaConfig, name: str | None = None, source: str = "") -> Architecture:
    factor = cfg.rope_scaling_factor
    sliding = SLIDING in cfg.layer_types
    n = cfg.num_hidden_layers
    layers = tuple(
        LayerShape(
            head_dim=cfg.layer_head_dim(i),
            kv_heads=cfg.layer_kv_heads(i),
            intermediate_size=cfg.layer_intermediate_size(i),
            owns_kv=cfg.layer_owns_kv(i),
            has_v_proj=cfg.layer_has_v_proj(i),
        )
        for i in range(n)
    )
    return Architecture(
        name=name or cfg.name or cfg.model_type,
        model_type=cfg.model_type,
        architecture=cfg.architecture,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=n,
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
        layers=layers,
        per_layer_input_size=cfg.hidden_size_per_layer_input,
        per_layer_vocab_size=cfg.vocab_size_per_layer_input if cfg.hidden_size_per_layer_input else 0,
        v_norm=cfg.use_v_norm,
        layer_scalar=cfg.use_layer_scalar,
        num_experts=cfg.num_experts,
        top_k_experts=cfg.top_k_experts,
        moe_intermediate_size=cfg.moe_intermediate_size,
        altup_num_inputs=cfg.altup_num_inputs,
        laurel_rank=cfg.laurel_rank,
        rope_partial_rotary_factor=cfg.rope_partial_rotary_factor,
        source=source,
    )


def _gemma_from_hf(raw: dict[str, Any], name: str, source: str) -> Architecture:
    try:
        cfg = from_hf_config(raw, name=name)
    except KeyError as e:
        raise ConfigError(f"{name}: config.json lacks {e.args[0]!r}") from None
    arch = from_gemma_config(cfg, name=name, source=source)
    wrapper = next((a for a in raw.get("architectures") or [] if a in _MULTIMODAL_WRAPPERS), None)
    wrapper = wrapper or _MULTIMODAL_TYPES.get(raw.get("model_type", ""))
    if wrapper is None and "text_config" in raw:
        wrapper = "Gemma3ForConditionalGeneration"
    if wrapper == "Gemma3ForConditionalGeneration":
        # A multimodal Gemma 3 config: from_hf_config reads its text half; count the vision half.
        vision = siglip_params(raw.get("vision_config") or {}, cfg.hidden_size)
        return dataclasses.replace(arch, vision_params=vision, architecture=wrapper)
    if wrapper == "Gemma4ForConditionalGeneration":
        vision, audio = raw.get("vision_config"), raw.get("audio_config")
        return dataclasses.replace(
            arch,
            architecture=wrapper,
            vision_params=gemma4_vision_params(vision, cfg.hidden_size) if vision else 0,
            audio_params=gemma4_audio_params(audio, cfg.hidden_size) if audio else 0,
        )
    if wrapper:
        # Gemma 3n's vision encoder is a timm MobileNetV5 and its audio encoder a USM
        # conformer, neither modelled here: their parameters are named as not counted.
        towers = " and ".join(t for t in ("vision", "audio") if raw.get(f"{t}_config"))
        return dataclasses.replace(arch, architecture=wrapper, uncounted_towers=towers)
    return arch


# --- config.json: Gemma through from_hf_config, the Llama families here -----------------------

# HF architecture -> model_type of the Llama-style families counted here.
_LLAMA_FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_GEMMA_MODEL_TYPES = (
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "gemma3n",
    "gemma3n_text",
    "gemma4",
    "gemma4_text",
)
_GEMMA_ARCHS = (
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Gemma3nForCausalLM",
    "Gemma4ForCausalLM",
    "Gemma3ForConditionalGeneration",
    "Gemma3nForConditionalGeneration",
    "Gemma4ForConditionalGeneration",
)
# Multimodal wrappers, by architecture and by model_type: their text tower is counted.
_MULTIMODAL_WRAPPERS = _GEMMA_ARCHS[-3:]
_MULTIMODAL_TYPES = dict(zip(("gemma3", "gemma3n", "gemma4"), _MULTIMODAL_WRAPPERS))
# Keys that mean a different parameter layout than the dense decoder counted here.
_UNSUPPORTED_KEYS = ("num_local_experts", "num_experts", "moe_intermediate_size", "n_routed_experts")


def from_hf_dict(raw: dict[str, Any], name: str, source: str = "config.json") -> Architecture:
    """An Architecture from a transformers config.json dict (Gemma 1/2/3/3n/4, Llama, Mistral,
    Qwen2).

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
            f"{name}: architecture {found} is not one inspect can count; it reads Gemma 3n/4 and Gemma 1/2/3, "
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
        # Through the weight's GGUF name, so a rename table that lists weights only still
        # finds the biases beside them (blk.0.attn_q.weight -> blk.0.attn_q.bias).
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = hf_to_gguf_name(f"{base}.weight")
        return gguf_name is not None and f"{gguf_name.removesuffix('.weight')}.{suffix}" in g.tensors

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
