"""Gemma text-model configuration: one frozen dataclass, HF `config.json` names, presets.

Behaviour is named, never inferred from a generation: Gemma 2's capping is
`attn_logit_softcapping`, Gemma 3's QK-norm is `use_qk_norm`, Gemma 4's per-layer
embeddings are `hidden_size_per_layer_input`, and so on; shapes that vary by layer (Gemma 3n/4)
are read through `layer_head_dim(i)` and friends. `gemmakit.hf_config` converts to and from
Hugging Face `config.json`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from gemmakit.errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"
# The seven linear projections of a block, by their HF names (attention, then MLP): what LoRA
# targets by default, what weight-only quantization swaps, what the planner counts.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class GemmaConfig:
    # Size of the token vocabulary (rows of the tied embedding).
    vocab_size: int
    # Width of the residual stream.
    hidden_size: int
    # Width of the GeGLU MLP's hidden layer.
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    # 1 = multi-query (Gemma 2B), == num_attention_heads = multi-head (Gemma 7B), else GQA.
    num_key_value_heads: int
    head_dim: int
    # "sliding_attention" or "full_attention" per layer: the single source of truth for
    # which layers see a window and which RoPE base they use.
    layer_types: tuple[str, ...]
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    # Keys a query on a sliding layer may see, itself included (query i sees key j iff
    # 0 <= i - j < sliding_window), as in transformers' sliding masks.
    sliding_window: int | None = None
    # Queries are scaled by query_pre_attn_scalar ** -0.5 (Gemma 2/3); None means head_dim.
    query_pre_attn_scalar: float | None = None
    # Gemma 2: scores -> cap * tanh(scores / cap) before the mask. None disables.
    attn_logit_softcapping: float | None = None
    # Gemma 2: logits -> cap * tanh(logits / cap). None disables.
    final_logit_softcapping: float | None = None
    # RoPE base of the full-attention layers.
    rope_theta: float = 10000.0
    # RoPE base of the sliding layers (Gemma 3 uses 1e4 there and 1e6 on global layers).
    rope_local_base_freq: float | None = None
    # Linear RoPE scaling of the full-attention layers (Gemma 3 4B+: 8.0).
    rope_scaling_factor: float = 1.0
    # Gemma 3: RMSNorm over head_dim on q and k, before RoPE.
    use_qk_norm: bool = False
    # Gemma 2/3 "sandwich" norms: post-attention and post-feedforward RMSNorms.
    use_post_norms: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int = 2
    pad_token_id: int = 0
    # Generation stops on any of these (Gemma 3: <eos>=1 and <end_of_turn>=106).
    eos_token_ids: tuple[int, ...] = (1,)
    # The HF architecture this config came from, kept for export only; no behaviour
    # depends on it.
    architecture: str = "Gemma3ForCausalLM"
    # The HF model_type, kept for export only.
    model_type: str = "gemma3_text"
    # --- Gemma 3n / Gemma 4 behaviours; the defaults are Gemma 1-3's --------------------------
    # RMSNorm gains: (1 + w) with zero-centred weights (Gemma 1-3), or w itself (Gemma 3n/4,
    # transformers Gemma3nRMSNorm / Gemma4RMSNorm, whose weights start at ones).
    norm_unit_offset: bool = True
    # One attention scale for every layer (Gemma 3n/4: 1.0, the q/k norms set the scale);
    # None: query_pre_attn_scalar ** -0.5.
    fixed_attention_scale: float | None = None
    # RMSNorm without a gain over head_dim on the values (Gemma 3n/4).
    use_v_norm: bool = False
    # Per-layer embeddings (PLE): each layer adds a gated projection of its own
    # hidden_size_per_layer_input-wide slice of a second embedding table (0 = none).
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 0
    # The last num_kv_shared_layers layers own no keys or values: each attends over those of
    # the last earlier layer of its type (`kv_source_layers`).
    num_kv_shared_layers: int = 0
    # Gemma 4: the MLPs of the KV-shared layers are twice as wide.
    use_double_wide_mlp: bool = False
    # Gemma 4 full-attention layers: their own head_dim and KV-head count.
    global_head_dim: int | None = None
    num_global_key_value_heads: int | None = None
    # Gemma 4 full-attention layers: no v_proj, the values are the keys before k_norm/RoPE.
    attention_k_eq_v: bool = False
    # "Proportional" RoPE on full-attention layers (Gemma 4: 0.25): the first
    # factor * head_dim / 2 frequencies rotate, the rest are zero (transformers
    # modeling_rope_utils._compute_proportional_rope_parameters).
    rope_partial_rotary_factor: float = 1.0
    # Gemma 4: each block's output is multiplied by its `layer_scalar` buffer.
    use_layer_scalar: bool = False
    # Gemma 4 mixture of experts beside the dense MLP (26B-A4B); 0 = none.
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    # Gemma 3n: per-layer MLP widths (None: intermediate_size everywhere) and the Gaussian
    # top-k activation sparsity of each layer's gate (0.0 = dense).
    intermediate_sizes: tuple[int, ...] | None = None
    activation_sparsity_pattern: tuple[float, ...] | None = None
    # Gemma 3n AltUp: altup_num_inputs parallel residual streams (0 = none), of which
    # altup_active_idx runs through the block.
    altup_num_inputs: int = 0
    altup_active_idx: int = 0
    altup_coef_clip: float | None = None
    altup_correct_scale: bool = False
    # Gemma 3n LAuReL: a rank-laurel_rank residual beside attention (0 = none).
    laurel_rank: int = 0
    # Free-form name for display.
    name: str = field(default="", compare=False)

    def __post_init__(self):
        for name in ("num_attention_heads", "num_key_value_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, not {value!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but the model has "
                f"{self.num_hidden_layers} layers"
            )
        unknown = set(self.layer_types) - {SLIDING, FULL}
        if unknown:
            raise ConfigError(f"unknown layer types {sorted(unknown)}")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ConfigError("sliding layers need a sliding_window")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "head_dim", "num_hidden_layers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        self._check_new_families()

    def _check_new_families(self):
        n = self.num_hidden_layers
        for name in ("intermediate_sizes", "activation_sparsity_pattern"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise ConfigError(f"{name} has {len(values)} entries but the model has {n} layers")
        if not 0 <= self.num_kv_shared_layers < n:
            raise ConfigError(f"num_kv_shared_layers must be in [0, {n}), not {self.num_kv_shared_layers}")
        producing = set(self.layer_types[: n - self.num_kv_shared_layers])
        if self.num_kv_shared_layers and producing != set(self.layer_types):
            raise ConfigError("every attention type of a KV-shared layer needs an earlier layer producing it")
        if self.num_experts and not 0 < self.top_k_experts <= self.num_experts:
            raise ConfigError(f"top_k_experts must be in [1, {self.num_experts}]")
        if self.num_experts and self.moe_intermediate_size <= 0:
            raise ConfigError("moe_intermediate_size must be positive with experts")
        if self.altup_num_inputs and not 0 <= self.altup_active_idx < self.altup_num_inputs:
            raise ConfigError("altup_active_idx must index one of the altup_num_inputs streams")
        if not 0.0 < self.rope_partial_rotary_factor <= 1.0:
            raise ConfigError("rope_partial_rotary_factor must be in (0, 1]")
        for i in range(n):
            if self.num_attention_heads % self.layer_kv_heads(i):
                raise ConfigError(
                    f"layer {i}: num_attention_heads ({self.num_attention_heads}) must be a "
                    f"multiple of its KV heads ({self.layer_kv_heads(i)})"
                )

    @property
    def attention_scale(self) -> float:
        if self.fixed_attention_scale is not None:
            return self.fixed_attention_scale
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    # --- per-layer shapes (Gemma 3n/4 vary them by layer; Gemma 1-3 do not) -----------------

    def layer_head_dim(self, i: int) -> int:
        if self.global_head_dim and self.layer_types[i] == FULL:
            return self.global_head_dim
        return self.head_dim

    def layer_kv_heads(self, i: int) -> int:
        if self.num_global_key_value_heads and self.layer_types[i] == FULL:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    def layer_has_v_proj(self, i: int) -> bool:
        # K = V on Gemma 4's full-attention layers (transformers Gemma4TextAttention).
        return self.layer_owns_kv(i) and not (self.attention_k_eq_v and self.layer_types[i] == FULL)

    def layer_owns_kv(self, i: int) -> bool:
        return i < self.num_hidden_layers - self.num_kv_shared_layers

    @property
    def kv_source_layers(self) -> tuple[int, ...]:
        """For each layer, the layer whose keys and values it attends over: itself, or for a
        KV-shared layer the last non-shared layer of its type (transformers' kv_sharing_modes)."""
        first_shared = self.num_hidden_layers - self.num_kv_shared_layers
        last_of_type = {t: i for i, t in enumerate(self.layer_types[:first_shared])}
        return tuple(i if i < first_shared else last_of_type[t] for i, t in enumerate(self.layer_types))

    def layer_intermediate_size(self, i: int) -> int:
        size = self.intermediate_sizes[i] if self.intermediate_sizes else self.intermediate_size
        return size * 2 if self.use_double_wide_mlp and not self.layer_owns_kv(i) else size

    def layer_activation_sparsity(self, i: int) -> float:
        return self.activation_sparsity_pattern[i] if self.activation_sparsity_pattern else 0.0

    def rope_partial(self, layer_type: str) -> float:
        """The fraction of a layer type's head dim that RoPE rotates."""
        return self.rope_partial_rotary_factor if layer_type == FULL else 1.0

    @property
    def embedding_scale(self) -> float:
        """The factor the token embeddings are multiplied by (sqrt of hidden_size)."""
        return math.sqrt(self.hidden_size)

    def rope_base(self, layer_type: str) -> float:
        if layer_type == SLIDING and self.rope_local_base_freq is not None:
            return self.rope_local_base_freq
        return self.rope_theta

    def rope_scale(self, layer_type: str) -> float:
        return self.rope_scaling_factor if layer_type == FULL else 1.0

    def replace(self, **changes) -> GemmaConfig:
        return dataclasses.replace(self, **changes)


# --- Presets ------------------------------------------------------------------------------


def _gemma1(name, hidden, inter, layers, heads, kv):
    return GemmaConfig(
        vocab_size=256000, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=256, layer_types=(FULL,) * layers, max_position_embeddings=8192,
        architecture="GemmaForCausalLM", model_type="gemma", name=name,
    )  # fmt: skip


def _gemma2(name, hidden, inter, layers, heads, kv, head_dim, qpas):
    return GemmaConfig(
        vocab_size=256000, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=head_dim, layer_types=tuple(SLIDING if i % 2 == 0 else FULL for i in range(layers)),
        max_position_embeddings=8192, sliding_window=4096, query_pre_attn_scalar=qpas,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, use_post_norms=True,
        architecture="Gemma2ForCausalLM", model_type="gemma2", name=name,
    )  # fmt: skip


def _gemma3(name, vocab, hidden, inter, layers, heads, kv, head_dim, qpas, window, max_pos, factor):
    return GemmaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=head_dim,
        layer_types=tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(layers)),
        max_position_embeddings=max_pos, sliding_window=window, query_pre_attn_scalar=qpas,
        rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling_factor=factor,
        use_qk_norm=True, use_post_norms=True, eos_token_ids=(1, 106),
        architecture="Gemma3ForCausalLM", model_type="gemma3_text", name=name,
    )  # fmt: skip


