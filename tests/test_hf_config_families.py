"""Gemma 3n / Gemma 4 config.json reading: every per-layer shape gemmakit derives equals what
transformers' own config classes derive, and gemmakit's config.json reads back the same."""

import json
from pathlib import Path

import pytest
import transformers

from gemmakit.config import FULL
from gemmakit.errors import ConfigError
from gemmakit.hf_config import from_hf_config, to_hf_config

GEMMA4_VARIANTS = {
    "dense_k_eq_v": dict(
        num_hidden_layers=6, attention_k_eq_v=True, global_head_dim=64, num_global_key_value_heads=1,
        num_key_value_heads=2, head_dim=32, num_kv_shared_layers=2, use_double_wide_mlp=True,
        layer_types=["sliding_attention", "full_attention"] * 3,
    ),
    "moe": dict(
        num_hidden_layers=4, enable_moe_block=True, num_experts=8, top_k_experts=2,
        moe_intermediate_size=48, hidden_size_per_layer_input=0, global_head_dim=48,
    ),
    "kv_heads_ignored_without_k_eq_v": dict(num_hidden_layers=3, num_global_key_value_heads=1),
}  # fmt: skip


def _transformers_shapes(hf, n):
    per_layer = [hf.per_layer_config[i] for i in range(n)]
    modes = hf.kv_sharing_modes
    return (
        [c.head_dim for c in per_layer],
        [c.num_key_value_heads for c in per_layer],
        [m == "reuse" for m in modes],
    )


@pytest.mark.parametrize("variant", sorted(GEMMA4_VARIANTS))
def test_gemma4_shapes_match_transformers(variant):
    hf = transformers.Gemma4TextConfig(**GEMMA4_VARIANTS[variant])
    for raw in (hf.to_dict(), {**GEMMA4_VARIANTS[variant], "model_type": "gemma4_text"}):
        cfg = from_hf_config(raw)
        n = cfg.num_hidden_layers
        head_dims, kv_heads, shared = _transformers_shapes(hf, n)
        assert [cfg.layer_head_dim(i) for i in range(n)] == head_dims
        assert [cfg.layer_kv_heads(i) for i in range(n)] == kv_heads
        assert [not cfg.layer_owns_kv(i) for i in range(n)] == shared
        assert list(cfg.layer_types) == hf.layer_types
        assert cfg.rope_partial(FULL) == hf.rope_parameters[FULL]["partial_rotary_factor"]
        assert cfg.hidden_size_per_layer_input == hf.hidden_size_per_layer_input
        assert cfg.num_experts == (hf.num_experts or 0)
        assert cfg.attention_scale == 1.0 and not cfg.norm_unit_offset and cfg.use_layer_scalar
    # What gemmakit writes, transformers reads into the same shapes, and gemmakit reads back.
    hf_back = transformers.Gemma4TextConfig(**to_hf_config(cfg))
    assert _transformers_shapes(hf_back, n) == (head_dims, kv_heads, shared)
    assert from_hf_config(to_hf_config(cfg)) == cfg


def test_gemma4_kv_source_is_the_last_producer_of_the_type():
    hf = transformers.Gemma4TextConfig(**GEMMA4_VARIANTS["dense_k_eq_v"])
    cfg = from_hf_config(hf.to_dict())
    stores = {i for i, m in enumerate(hf.kv_sharing_modes) if m == "store"}
    sources = cfg.kv_source_layers
    for i, source in enumerate(sources):
        assert cfg.layer_types[source] == cfg.layer_types[i]
        assert source == i if cfg.layer_owns_kv(i) else source in stores
    # The double-wide MLP is on the shared layers only.
    assert [cfg.layer_intermediate_size(i) for i in range(6)] == [9216] * 4 + [2 * 9216] * 2


