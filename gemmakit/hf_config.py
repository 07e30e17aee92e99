"""Hugging Face `config.json` <-> `GemmaConfig`.

`from_hf_config` maps every key of a transformers config onto a field or refuses it
(`ConfigError`), so a checkpoint is never run with a setting silently dropped; keys a config
omits take the defaults of transformers' own config class for that family
(configuration_gemma{,2,3,3n,4}.py). `to_hf_config` writes the dict transformers loads back
into the same model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gemmakit.config import FULL, SLIDING, AssistantConfig, GemmaConfig
from gemmakit.errors import ConfigError

# --- From Hugging Face config.json ------------------------------------------------------

# Architectures gemmakit implements, and the behaviours each one's config implies when the
# config itself is silent (old config.json files predate layer_types and friends).
# `full_every`: without layer_types, every full_every-th layer is global (transformers'
# config classes); Gemma 2 alternates instead, Gemma 1 has no sliding layers.
_ARCHITECTURES = {
    "GemmaForCausalLM": dict(model_type="gemma", use_post_norms=False, use_qk_norm=False),
    "Gemma2ForCausalLM": dict(model_type="gemma2", use_post_norms=True, use_qk_norm=False),
    "Gemma3ForCausalLM": dict(model_type="gemma3_text", use_post_norms=True, use_qk_norm=True, full_every=6),
    "Gemma3nForCausalLM": dict(
        model_type="gemma3n_text", use_post_norms=True, use_qk_norm=True, full_every=5
    ),
    "Gemma4ForCausalLM": dict(model_type="gemma4_text", use_post_norms=True, use_qk_norm=True, full_every=6),
}
# What Gemma 3n and 4 always do (transformers modeling_gemma3n.py / modeling_gemma4.py): norms
# multiply by w, attention is unscaled, values are normed; Gemma 4 scales each block's output.
_FIXED_BEHAVIOURS = {
    "Gemma3nForCausalLM": dict(norm_unit_offset=False, fixed_attention_scale=1.0, use_v_norm=True),
    "Gemma4ForCausalLM": dict(
        norm_unit_offset=False, fixed_attention_scale=1.0, use_v_norm=True, use_layer_scalar=True
    ),
}
_REQUIRED_KEYS = ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size")
_MODEL_TYPE_TO_ARCH = {
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3n_text": "Gemma3nForCausalLM",
    "gemma4_text": "Gemma4ForCausalLM",
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


# transformers' Gemma3nTextConfig / Gemma4TextConfig defaults, for keys a config.json omits.
_GEMMA3N_TEXT_DEFAULTS = {
    "vocab_size": 262_400, "hidden_size": 2048, "intermediate_size": 16_384,
    "num_hidden_layers": 35, "num_attention_heads": 8, "num_key_value_heads": 2,
    "head_dim": 256, "max_position_embeddings": 32_768, "sliding_window": 512,
    "final_logit_softcapping": 30.0, "vocab_size_per_layer_input": 262_144,
    "hidden_size_per_layer_input": 256, "altup_active_idx": 0, "altup_coef_clip": 120.0,
    "altup_correct_scale": True, "altup_num_inputs": 4, "num_kv_shared_layers": 15,
    "laurel_rank": 64, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
}  # fmt: skip
_GEMMA4_TEXT_DEFAULTS = {
    "vocab_size": 262_144, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 30, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 256, "max_position_embeddings": 131_072, "sliding_window": 512,
    "vocab_size_per_layer_input": 262_144, "hidden_size_per_layer_input": 256,
    "rope_parameters": {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    },
}  # fmt: skip
_FAMILY_DEFAULTS = {"Gemma3nForCausalLM": _GEMMA3N_TEXT_DEFAULTS, "Gemma4ForCausalLM": _GEMMA4_TEXT_DEFAULTS}
# Multimodal checkpoints: gemmakit runs their text tower, whose config sits under text_config.
_MULTIMODAL = {
    "Gemma3ForConditionalGeneration": ("gemma3", "gemma3_text", "Gemma3ForCausalLM"),
    "Gemma3nForConditionalGeneration": ("gemma3n", "gemma3n_text", "Gemma3nForCausalLM"),
    "Gemma4ForConditionalGeneration": ("gemma4", "gemma4_text", "Gemma4ForCausalLM"),
}


def from_hf_config(raw: dict[str, Any], name: str = "") -> GemmaConfig:
    """Builds a GemmaConfig from a transformers `config.json` dict.

    Each part of the config is read by its own helper, which pops the keys it honours; a key
    left over at the end is one gemmakit does not implement.

    Raises:
        ConfigError: for an architecture other than Gemma 1/2/3 text, or any key whose
            value gemmakit cannot honour exactly.
    """
    raw = dict(raw)
    multimodal = _multimodal_kind(raw)
    if multimodal:
        return from_hf_config(_text_config(raw, multimodal), name)
    arch = _architecture(raw)
    implied = _ARCHITECTURES[arch]
    for key, value in _FAMILY_DEFAULTS.get(arch, {}).items():
        raw.setdefault(key, value)
    missing = [k for k in _REQUIRED_KEYS if k not in raw]
    if missing:
        raise ConfigError(f"config.json lacks required key(s): {', '.join(missing)}")
    pop = raw.pop
    num_layers = pop("num_hidden_layers")
    heads = pop("num_attention_heads")
    hidden = pop("hidden_size")
    head_dim = pop("head_dim", None) or hidden // heads
    layer_types, window = _attention_layout(raw, implied, num_layers)
    rope_theta, rope_local, rope_factor, rope_partial = _rope_settings(raw, implied["use_qk_norm"])
    eos = pop("eos_token_id", 1)
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
    _refuse_unsupported(raw)
    intermediate = pop("intermediate_size")
    extra: dict[str, Any] = dict(_FIXED_BEHAVIOURS.get(arch, {}))
    if arch in _FIXED_BEHAVIOURS:
        # Some Gemma 3n config.json files carry query_pre_attn_scalar; its attention scale is
        # fixed at 1.0 and transformers' Gemma3nTextConfig has no such key: it changes nothing.
        raw.pop("query_pre_attn_scalar", None)
        extra.update(_new_family_fields(raw, arch, layer_types, intermediate))
        intermediate = extra.pop("intermediate_size")
    elif not isinstance(intermediate, int):
        raise ConfigError(f"intermediate_size must be an integer, not {intermediate!r}")
    if rope_partial != 1.0:
        extra["rope_partial_rotary_factor"] = rope_partial

    cfg = GemmaConfig(
        vocab_size=pop("vocab_size", 256000),
        hidden_size=hidden,
        intermediate_size=intermediate,
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
        **extra,
    )
    _refuse_unknown_keys(raw)
    return cfg


def _multimodal_kind(raw: dict[str, Any]) -> tuple[str, str, str] | None:
    """(model_type, text model_type, text architecture) of a multimodal Gemma 3/3n/4 config."""
    for arch, kind in _MULTIMODAL.items():
        if arch in (raw.get("architectures") or []) or raw.get("model_type") == kind[0]:
            return kind
    return None


def _text_config(raw: dict[str, Any], kind: tuple[str, str, str]) -> dict[str, Any]:
    """The text half of a multimodal config, as the causal-LM config it is."""
    _, text_type, text_arch = kind
    text = dict(raw.get("text_config") or {})
    text.setdefault("model_type", text_type)
    text["architectures"] = [text_arch]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in raw and key not in text:
            text[key] = raw[key]
    if text_arch == "Gemma3ForCausalLM":
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
            f"unsupported architecture ({found}); gemmakit runs Gemma 1, 2, 3, 3n and 4 text models: "
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
        if implied.get("full_every"):  # Gemma 3/3n/4: every pattern-th layer is global
            pattern = pattern or implied["full_every"]
            layer_types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers)]
        elif implied["use_post_norms"]:  # Gemma 2: even layers slide
            layer_types = [SLIDING if i % 2 == 0 else FULL for i in range(num_layers)]
        else:
            layer_types = [FULL] * num_layers
    if implied["model_type"] == "gemma" and window is not None and SLIDING not in layer_types:
        window = None
    if implied["model_type"] == "gemma4_text" and layer_types and layer_types[-1] != FULL:
        # Gemma4TextConfig forces the last layer global (configuration_gemma4.py).
        layer_types = [*layer_types[:-1], FULL]
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
    # "vision" makes only image tokens attend both ways; text, all gemmakit feeds, stays causal.
    if raw.get("use_bidirectional_attention") == "vision":
        raw.pop("use_bidirectional_attention")
    for key in ("attention_bias", "attention_dropout", "use_bidirectional_attention"):
        value = raw.pop(key, None)
        if value not in (None, False, 0, 0.0):  # only the off setting is implemented
            raise ConfigError(f"config key {key}={value!r} is not supported")
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?")
        if method not in (
            "gptq",
            "awq",
        ):  # GPTQ/AWQ folders: gemmakit.loading reads them (formats/gptq_folder.py)
            raise ConfigError(
                f"pre-quantized checkpoints ({method}) are not supported; "
                "load the full-precision checkpoint and use --quantize"
            )
    raw.pop("quantization_config", None)


def _rope_settings(raw: dict[str, Any], has_local_base: bool) -> tuple[float, float | None, float, float]:
    """(global base, local base, global linear factor, global rotary fraction) from either
    config layout.

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
    factor, partial = 1.0, 1.0
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind not in ("linear", "proportional"):
            raise ConfigError(f"RoPE scaling {kind!r} is not supported (linear, proportional)")
        # Proportional RoPE divides its frequencies by `factor` as linear scaling does
        # (transformers modeling_rope_utils._compute_proportional_rope_parameters).
        factor = float(scaling.get("factor", 1.0))
        if kind == "proportional":
            partial = float(scaling.get("partial_rotary_factor", 1.0))
    theta = 10000.0 if theta is None else float(theta)
    if has_local_base:
        local = 10000.0 if local is None else float(local)
    return theta, local, factor, partial


