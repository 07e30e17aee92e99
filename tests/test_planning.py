"""Parameter accounting and memory planning against published and hand-derived numbers.

The configs under tests/data/configs reproduce the models' public config.json files (every
key that shapes the model; `transformers_version` stamps may differ from the hub copies):
meta-llama/Llama-2-7b-hf, mistralai/Mistral-7B-v0.1, Qwen/Qwen1.5-7B (also in transformers'
examples/pytorch/torchacc), google/gemma-2b, gemma-7b, gemma-2-9b (with its legacy
sliding_window_size key), gemma-3-1b-it, gemma-3-270m and the original gemma-3-4b-it (a
multimodal config whose text_config leaves most keys to transformers' defaults). Expected
counts are computed by hand from the configs and agree with the Gemma technical reports'
non-embedding counts (arXiv 2403.08295 Table 2, 2408.00118), Gemma 3's reported 698M and
3,209M (arXiv 2503.19786 Table 1) and Qwen1.5-7B's safetensors total_size / 2.
"""

import json
import math
from pathlib import Path

import pytest

from gemmakit.config import PRESETS, PROJECTIONS
from gemmakit.errors import ConfigError
from gemmakit.formats.gguf import hf_to_gguf_name
from gemmakit.hf_config import from_hf_config
from gemmakit.planning.architecture import Architecture, from_gemma_config, from_gguf, from_hf_dict
from gemmakit.planning.kv_cache import kv_cache
from gemmakit.planning.params import count_params, lora_params
from gemmakit.planning.prose import GB
from gemmakit.planning.training_memory import training_memory
from gemmakit.planning.weights import gguf_bytes, gguf_tensor_types, nf4_bytes, weight_bytes

CONFIGS = Path(__file__).parent / "data" / "configs"


def arch(name: str) -> Architecture:
    return from_hf_dict(json.loads((CONFIGS / f"{name}.json").read_text()), name)


# name: (total, embedding, non-embedding)
EXACT = {
    "llama-2-7b": (6_738_415_616, 262_144_000, 6_476_271_616),
    "mistral-7b-v0.1": (7_241_732_096, 262_144_000, 6_979_588_096),
    "qwen1.5-7b": (7_721_324_544, 1_244_659_712, 6_476_664_832),
    "gemma-7b": (8_537_680_896, 786_432_000, 7_751_248_896),
    "gemma-2b": (2_506_172_416, 524_288_000, 1_981_884_416),
    "gemma-2-9b": (9_241_705_984, 917_504_000, 8_324_201_984),
    "gemma-3-1b": (999_885_952, 301_989_888, 697_896_064),
    "gemma-3-270m": (268_098_176, 167_772_160, 100_326_016),
}


@pytest.mark.parametrize("name", EXACT)
def test_counts_from_real_configs_are_exact(name):
    p = count_params(arch(name))
    assert (p.total, p.embedding, p.non_embedding) == EXACT[name]


def test_qwen_counts_its_qkv_bias_and_llama_has_none():
    # Qwen1.5-7B and Llama 2 7B share every block dimension; only Qwen has q/k/v biases.
    llama, qwen = count_params(arch("llama-2-7b")), count_params(arch("qwen1.5-7b"))
    assert qwen.non_embedding - llama.non_embedding == 32 * 3 * 4096
    assert arch("qwen1.5-7b").qkv_bias and not arch("llama-2-7b").qkv_bias


def test_untied_models_count_input_and_output_embeddings():
    assert count_params(arch("llama-2-7b")).embedding == 2 * 32000 * 4096
    raw = json.loads((CONFIGS / "gemma-2b.json").read_text())
    untied = count_params(from_hf_dict({**raw, "tie_word_embeddings": False}, "x"))
    assert untied.embedding == 2 * 524_288_000
    assert untied.total == 2_506_172_416 + 524_288_000


def test_gemma3_4b_multimodal_config_counts_text_and_vision_apart():
    a = arch("gemma-3-4b-it")
    p = count_params(a)
    # text_config omits heads, KV heads, head_dim and vocab: transformers' defaults apply.
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.vocab_size) == (8, 4, 256, 262208)
    assert (p.text, p.embedding, p.non_embedding) == (3_880_263_168, 671_252_480, 3_209_010_688)
    # SigLIP-So400m tower (the report's "417M") plus the 1152 -> 2560 projector and its norm.
    assert p.vision == 416_866_032 + 1152 * 2560 + 1152
    assert p.total == 4_300_079_472
    assert a.sliding_window == 1024 and a.rope_scaling == "linear x8 on global layers"
    assert (a.num_sliding, a.num_global) == (29, 5)