def _gemma3n(name, layers, inter, shared, widths_listed, eos):
    """Gemma 3n E2B/E4B's text model; widths_listed: the file lists intermediate_size per layer."""
    return GemmaConfig(
        vocab_size=262400, hidden_size=2048, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, head_dim=256,
        layer_types=tuple(FULL if (i + 1) % 5 == 0 else SLIDING for i in range(layers)),
        max_position_embeddings=32768, sliding_window=512,
        final_logit_softcapping=30.0, rope_theta=1e6, rope_local_base_freq=1e4,
        use_qk_norm=True, use_post_norms=True, eos_token_ids=eos,
        architecture="Gemma3nForCausalLM", model_type="gemma3n_text",
        norm_unit_offset=False, fixed_attention_scale=1.0, use_v_norm=True,
        hidden_size_per_layer_input=256, vocab_size_per_layer_input=262144,
        num_kv_shared_layers=shared, intermediate_sizes=(inter,) * layers if widths_listed else None,
        activation_sparsity_pattern=(0.95,) * 10 + (0.0,) * (layers - 10),
        altup_num_inputs=4, altup_coef_clip=120.0, altup_correct_scale=True, laurel_rank=64,
        name=name,
    )  # fmt: skip


def _gemma4(name, hidden, inter, layers, heads, kv, full_every, window, max_pos, ple, shared,
            double_wide=False, global_kv=None, experts=(0, 0, 0)):  # fmt: skip
    """Gemma 4's text model; global_kv: KV heads of the K = V global layers (None: no K = V);
    experts: (num_experts, top_k_experts, moe_intermediate_size)."""
    return GemmaConfig(
        vocab_size=262144, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=256,
        layer_types=tuple(FULL if (i + 1) % full_every == 0 else SLIDING for i in range(layers)),
        max_position_embeddings=max_pos, sliding_window=window, final_logit_softcapping=30.0,
        rope_theta=1e6, rope_local_base_freq=1e4, use_qk_norm=True, use_post_norms=True,
        architecture="Gemma4ForCausalLM", model_type="gemma4_text",
        norm_unit_offset=False, fixed_attention_scale=1.0, use_v_norm=True, use_layer_scalar=True,
        hidden_size_per_layer_input=ple, vocab_size_per_layer_input=262144,
        num_kv_shared_layers=shared, use_double_wide_mlp=double_wide, global_head_dim=512,
        num_global_key_value_heads=global_kv, attention_k_eq_v=global_kv is not None,
        rope_partial_rotary_factor=0.25, num_experts=experts[0], top_k_experts=experts[1],
        moe_intermediate_size=experts[2], name=name,
    )  # fmt: skip