def _new_family_fields(raw: dict[str, Any], arch: str, layer_types, intermediate) -> dict[str, Any]:
    """Pops the Gemma 3n / Gemma 4 keys into GemmaConfig fields (intermediate_size included)."""
    pop = raw.pop
    n = len(layer_types)
    fields: dict[str, Any] = {
        "hidden_size_per_layer_input": pop("hidden_size_per_layer_input") or 0,
        "vocab_size_per_layer_input": pop("vocab_size_per_layer_input") or 0,
        "num_kv_shared_layers": pop("num_kv_shared_layers", 0) or 0,
    }
    if isinstance(intermediate, list):
        fields["intermediate_sizes"] = tuple(intermediate)
        intermediate = intermediate[0]
    fields["intermediate_size"] = intermediate
    if arch == "Gemma3nForCausalLM":
        sparsity = pop("activation_sparsity_pattern", None)
        if sparsity is None:  # Gemma3nTextConfig: the first 10 layers of a deep model are sparse
            sparse = 10 if n > 10 else 0
            sparsity = [0.95] * sparse + [0.0] * (n - sparse)
        if not isinstance(sparsity, list):
            raise ConfigError("activation_sparsity_pattern must list one value per layer")
        fields["activation_sparsity_pattern"] = tuple(float(x) for x in sparsity)
        for key in (
            "altup_num_inputs",
            "altup_active_idx",
            "altup_coef_clip",
            "altup_correct_scale",
            "laurel_rank",
        ):
            fields[key] = pop(key)
        raw.pop("altup_lr_multiplier", None)  # a training hyperparameter; no effect on the network
        return fields
    fields["use_double_wide_mlp"] = bool(pop("use_double_wide_mlp", False))
    k_eq_v = bool(pop("attention_k_eq_v", False))
    fields["attention_k_eq_v"] = k_eq_v
    head_dim, kv_heads = _global_attention_shape(raw, layer_types, k_eq_v)
    fields["global_head_dim"], fields["num_global_key_value_heads"] = head_dim, kv_heads
    # Early Gemma 4 config.json files name the expert width expert_intermediate_size.
    expert_width = pop("moe_intermediate_size", None)
    alias = pop("expert_intermediate_size", None)
    experts = (
        pop("num_experts", None),
        pop("top_k_experts", None),
        alias if expert_width is None else expert_width,
    )
    if pop("enable_moe_block", False):
        if None in experts:
            raise ConfigError("enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size")
        fields["num_experts"], fields["top_k_experts"], fields["moe_intermediate_size"] = experts
    return fields


