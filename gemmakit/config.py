"""Gemma text-model configuration: one frozen dataclass, HF `config.json` names, presets.

Behaviour is named, never inferred from a generation: Gemma 2's capping is
`attn_logit_softcapping`, Gemma 3's QK-norm is `use_qk_norm`, and so on. `from_hf_config`
maps every key of a Hugging Face config onto a field or refuses it (`ConfigError`), so a
checkpoint is never run with a setting silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    # Free-form name for display.
    name: str = field(default="", compare=False)

    def __post_init__(self):
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
        for name in ("vocab_size", "hidden_size", "intermediate_size", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

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

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json dict that transformers loads into the equivalent model."""
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_activation": "gelu_pytorch_tanh",
            "rope_theta": self.rope_theta,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids)
            if len(self.eos_token_ids) > 1
            else self.eos_token_ids[0],
            "pad_token_id": self.pad_token_id,
        }
        if self.use_post_norms:  # Gemma 2 and 3 keys
            out["query_pre_attn_scalar"] = self.query_pre_attn_scalar or self.head_dim
            out["sliding_window"] = self.sliding_window
            out["layer_types"] = list(self.layer_types)
            out["attn_logit_softcapping"] = self.attn_logit_softcapping
            out["final_logit_softcapping"] = self.final_logit_softcapping
        if self.use_qk_norm:
            out["rope_local_base_freq"] = self.rope_local_base_freq
            out["rope_scaling"] = (
                {"rope_type": "linear", "factor": self.rope_scaling_factor}
                if self.rope_scaling_factor != 1.0
                else None
            )
        return out


# --- From Hugging Face config.json ------------------------------------------------------

# Architectures gemmakit implements, and the behaviours each one's config implies when the
# config itself is silent (old config.json files predate layer_types and friends).
_ARCHITECTURES = {
    "GemmaForCausalLM": dict(model_type="gemma", use_post_norms=False, use_qk_norm=False),
    "Gemma2ForCausalLM": dict(model_type="gemma2", use_post_norms=True, use_qk_norm=False),
    "Gemma3ForCausalLM": dict(model_type="gemma3_text", use_post_norms=True, use_qk_norm=True),
}
_REQUIRED_KEYS = ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size")
_MODEL_TYPE_TO_ARCH = {
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
# Keys that describe the file, the training run or generic HF behaviour, not the network.
_IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "initializer_range", "use_cache", "_name_or_path", "output_hidden_states",
    "output_attentions", "return_dict", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class", "cache_implementation",
    "_sliding_window_pattern", "sliding_window_pattern", "attn_implementation",
    "_attn_implementation_autoset", "quantization_config_ignored", "pretraining_tp",
    "prefix", "task_specific_params", "finetuning_task", "add_cross_attention",
    "tf_legacy_loss", "use_return_dict", "torchscript", "max_length", "min_length",
    "name_or_path", "unsloth_version", "unsloth_fixed",
}  # fmt: skip


_GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
    "query_pre_attn_scalar": 256, "sliding_window": 4096,
}  # fmt: skip


def from_hf_config(raw: dict[str, Any], name: str = "") -> GemmaConfig:
    """Builds a GemmaConfig from a transformers `config.json` dict.

    Each part of the config is read by its own helper, which pops the keys it honours; a key
    left over at the end is one gemmakit does not implement.

    Raises:
        ConfigError: for an architecture other than Gemma 1/2/3 text, or any key whose
            value gemmakit cannot honour exactly.
    """
    raw = dict(raw)
    if _is_multimodal(raw):
        return from_hf_config(_text_config(raw), name)
    arch = _architecture(raw)
    implied = _ARCHITECTURES[arch]
    missing = [k for k in _REQUIRED_KEYS if k not in raw]
    if missing:
        raise ConfigError(f"config.json lacks required key(s): {', '.join(missing)}")
    pop = raw.pop
    num_layers = pop("num_hidden_layers")
    heads = pop("num_attention_heads")
    hidden = pop("hidden_size")
    head_dim = pop("head_dim", None) or hidden // heads
    layer_types, window = _attention_layout(raw, implied, num_layers)
    rope_theta, rope_local, rope_factor = _rope_settings(raw, implied["use_qk_norm"])
    eos = pop("eos_token_id", 1)
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
    _refuse_unsupported(raw)

    cfg = GemmaConfig(
        vocab_size=pop("vocab_size", 256000),
        hidden_size=hidden,
        intermediate_size=pop("intermediate_size"),
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=pop("num_key_value_heads", heads),
        head_dim=head_dim,
        layer_types=tuple(layer_types),
        max_position_embeddings=pop("max_position_embeddings", 8192),
        rms_norm_eps=pop("rms_norm_eps", 1e-6),
        sliding_window=window,
        query_pre_attn_scalar=pop("query_pre_attn_scalar", None),
        attn_logit_softcapping=pop("attn_logit_softcapping", None),
        final_logit_softcapping=pop("final_logit_softcapping", None),
        rope_theta=rope_theta,
        rope_local_base_freq=rope_local,
        rope_scaling_factor=rope_factor,
        use_qk_norm=implied["use_qk_norm"],
        use_post_norms=implied["use_post_norms"],
        tie_word_embeddings=pop("tie_word_embeddings", True),
        bos_token_id=pop("bos_token_id", 2),
        pad_token_id=pop("pad_token_id", 0),
        eos_token_ids=eos_ids,
        architecture=arch,
        model_type=implied["model_type"],
        name=name,
    )
    leftover = sorted(k for k in raw if k not in _IGNORED_KEYS)
    if leftover:
        raise ConfigError(
            "config.json has keys gemmakit does not implement: "
            + ", ".join(f"{k}={raw[k]!r}" for k in leftover)
        )
    return cfg