# Public sizes, as the models' Hugging Face config.json files give them. Gemma 3n and 4 come from
# the released configs in tests/data/configs (SOURCES.md cites each; a test reads every file
# through hf_config.from_hf_config and compares): E2B/E4B/26B-A4B from copies of their
# config.json, 31B from a lock file quoting its text_config.
PRESETS: dict[str, GemmaConfig] = {
    "gemma-2b": _gemma1("gemma-2b", 2048, 16384, 18, 8, 1),
    "gemma-7b": _gemma1("gemma-7b", 3072, 24576, 28, 16, 16),
    "gemma-2-2b": _gemma2("gemma-2-2b", 2304, 9216, 26, 8, 4, 256, 256),
    "gemma-2-9b": _gemma2("gemma-2-9b", 3584, 14336, 42, 16, 8, 256, 256),
    "gemma-2-27b": _gemma2("gemma-2-27b", 4608, 36864, 46, 32, 16, 128, 144),
    "gemma-3-270m": _gemma3("gemma-3-270m", 262144, 640, 2048, 18, 4, 1, 256, 256, 512, 32768, 1.0),
    "gemma-3-1b": _gemma3("gemma-3-1b", 262144, 1152, 6912, 26, 4, 1, 256, 256, 512, 32768, 1.0),
    "gemma-3-4b": _gemma3("gemma-3-4b", 262208, 2560, 10240, 34, 8, 4, 256, 256, 1024, 131072, 8.0),
    "gemma-3-12b": _gemma3("gemma-3-12b", 262208, 3840, 15360, 48, 16, 8, 256, 256, 1024, 131072, 8.0),
    "gemma-3-27b": _gemma3("gemma-3-27b", 262208, 5376, 21504, 62, 32, 16, 128, 168, 1024, 131072, 8.0),
    "gemma-3n-e2b": _gemma3n("gemma-3n-e2b", 30, 8192, 10, True, (106,)),
    "gemma-3n-e4b": _gemma3n("gemma-3n-e4b", 35, 16384, 15, False, (1, 106)),
    "gemma-4-e2b": _gemma4("gemma-4-e2b", 1536, 6144, 35, 8, 1, 5, 512, 131072, 256, 20, double_wide=True),
    "gemma-4-e4b": _gemma4("gemma-4-e4b", 2560, 10240, 42, 8, 2, 6, 512, 131072, 256, 18),
    "gemma-4-26b-a4b": _gemma4("gemma-4-26b-a4b", 2816, 2112, 30, 16, 8, 6, 1024, 262144, 0, 0,
                               global_kv=2, experts=(128, 8, 704)),
    "gemma-4-31b": _gemma4("gemma-4-31b", 5376, 21504, 60, 32, 16, 6, 1024, 262144, 0, 0, global_kv=4),
}  # fmt: skip