def _global_attention_shape(raw: dict[str, Any], layer_types, k_eq_v: bool) -> tuple[int, int | None]:
    """(head_dim, KV heads or None) of Gemma 4's full-attention layers.

    transformers 5 serializes them as `per_layer_config` ({layer: overrides}); published
    configs say `global_head_dim` (default 512) and `num_global_key_value_heads`, the latter
    honoured only with attention_k_eq_v (configuration_gemma4.py, Gemma4TextConfig).
    """
    head_dim = raw.pop("global_head_dim", 512)
    kv_heads = raw.pop("num_global_key_value_heads", None)
    per_layer = raw.pop("per_layer_config", None)
    if per_layer is None:
        return head_dim, (kv_heads if k_eq_v else None)
    full = [i for i, t in enumerate(layer_types) if t == FULL]
    overrides = {int(k): v for k, v in per_layer.items()}
    if set(overrides) != set(full) or any(
        set(v) - {"head_dim", "num_key_value_heads"} for v in overrides.values()
    ):
        raise ConfigError(
            f"per_layer_config must override head_dim / num_key_value_heads on exactly the full-attention layers {full}"
        )
    shapes = {(v.get("head_dim"), v.get("num_key_value_heads")) for v in overrides.values()}
    if len(shapes) != 1:
        raise ConfigError(
            f"per_layer_config gives the full-attention layers different shapes: {sorted(map(str, shapes))}"
        )
    head_dim, kv_heads = shapes.pop()
    if head_dim is None:
        raise ConfigError("per_layer_config must give the full-attention layers' head_dim")
    return head_dim, kv_heads