def test_gemma2_config_with_legacy_window_key_parses():
    a = arch("gemma-2-9b")  # its config.json also says sliding_window_size: 4096
    assert a.layer_types[:2] == ("sliding_attention", "full_attention")
    assert (a.num_sliding, a.num_global, a.sliding_window) == (21, 21, 4096)
    assert (a.attn_logit_softcapping, a.final_logit_softcapping, a.norms_per_layer) == (50.0, 30.0, 4)


# (total, embedding), computed by hand, for the presets without a config file here.
PRESET_COUNTS = {
    "gemma-2-2b": (2_614_341_888, 589_824_000),
    "gemma-2-27b": (27_227_128_320, 1_179_648_000),
    "gemma-3-4b": (3_880_263_168, 671_252_480),
}


@pytest.mark.parametrize("name", PRESET_COUNTS)
def test_preset_counts(name):
    p = count_params(from_gemma_config(PRESETS[name]))
    assert (p.total, p.embedding) == PRESET_COUNTS[name]


@pytest.mark.parametrize("name", ["gemma-2b", "gemma-7b", "gemma-2-9b", "gemma-3-1b", "gemma-3-270m"])
def test_presets_agree_with_config_files(name):
    preset = from_gemma_config(PRESETS[name])
    assert [(t.name, t.shape) for t in preset.tensors()] == [(t.name, t.shape) for t in arch(name).tensors()]


# The Gemma reports' embedding figures: a vocabulary padded to 256,128 rows.
@pytest.mark.parametrize(
    "name,reported",
    [("gemma-2b", 524_550_144), ("gemma-7b", 786_825_216), ("gemma-2-2b", 590_118_912),
     ("gemma-2-9b", 917_962_752), ("gemma-2-27b", 1_180_237_824)],
)  # fmt: skip
def test_report_embedding_counts_use_the_padded_vocabulary(name, reported):
    p = count_params(from_gemma_config(PRESETS[name]))
    assert p.report_embedding == reported
    assert p.report_embedding - p.embedding == 128 * PRESETS[name].hidden_size


def test_gemma3_has_no_padded_vocabulary_note():
    assert count_params(arch("gemma-3-1b")).report_embedding is None


# --- Memory -------------------------------------------------------------------------------------


def test_nf4_double_quant_costs_4_127_bits_per_weight():
    n = 64 * 256 * 1000
    assert nf4_bytes(n) * 8 / n == pytest.approx(4.127, abs=5e-4)
    assert nf4_bytes(n) == n // 2 + n // 64 + 4 * (n // 64 // 256)


@pytest.mark.parametrize(
    "name,fp32,bf16,int8,nf4",
    [("gemma-3-270m", 1.07, 0.54, 0.44, 0.39), ("gemma-2b", 10.0, 5.01, 3.03, 2.07),
     ("gemma-7b", 34.2, 17.1, 9.32, 5.57)],
)  # fmt: skip
def test_weight_memory_matches_hand_computed_sizes(name, fp32, bf16, int8, nf4):
    a = from_gemma_config(PRESETS[name])
    got = {p: weight_bytes(a, p) / GB for p in ("fp32", "bf16", "int8", "nf4")}
    expected = {"fp32": fp32, "bf16": bf16, "int8": int8, "nf4": nf4}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=0.011 * max(1, value)), key


def test_nf4_keeps_embeddings_in_16_bit():
    a = from_gemma_config(PRESETS["gemma-7b"])
    tensors = a.tensors()
    linear = sum(nf4_bytes(t.numel) for t in tensors if t.is_linear)
    other = sum(2 * t.numel for t in tensors if not t.is_linear)
    assert weight_bytes(a, "nf4") == linear + other
    assert other >= 2 * 256000 * 3072  # the tied embedding, unquantized