def test_gemma3n_per_layer_widths_and_sparsity():
    widths = [64, 96, 64, 128, 64]
    hf = transformers.Gemma3nTextConfig(
        num_hidden_layers=5, intermediate_size=widths, num_kv_shared_layers=2,
        activation_sparsity_pattern=[0.95, 0.9, 0.0, 0.0, 0.0],
        layer_types=["sliding_attention", "full_attention"] * 2 + ["sliding_attention"],
    )  # fmt: skip
    cfg = from_hf_config(hf.to_dict())
    assert [cfg.layer_intermediate_size(i) for i in range(5)] == widths
    assert [cfg.layer_activation_sparsity(i) for i in range(5)] == [0.95, 0.9, 0.0, 0.0, 0.0]
    assert cfg.kv_source_layers == (0, 1, 2, 1, 2)
    assert (cfg.altup_num_inputs, cfg.laurel_rank, cfg.final_logit_softcapping) == (4, 64, 30.0)
    assert from_hf_config(to_hf_config(cfg)) == cfg
    # Defaults: a deep model's first ten layers are sparse (Gemma3nTextConfig).
    deep = from_hf_config({"model_type": "gemma3n_text", "num_hidden_layers": 12, "num_kv_shared_layers": 2})
    assert deep.activation_sparsity_pattern == (0.95,) * 10 + (0.0,) * 2


def test_multimodal_configs_read_their_text_tower():
    for cls, text_cls in (
        (transformers.Gemma4Config, transformers.Gemma4TextConfig),
        (transformers.Gemma3nConfig, transformers.Gemma3nTextConfig),
    ):
        text = text_cls(num_hidden_layers=5, num_kv_shared_layers=0)
        raw = cls(text_config=text.to_dict()).to_dict()
        raw["architectures"] = [cls.__name__.replace("Config", "ForConditionalGeneration")]
        cfg = from_hf_config(raw)
        assert cfg.model_type == text.model_type and cfg.num_hidden_layers == 5


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
        ({"enable_moe_block": True, "num_experts": 4}, "enable_moe_block needs"),
        ({"num_kv_shared_layers": 6}, "num_kv_shared_layers"),
        ({"per_layer_config": {"0": {"head_dim": 64}}}, "per_layer_config"),
    ],
)
def test_gemma4_settings_gemmakit_cannot_honour_are_refused(changes, message):
    raw = {"model_type": "gemma4_text", "num_hidden_layers": 6, **changes}
    with pytest.raises(ConfigError, match=message):
        from_hf_config(raw)


REAL_CONFIGS = Path(__file__).parent / "data" / "configs"


@pytest.mark.parametrize(
    "file", ["gemma-3n-E2B-it", "gemma-3n-E4B-it", "gemma-4-E2B", "gemma-4-E4B-it", "gemma-4-26B-A4B-it"]
)
def test_real_configs_read_as_transformers_reads_them(file):
    raw = json.loads((REAL_CONFIGS / f"{file}.json").read_text())
    cfg = from_hf_config(raw)
    text = transformers.AutoConfig.for_model(**raw).text_config
    n = text.num_hidden_layers
    assert list(cfg.layer_types) == list(text.layer_types)
    assert [not cfg.layer_owns_kv(i) for i in range(n)] == [m == "reuse" for m in text.kv_sharing_modes]
    if cfg.model_type == "gemma4_text":
        assert [cfg.layer_head_dim(i) for i in range(n)] == [
            text.per_layer_config[i].head_dim for i in range(n)
        ]
        kv = [text.per_layer_config[i].num_key_value_heads for i in range(n)]
        assert [cfg.layer_kv_heads(i) for i in range(n)] == kv
    sizes = (
        text.intermediate_size if isinstance(text.intermediate_size, list) else [text.intermediate_size] * n
    )
    double = [
        2 if getattr(text, "use_double_wide_mlp", False) and m == "reuse" else 1
        for m in text.kv_sharing_modes
    ]
    assert [cfg.layer_intermediate_size(i) for i in range(n)] == [s * d for s, d in zip(sizes, double)]