def preset(name: str) -> GemmaConfig:
    key = name.lower().removeprefix("google/").removesuffix("-it").removesuffix("-pt")
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[key]


@dataclass(frozen=True)
class AssistantConfig:
    """Gemma 4's multi-token-prediction drafter (`gemma4_assistant`, transformers
    Gemma4AssistantConfig): a few Gemma 4 blocks that own no keys or values (every layer
    attends over the target's), between a projection of [token embedding, target hidden
    state] in and a projection back to the target's width out."""

    # The drafter's own layers. Its config.json says every layer is KV-shared
    # (num_kv_shared_layers = num_hidden_layers); here that count is 0 and the drafter's
    # class knows its layers read the target's keys and values instead of an earlier layer's.
    text: GemmaConfig
    # Width of the target's hidden states (the input is twice that: embedding + hidden).
    backbone_hidden_size: int
    # Logits only over the tokens of the top centroids (Gemma4AssistantMaskedEmbedder).
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    tie_word_embeddings: bool = True
    model_type: str = "gemma4_assistant"

    def __post_init__(self):
        t = self.text
        if t.hidden_size_per_layer_input or t.num_experts or t.use_double_wide_mlp:
            raise ConfigError(
                "a gemma4_assistant's layers have no per-layer inputs, experts or double-wide MLPs"
            )
        if self.backbone_hidden_size <= 0:
            raise ConfigError("backbone_hidden_size must be positive")
        if self.use_ordered_embeddings and (
            not 0 < self.centroid_intermediate_top_k <= self.num_centroids
            or t.vocab_size % self.num_centroids
        ):
            raise ConfigError(
                "ordered embeddings need num_centroids dividing vocab_size and "
                "0 < centroid_intermediate_top_k <= num_centroids"
            )