def test_q8_0_is_8_5_bits_and_q4_0_puts_the_output_in_q6_k():
    a = arch("llama-2-7b")
    matrices = sum(t.numel for t in a.tensors() if len(t.shape) == 2)
    vectors = sum(t.numel for t in a.tensors() if len(t.shape) == 1)
    assert weight_bytes(a, "q8_0") == matrices * 34 // 32 + 4 * vectors
    types = gguf_tensor_types(a, "q4_0")
    assert types["lm_head.weight"] == "Q6_K" and types["model.embed_tokens.weight"] == "Q4_0"
    # Published llama-2-7b GGUF sizes (4.08 / 3.83 / 7.16 GB) hold these tensor bytes plus ~1 MB.
    assert [round(weight_bytes(a, f) / 1e7) for f in ("q4_k_m", "q4_0", "q8_0")] == [408, 383, 716]


def test_q4_k_m_rule_reproduces_the_bundled_gguf_tensor_by_tensor():
    from gemmakit.formats.gguf import GGUFFile, gguf_to_hf_name
    from gemmakit.loading import resolve

    g = GGUFFile(resolve(None).path)
    a = from_gguf(g)
    predicted = gguf_tensor_types(a, "q4_k_m")
    actual = {gguf_to_hf_name(name): t.ggml_type.name for name, t in g.tensors.items()}
    assert predicted == actual
    per_type: dict[str, int] = {}
    for t in g.tensors.values():
        per_type[t.ggml_type.name] = per_type.get(t.ggml_type.name, 0) + t.nbytes
    assert gguf_bytes(a, "q4_k_m") == per_type
    assert sum(math.prod(t.shape) for t in g.tensors.values()) == 268_098_176


# bf16 bytes per token: 2 (K and V) * layers * kv_heads * head_dim * 2.
@pytest.mark.parametrize(
    "name,per_token",
    [("gemma-2b", 18_432), ("gemma-7b", 458_752), ("gemma-2-2b", 106_496), ("gemma-3-270m", 18_432),
     ("gemma-3-1b", 26_624)],
)  # fmt: skip
def test_kv_bytes_per_token(name, per_token):
    assert kv_cache(from_gemma_config(PRESETS[name]), 1).bytes_per_token == per_token


def test_kv_cache_caps_sliding_layers_at_their_window():
    g3 = from_gemma_config(PRESETS["gemma-3-270m"])  # 15 local layers (512) + 3 global
    kv = kv_cache(g3, context=32768, batch=2)
    per_layer_token = 2 * 1 * 256 * 2
    assert kv.total == 2 * (3 * 32768 + 15 * 512) * per_layer_token
    assert kv.total_no_window == 2 * 18 * 32768 * per_layer_token
    mistral = kv_cache(arch("mistral-7b-v0.1"), context=32768)
    assert mistral.bytes_per_token == 131_072 and mistral.total == 4096 * 131_072
    qwen = kv_cache(arch("qwen1.5-7b"), context=32768)  # use_sliding_window: false
    assert qwen.total == qwen.total_no_window == 32768 * 524_288
    assert kv_cache(arch("llama-2-7b"), 1).bytes_per_token == 524_288


# --- Training ------------------------------------------------------------------------------------


def test_lora_rank_16_on_gemma_7b_trains_50m_parameters():
    a = from_gemma_config(PRESETS["gemma-7b"])
    assert lora_params(a, 16) == 50_003_968  # what peft prints for r=16 on all projections
    t = training_memory(a, "lora", lora_rank=16)
    assert t["trainable_params"] == 50_003_968
    assert t["gradients"] == 4 * 50_003_968 and t["optimizer_states"] == 8 * 50_003_968