def load_hf_config(path: str | Path) -> GemmaConfig:
    return _load(path, from_hf_config)


def load_hf_assistant_config(path: str | Path) -> AssistantConfig:
    """A Gemma 4 MTP drafter's config.json (model_type gemma4_assistant)."""
    return _load(path, from_hf_assistant_config)


def from_hf_assistant_config(raw: dict[str, Any], name: str = "") -> AssistantConfig:
    """An AssistantConfig from a `gemma4_assistant` config.json dict: its text_config read as
    a Gemma 4 text model's (with its KV-shared count taken as the drafter's rule, see
    `AssistantConfig.text`), the drafter's own keys beside it.

    Raises:
        ConfigError: not a gemma4_assistant, or a key gemmakit cannot honour.
    """
    raw = dict(raw)
    if raw.get("model_type") != "gemma4_assistant":
        found = raw.get("model_type") or "none given"
        raise ConfigError(f"not a Gemma 4 assistant (model_type {found!r}, expected 'gemma4_assistant')")
    text = dict(raw.pop("text_config", None) or {})
    text.setdefault("model_type", "gemma4_text")
    text["architectures"] = ["Gemma4ForCausalLM"]
    layers = text.get("num_hidden_layers")
    # transformers Gemma4AssistantConfig: every layer reuses the target's keys and values.
    shared = text.pop("num_kv_shared_layers", None)
    if shared not in (None, 0, layers):
        raise ConfigError(
            f"every layer of a gemma4_assistant reads the target's KV; num_kv_shared_layers={shared}"
        )
    # Whether attention is causal is moot: the drafter's one query attends over the target's keys.
    text.pop("use_bidirectional_attention", None)
    text_config = from_hf_config(text, name)
    fields = {
        k: raw.pop(k)
        for k in (
            "use_ordered_embeddings",
            "num_centroids",
            "centroid_intermediate_top_k",
            "tie_word_embeddings",
        )
        if k in raw
    }
    if "backbone_hidden_size" not in raw:
        raise ConfigError("a gemma4_assistant config.json needs backbone_hidden_size")
    config = AssistantConfig(text_config, raw.pop("backbone_hidden_size"), **fields)
    _refuse_unknown_keys(raw)
    return config


def _refuse_unknown_keys(raw: dict) -> None:
    """A config.json key left after conversion is one gemmakit does not honour: refuse it."""
    leftover = sorted(k for k in raw if k not in _IGNORED_KEYS)
    if leftover:
        raise ConfigError(
            "config.json has keys gemmakit does not implement: "
            + ", ".join(f"{k}={raw[k]!r}" for k in leftover)
        )