def _is_multimodal(raw: dict[str, Any]) -> bool:
    """A multimodal Gemma 3 checkpoint: gemmakit runs its text half, a Gemma3ForCausalLM."""
    return (
        "Gemma3ForConditionalGeneration" in (raw.get("architectures") or [])
        or raw.get("model_type") == "gemma3"
    )


def _text_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The text half of a multimodal Gemma 3 config, as the Gemma3ForCausalLM config it is."""
    text = dict(raw.get("text_config") or {})
    text.setdefault("model_type", "gemma3_text")
    text["architectures"] = ["Gemma3ForCausalLM"]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in raw and key not in text:
            text[key] = raw[key]
    # The original multimodal config.json files leave these to Gemma3TextConfig's
    # defaults (transformers configuration_gemma3.py), so fill them in the same way.
    for key, value in _GEMMA3_TEXT_DEFAULTS.items():
        text.setdefault(key, value)
    return text


def _architecture(raw: dict[str, Any]) -> str:
    """The implemented architecture named by `architectures`, else by `model_type`."""
    arch_list = raw.get("architectures") or []
    arch = next((a for a in arch_list if a in _ARCHITECTURES), None)
    if arch is None:
        arch = _MODEL_TYPE_TO_ARCH.get(raw.get("model_type", ""))
    if arch is None:
        found = ", ".join(arch_list) or raw.get("model_type") or "none given"
        raise ConfigError(
            f"unsupported architecture ({found}); gemmakit runs Gemma 1, 2 and 3 text models: "
            + ", ".join(_ARCHITECTURES)
        )
    return arch


def _attention_layout(raw: dict[str, Any], implied: dict, num_layers: int) -> tuple[list[str], int | None]:
    """(layer types, sliding window), from the config or, when it is silent, the architecture."""
    pop = raw.pop
    window = pop("sliding_window", None)
    # Gemma 2's original config.json repeats the window as sliding_window_size.
    window_size = pop("sliding_window_size", None)
    if window_size is not None and window is not None and window_size != window:
        raise ConfigError(f"sliding_window {window} and sliding_window_size {window_size} disagree")
    window = window if window is not None else window_size
    layer_types = pop("layer_types", None)
    pattern = raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern")
    if layer_types is None:
        if implied["use_qk_norm"]:  # Gemma 3: every pattern-th layer is global
            pattern = pattern or 6
            layer_types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers)]
        elif implied["use_post_norms"]:  # Gemma 2: even layers slide
            layer_types = [SLIDING if i % 2 == 0 else FULL for i in range(num_layers)]
        else:
            layer_types = [FULL] * num_layers
    if implied["model_type"] == "gemma" and window is not None and SLIDING not in layer_types:
        window = None
    return layer_types, window


def _refuse_unsupported(raw: dict[str, Any]) -> None:
    """Pops the activation, attention and quantization keys, refusing any setting not implemented."""
    act = raw.pop("hidden_activation", None) or "gelu_pytorch_tanh"
    hidden_act = raw.pop("hidden_act", None)
    # Gemma 1 configs say hidden_act "gelu", but the model was trained with the tanh
    # approximation; transformers ignores hidden_act for Gemma (transformers GH#29402).
    if act not in ("gelu_pytorch_tanh", "gelu_tanh") or hidden_act not in (
        None, "gelu", "gelu_pytorch_tanh",
    ):  # fmt: skip
        raise ConfigError(f"unsupported activation {act!r} / {hidden_act!r}")
    for key in ("attention_bias", "attention_dropout", "use_bidirectional_attention"):
        value = raw.pop(key, None)
        if value not in (None, False, 0, 0.0):  # only the off setting is implemented
            raise ConfigError(f"config key {key}={value!r} is not supported")
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?")
        raise ConfigError(
            f"pre-quantized checkpoints ({method}) are not supported; "
            "load the full-precision checkpoint and use --quantize"
        )
    raw.pop("quantization_config", None)


def _rope_settings(raw: dict[str, Any], has_local_base: bool) -> tuple[float, float | None, float]:
    """(global base, local base, global linear factor) from either config layout.

    transformers 5 writes `rope_parameters` ({layer type: {rope_type, rope_theta, factor}});
    older files write rope_theta, rope_local_base_freq and rope_scaling.
    """
    params = raw.pop("rope_parameters", None)
    scaling = raw.pop("rope_scaling", None)
    theta = raw.pop("rope_theta", None)
    local = raw.pop("rope_local_base_freq", None)
    if params:
        per_type = params if FULL in params or SLIDING in params else {FULL: params}
        full = per_type.get(FULL) or {}
        slide = per_type.get(SLIDING) or {}
        theta = full.get("rope_theta", theta)
        local = slide.get("rope_theta", local) if slide else local
        scaling = full if full.get("rope_type", "default") != "default" else scaling
        if slide.get("rope_type", "default") != "default":
            raise ConfigError(f"RoPE scaling on sliding layers is not supported: {slide}")
    factor = 1.0
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind != "linear":
            raise ConfigError(f"RoPE scaling {kind!r} is not supported (only linear)")
        factor = float(scaling["factor"])
    theta = 10000.0 if theta is None else float(theta)
    if has_local_base:
        local = 10000.0 if local is None else float(local)
    return theta, local, factor


def load_hf_config(path: str | Path) -> GemmaConfig:
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    return from_hf_config(raw, name=path.name if path.is_dir() else path.parent.name)


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


# Public sizes, as the models' Hugging Face config.json files give them.
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
}  # fmt: skip


def preset(name: str) -> GemmaConfig:
    key = name.lower().removeprefix("google/").removesuffix("-it").removesuffix("-pt")
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[key]