def test_training_memory_orders_and_items():
    a = from_gemma_config(PRESETS["gemma-3-270m"])
    full, full8 = training_memory(a, "full"), training_memory(a, "full_8bit")
    lora, qlora = training_memory(a, "lora"), training_memory(a, "qlora")
    n = 268_098_176
    assert full["weights"] == full["gradients"] == 2 * n and full["optimizer_states"] == 8 * n
    # 8-bit AdamW: two bytes per value plus block absmax; norms (< 4096 values) stay 32-bit.
    assert 2 * n < full8["optimizer_states"] < 2.1 * n
    assert qlora["weights"] < lora["weights"] < full["weights"] + full["gradients"]
    assert qlora["weights"] - 4 * qlora["trainable_params"] == weight_bytes(a, "nf4")
    for t in (full, lora, qlora):
        assert t["activations_checkpointed"] < t["activations"]
        assert t["total_checkpointed_chunked"] < t["total"]
    # 262k-vocabulary logits dominate: bf16 logits, fp32 copy, fp32 log-softmax, fp32 grad.
    assert full["logits"] == 4 * 512 * 262_144 * (2 + 4 + 4 + 4)
    assert full["logits_chunked"] == full["logits"] * 256 // (4 * 512)
    assert full["logits"] > full["activations"]


def test_training_scales_with_batch_and_seq_len():
    a = from_gemma_config(PRESETS["gemma-2b"])
    small = training_memory(a, "qlora", batch=1, seq_len=256)
    big = training_memory(a, "qlora", batch=4, seq_len=512)
    assert big["activations"] == pytest.approx(8 * small["activations"], rel=0.02)
    assert big["weights"] == small["weights"]


# --- Errors --------------------------------------------------------------------------------------


def test_unsupported_architectures_are_refused():
    with pytest.raises(ConfigError, match="Gemma 1/2/3, Llama, Mistral and Qwen2"):
        from_hf_dict({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "gpt2")
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        raw = json.loads((CONFIGS / "mistral-7b-v0.1.json").read_text())
        from_hf_dict({**raw, "num_local_experts": 8}, "mixtral")
    with pytest.raises(ConfigError, match="intermediate_size"):
        from_hf_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "num_attention_heads": 2,
                          "num_hidden_layers": 1, "vocab_size": 10}, "broken")  # fmt: skip


# --- Names -----------------------------------------------------------------------------------------


def test_projections_are_counted_under_the_config_names_and_map_to_gguf():
    a = from_gemma_config(PRESETS["gemma-3-270m"])
    first_block = [t for t in a.tensors() if t.name.startswith("model.layers.0.") and t.is_linear]
    assert tuple(t.kind for t in first_block) == PROJECTIONS
    assert all(t.name.endswith(f".{t.kind}.weight") for t in first_block)
    assert all(hf_to_gguf_name(t.name) for t in a.tensors())  # every name is in the GGUF map


def test_gemma_configs_are_read_by_the_model_loaders_parser():
    # A key gemmakit.hf_config.from_hf_config refuses is refused by inspect too.
    raw = json.loads((CONFIGS / "gemma-2b.json").read_text())
    with pytest.raises(ConfigError, match="attention_bias"):
        from_hf_dict({**raw, "attention_bias": True}, "gemma-2b")
    assert from_hf_dict(raw, "gemma-2b") == from_gemma_config(
        from_hf_config(raw, "gemma-2b"), source="config.json"
    )


@pytest.mark.parametrize("mix", ["q4_k_m", "q3_k_m", "q2_k", "q8_0"])
def test_gguf_plan_is_the_writers_mix(tmp_path, mix):
    """`gguf_tensor_types` is the writer's own plan: a model exported with `--type MIX` holds
    each tensor in the type the planner predicts, fallbacks for rows that are not whole
    256-blocks included (the second model is 64 wide)."""
    from gemmakit.export import export
    from gemmakit.formats.gguf import GGUFFile, gguf_to_hf_name
    from tests.conftest import random_hf_model
    from tests.test_export import tiny_sentencepiece
    from tests.test_gguf_quantize import needs_kernels, tiny_256

    if needs_kernels.args[0]:
        pytest.skip("the C kernels do not build here")
    narrow = tmp_path / "narrow"
    random_hf_model("gemma3").save_pretrained(narrow)
    (narrow / "tokenizer.model").write_bytes(tiny_sentencepiece())
    for folder in (tiny_256(tmp_path), narrow):
        out = tmp_path / f"{folder.name}.{mix}.gguf"
        export(model=str(folder), to="gguf", output=out, qtype=mix, progress=False)
        written = {gguf_to_hf_name(n): t.ggml_type.name for n, t in GGUFFile(out).tensors.items()}
        arch = from_hf_dict(json.loads((folder / "config.json").read_text()), folder.name)
        assert gguf_tensor_types(arch, mix) == written, folder.name