def _load(path: str | Path, convert):
    """`convert(raw, name)` of the config.json at `path` (a folder or the file), every
    mistake in it a one-line ConfigError naming the file."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: not a JSON object (found {type(raw).__name__})")
    try:
        return convert(raw, name=path.name if path.is_dir() else path.parent.name)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    except (
        ValueError,
        TypeError,
        ZeroDivisionError,
        OverflowError,
        KeyError,
        IndexError,
        AttributeError,
    ) as e:
        # A value of the wrong kind ("hidden_size": "big", a list where a dict belongs).
        raise ConfigError(f"{file}: invalid value ({type(e).__name__}: {e})") from None


# --- To Hugging Face config.json ---------------------------------------------------------


def to_hf_config(config: GemmaConfig) -> dict[str, Any]:
    """A config.json dict that transformers loads into the equivalent model."""
    out: dict[str, Any] = {
        "architectures": [config.architecture],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_theta": config.rope_theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids)
        if len(config.eos_token_ids) > 1
        else config.eos_token_ids[0],
        "pad_token_id": config.pad_token_id,
    }
    if config.use_post_norms:  # Gemma 2 and 3 keys
        out["query_pre_attn_scalar"] = config.query_pre_attn_scalar or config.head_dim
        out["sliding_window"] = config.sliding_window
        out["layer_types"] = list(config.layer_types)
        out["attn_logit_softcapping"] = config.attn_logit_softcapping
        out["final_logit_softcapping"] = config.final_logit_softcapping
    if config.model_type in ("gemma3n_text", "gemma4_text"):
        return _new_family_hf_keys(config, out)
    if config.use_qk_norm:
        out["rope_local_base_freq"] = config.rope_local_base_freq
        out["rope_scaling"] = (
            {"rope_type": "linear", "factor": config.rope_scaling_factor}
            if config.rope_scaling_factor != 1.0
            else None
        )
    return out


def _new_family_hf_keys(config: GemmaConfig, out: dict[str, Any]) -> dict[str, Any]:
    """The Gemma 3n / Gemma 4 text-config keys, in transformers 5's layout."""
    del out["query_pre_attn_scalar"], out["attn_logit_softcapping"], out["rope_theta"]
    full_rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_partial_rotary_factor != 1.0 or config.model_type == "gemma4_text":
        full_rope = {
            "rope_type": "proportional",
            "partial_rotary_factor": config.rope_partial_rotary_factor,
            "rope_theta": config.rope_theta,
        }
    if config.rope_scaling_factor != 1.0:
        full_rope["factor"] = config.rope_scaling_factor
    out["rope_parameters"] = {
        SLIDING: {"rope_type": "default", "rope_theta": config.rope_local_base_freq},
        FULL: full_rope,
    }
    out["hidden_size_per_layer_input"] = config.hidden_size_per_layer_input
    out["vocab_size_per_layer_input"] = config.vocab_size_per_layer_input
    out["num_kv_shared_layers"] = config.num_kv_shared_layers
    if config.intermediate_sizes:
        out["intermediate_size"] = list(config.intermediate_sizes)
    if config.model_type == "gemma3n_text":
        out["activation_sparsity_pattern"] = list(config.activation_sparsity_pattern or ())
        for key in (
            "altup_num_inputs",
            "altup_active_idx",
            "altup_coef_clip",
            "altup_correct_scale",
            "laurel_rank",
        ):
            out[key] = getattr(config, key)
        return out
    out["use_double_wide_mlp"] = config.use_double_wide_mlp
    out["attention_k_eq_v"] = config.attention_k_eq_v
    out["global_head_dim"] = config.global_head_dim or config.head_dim
    if config.num_global_key_value_heads:
        out["num_global_key_value_heads"] = config.num_global_key_value_heads
    out["enable_moe_block"] = bool(config.num_experts)
    if config.num_experts:
        out["num_experts"] = config.num_experts
        out["top_k_experts"] = config.top_k_experts
        out["moe_intermediate_size"] = config.moe_intermediate_size
    return out
