"""Parameter counts and memory plans of Gemma 3n and Gemma 4 against transformers' own models.

Every model here is built by transformers on the meta device (shapes, no storage), with every
Gemma 3n/4 feature switched on somewhere: per-layer embeddings, KV sharing, the double-wide MLP,
K = V with its own global head dim and KV heads, the MoE block, AltUp, LAuReL, per-layer MLP
widths. gemmakit's counts come from the config alone, so a tensor the planner forgets, invents
or mis-shapes shows up as a difference here.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn

from gemmakit.cli import main
from gemmakit.config import FULL, PRESETS, PROJECTIONS, SLIDING
from gemmakit.formats.gguf import GGUFFile
from gemmakit.hf_config import from_hf_config
from gemmakit.model.cache import KVCache
from gemmakit.model.families import model_class
from gemmakit.planning.activations import inference_activation_bytes
from gemmakit.planning.architecture import from_gemma_config, from_hf_dict
from gemmakit.planning.kv_cache import kv_cache
from gemmakit.planning.params import count_params, lora_params
from gemmakit.planning.prose import notes
from gemmakit.planning.report import gguf_file_summary, make_report
from gemmakit.planning.training_memory import TRAINING_METHODS, training_memory
from gemmakit.planning.weights import PRECISIONS, gguf_bytes, gguf_tensor_types, weight_bytes
from tests.test_export import tiny_sentencepiece

CONFIGS = Path(__file__).parent / "data" / "configs"
S, F = SLIDING, FULL


def gemma4_config(**overrides):
    """Six layers: K = V global layers with their own head dim and one KV head, the last two
    layers KV-shared with double-wide MLPs, per-layer embeddings and a 4-expert MoE block."""
    kw = dict(
        vocab_size=160, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=64,
        num_global_key_value_heads=1, attention_k_eq_v=True, num_kv_shared_layers=2,
        use_double_wide_mlp=True, hidden_size_per_layer_input=8, vocab_size_per_layer_input=96,
        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=24,
        sliding_window=4, layer_types=[S, F, S, S, F, F], final_logit_softcapping=30.0,
    )  # fmt: skip
    kw.update(overrides)
    return transformers.Gemma4TextConfig(**kw)


def gemma3n_config(**overrides):
    """Five layers with their own MLP widths, the last two KV-shared, 3 AltUp streams, LAuReL
    rank 4, per-layer embeddings over a smaller vocabulary."""
    kw = dict(
        vocab_size=160, hidden_size=32, intermediate_size=[48, 64, 48, 96, 40], num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_kv_shared_layers=2,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=96, altup_num_inputs=3,
        laurel_rank=4, sliding_window=4, layer_types=[S, F, S, F, S],
        activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0, 0.0],
    )  # fmt: skip
    kw.update(overrides)
    return transformers.Gemma3nTextConfig(**kw)


CASES = {
    "gemma4": (gemma4_config, transformers.Gemma4ForCausalLM),
    "gemma4_untied_no_moe": (
        lambda: gemma4_config(enable_moe_block=False, tie_word_embeddings=False, attention_k_eq_v=False),
        transformers.Gemma4ForCausalLM,
    ),
    "gemma4_no_ple": (
        lambda: gemma4_config(hidden_size_per_layer_input=0, num_kv_shared_layers=0),
        transformers.Gemma4ForCausalLM,
    ),
    "gemma3n": (gemma3n_config, transformers.Gemma3nForCausalLM),
}


def meta_model(case: str):
    make, cls = CASES[case]
    hf = make()
    with torch.device("meta"):
        return hf, cls(hf)


def params_by_name(model: nn.Module) -> dict[str, int]:
    """transformers' named parameters (a tied lm_head appears once, as the embedding)."""
    return {name: p.numel() for name, p in model.named_parameters()}


def ours(hf) -> tuple:
    arch = from_gemma_config(from_hf_config(hf.to_dict()))
    return arch, count_params(arch)


@pytest.mark.parametrize("case", CASES)
def test_every_checkpoint_tensor_has_the_shape_transformers_gives_it(case):
    hf, model = meta_model(case)
    arch, _ = ours(hf)
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if hf.tie_word_embeddings:
        del theirs["lm_head.weight"]  # the same tensor as the embedding, stored once
    assert {t.name: t.shape for t in arch.tensors()} == theirs


@pytest.mark.parametrize("case", CASES)
def test_gemmakits_own_model_holds_the_tensors_the_planner_lists(case):
    """The planner's list is also what gemmakit's model stores (state dict keys and shapes,
    the layer_scalar buffers included), so weight bytes describe the model that runs."""
    hf, _ = meta_model(case)
    config = from_hf_config(hf.to_dict())
    with torch.device("meta"):
        model = model_class(config)(config)
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        theirs.pop("lm_head.weight", None)
    assert {t.name: t.shape for t in from_gemma_config(config).tensors()} == theirs


@pytest.mark.parametrize("case", CASES)
def test_inspect_json_total_equals_transformers_numel(case, tmp_path, capsys):
    hf, model = meta_model(case)
    (tmp_path / "config.json").write_text(json.dumps(hf.to_dict()))
    assert main(["inspect", "--json", str(tmp_path)]) == 0
    data = json.loads(capsys.readouterr().out)[0]
    numel = params_by_name(model)
    assert data["total_params"] == sum(numel.values()) == model.num_parameters()
    ple = numel.get("model.embed_tokens_per_layer.weight", 0)
    embedding = numel["model.embed_tokens.weight"] + numel.get("lm_head.weight", 0)
    assert data["per_layer_embedding_params"] == ple
    assert data["embedding_params"] == embedding
    assert data["non_embedding_params"] == data["total_params"] - embedding - ple


@pytest.mark.parametrize("case", CASES)
def test_effective_and_active_counts_are_sums_of_transformers_parameters(case):
    hf, model = meta_model(case)
    _, p = ours(hf)
    numel = params_by_name(model)
    effective = sum(n for name, n in numel.items() if "embed_tokens_per_layer" not in name)
    experts = sum(n for name, n in numel.items() if ".experts." in name)
    unused = experts * (hf.num_experts - hf.top_k_experts) // hf.num_experts if experts else 0
    assert p.effective == effective
    assert p.active == effective - unused
    if "ple" not in case and case != "gemma4_untied_no_moe":  # these switch a feature on
        assert p.effective < p.total
    if case == "gemma4":
        assert p.active < p.effective


@pytest.mark.parametrize("case", CASES)
def test_lora_parameters_equal_the_adapted_linears_of_transformers_model(case):
    """LoRA on q/k/v/o/gate/up/down: rank * (in + out) over transformers' nn.Linear modules of
    those names (shared layers have no k/v, K = V layers no v; the experts are not linears)."""
    hf, model = meta_model(case)
    arch, _ = ours(hf)
    linears = [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.split(".")[-1] in PROJECTIONS
    ]
    assert lora_params(arch, 8) == sum(8 * (m.in_features + m.out_features) for m in linears)


def test_kv_bytes_per_token_count_owning_layers_at_their_own_shapes():
    """Gemma 4 case: layers 0-3 own K/V (sliding: 2 KV heads of 16; layer 1 global: 1 KV head
    of 64, K = V but still two cached tensors), layers 4-5 (global) read layer 1's cache."""
    hf, model = meta_model("gemma4")
    arch, _ = ours(hf)
    kv = kv_cache(arch, context=10, batch=3, dtype="fp32")
    owners = [layer.self_attn for layer in model.model.layers if hasattr(layer.self_attn, "k_proj")]
    assert len(owners) == 4 and (kv.cached_layers, kv.shared_layers) == (4, 2)
    # Per owning layer: keys and values, each k_proj.out_features wide (kv_heads * head_dim).
    assert kv.bytes_per_token == sum(2 * a.k_proj.out_features * 4 for a in owners) == 4 * (3 * 64 + 128)
    # Sliding layers (0, 2, 3: window 4) hold 4 tokens of the 10, the global one all 10.
    assert kv.total == 3 * 4 * (3 * 4 * 64 + 10 * 128)
    assert kv.total_no_window == 3 * 10 * kv.bytes_per_token


def test_kv_bytes_of_gemma3n_skip_shared_layers():
    hf, model = meta_model("gemma3n")
    arch, _ = ours(hf)
    owners = [layer.self_attn for layer in model.model.layers if hasattr(layer.self_attn, "k_proj")]
    kv = kv_cache(arch, context=1, dtype="bf16")
    assert kv.bytes_per_token == sum(2 * a.k_proj.out_features * 2 for a in owners) == 3 * 2 * 32 * 2


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("context", [3, 10])  # inside and past the window of 4
def test_kv_bytes_equal_what_gemmakits_cache_allocates(case, context):
    hf, _ = meta_model(case)
    config = from_hf_config(hf.to_dict())
    cache = KVCache(config, batch=2, max_length=context, dtype=torch.bfloat16, device="cpu")
    held = sum(c.k.nbytes + c.v.nbytes for c in cache.layers)
    kv = kv_cache(from_gemma_config(config), context=context, batch=2, dtype="bf16")
    assert kv.total == held
    assert kv.cached_layers == len(cache.layers)


@pytest.mark.parametrize("case", CASES)
def test_every_memory_plan_handles_the_new_families(case):
    hf, _ = meta_model(case)
    arch, p = ours(hf)
    memory = {prec: weight_bytes(arch, prec) for prec in PRECISIONS}
    # Stored bytes cover the parameters and the layer_scalar buffers (one float each).
    buffers = sum(t.numel for t in arch.tensors() if not t.is_parameter)
    assert memory["fp32"] == 4 * (p.text + buffers) and memory["bf16"] == 2 * (p.text + buffers)
    assert memory["nf4"] < memory["int8"] < memory["bf16"]
    types = gguf_tensor_types(arch, "q4_k_m")
    assert set(types) == {t.name for t in arch.tensors()}
    for method in TRAINING_METHODS:
        t = training_memory(arch, method, batch=2, seq_len=16)
        assert t["total"] > t["weights"] > 0 and t["activations"] > t["activations_checkpointed"] > 0
    assert training_memory(arch, "full")["trainable_params"] == p.text
    assert training_memory(arch, "lora", lora_rank=4)["trainable_params"] == lora_params(arch, 4)
    assert inference_activation_bytes(arch, 1, 8) > 0


def test_a_gemma4_gguf_with_its_buffers_and_rope_freqs_agrees_with_its_metadata(tmp_path):
    """llama.cpp's Gemma 4 files hold the layer_scalar buffers and a rope_freqs table derived
    from the config: neither may read as a disagreement between the header and the tensors."""
    arch, _ = ours(gemma4_config())

    def tensor(shape):
        return SimpleNamespace(
            shape=shape, ggml_type=SimpleNamespace(name="F32"), nbytes=4 * math.prod(shape)
        )

    tensors = {t.name: tensor(t.shape) for t in arch.tensors()}
    tensors["rope_freqs.weight"] = tensor((32,))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    g = SimpleNamespace(path=tmp_path / "m.gguf", tensors=tensors, metadata={})
    summary = gguf_file_summary(g)
    assert summary["params"] == sum(t.numel for t in arch.tensors())
    assert not any("GGUF tensors hold" in n for n in notes(make_report(arch, gguf_file=summary)))
    tensors["extra.weight"] = tensor((5,))  # a tensor the metadata does not describe
    assert any("GGUF tensors hold" in n for n in notes(make_report(arch, gguf_file=gguf_file_summary(g))))


def saved_activation_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one forward, each storage once and
    the model's own weights left out."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids)
    return sum(seen.values())


@pytest.mark.parametrize("case", ["gemma4", "gemma3n"])
def test_full_fine_tuning_activations_match_what_autograd_saves(case):
    """The estimate, per block with its own shapes plus the PLE / MoE / AltUp / LAuReL terms,
    against transformers' float32 training forward (sparsity off: its top-k is not modelled)."""
    cls = CASES[case][1]
    overrides = dict(hidden_size=64, vocab_size=300, vocab_size_per_layer_input=300)
    if case == "gemma3n":
        overrides["activation_sparsity_pattern"] = [0.0] * 5
    else:
        overrides["intermediate_size"] = 128
    hf = (gemma3n_config if case == "gemma3n" else gemma4_config)(**overrides)
    hf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(hf).train()
    saved = saved_activation_bytes(model, torch.randint(0, 300, (2, 64)))
    arch, _ = ours(hf)
    predicted = training_memory(arch, "full", batch=2, seq_len=64, dtype="fp32")["activations"]
    assert abs(predicted - saved) / saved < 0.03


def test_training_activations_follow_each_layers_width():
    """The double-wide MLPs of the shared layers keep more activations than a model whose MLPs
    are all single-width, and fewer than one whose every MLP is double-wide."""
    narrow, _ = ours(gemma4_config(use_double_wide_mlp=False))
    mixed, _ = ours(gemma4_config())
    wide, _ = ours(gemma4_config(use_double_wide_mlp=False, intermediate_size=96))
    acts = [training_memory(a, "lora", batch=1, seq_len=8)["activations"] for a in (narrow, mixed, wide)]
    assert acts[0] < acts[1] < acts[2]


def test_compare_across_gemma_3_3n_and_4(tmp_path, capsys):
    paths = []
    for name, make in (("tiny-3n", gemma3n_config), ("tiny-4", gemma4_config)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(make().to_dict()))
        paths.append(str(tmp_path / name))
    assert main(["inspect", "--compare", "gemma-3-270m", *paths]) == 0
    out = capsys.readouterr().out
    for text in (
        "tiny-3n",
        "tiny-4",
        "per-layer embedding (PLE)",
        "effective",
        "active per token",
        "2 of the 4 experts",
        "AltUp (3 streams)",
        "LAuReL (rank 4)",
        "K = V on global layers (1 with no v_proj)",
        "global layers 64",
        "48 (96 on the 2 KV-shared layers)",
        "40 to 96 by layer",
        "layers with a cache",
    ):
        assert text in out, text


def tower_params(model: nn.Module, *names: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.split(".")[1] in names)


@pytest.mark.parametrize("clipped", [True, False])
def test_gemma4_multimodal_counts_each_tower_as_transformers_builds_it(clipped, tmp_path, capsys):
    vision = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, patch_size=4, position_embedding_size=40,
        use_clipped_linears=clipped, standardize=not clipped,
    )  # fmt: skip
    audio = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, subsampling_conv_channels=[16, 4],
        output_proj_dims=24, conv_kernel_size=3, use_clipped_linears=clipped,
    )  # fmt: skip
    hf = transformers.Gemma4Config(
        text_config=gemma4_config().to_dict(), vision_config=vision, audio_config=audio
    )
    with torch.device("meta"):
        model = transformers.Gemma4ForConditionalGeneration(hf)
    raw = {**hf.to_dict(), "architectures": ["Gemma4ForConditionalGeneration"]}
    p = count_params(from_hf_dict(raw, "wrapped"))
    assert p.vision == tower_params(model, "vision_tower", "embed_vision")
    assert p.audio == tower_params(model, "audio_tower", "embed_audio")
    assert p.total == model.num_parameters()
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{p.audio:,}" in out and "audio (tower + projector)" in out


def test_gemma3n_multimodal_names_its_towers_as_not_counted(tmp_path, capsys):
    text = gemma3n_config()
    wrapper = {
        "architectures": ["Gemma3nForConditionalGeneration"],
        "model_type": "gemma3n",
        "text_config": text.to_dict(),
        "vision_config": {"hidden_size": 32},
        "audio_config": {"hidden_size": 32},
    }
    arch = from_hf_dict(wrapper, "wrapped")
    assert count_params(arch).total == count_params(ours(text)[0]).total
    assert arch.uncounted_towers == "vision and audio"
    (tmp_path / "config.json").write_text(json.dumps(wrapper))
    assert main(["inspect", str(tmp_path)]) == 0
    assert "the vision and audio towers" in capsys.readouterr().out


# --- The released checkpoints' config.json files -------------------------------------------------

REAL = sorted(p.stem for p in CONFIGS.glob("gemma-3n-*.json")) + sorted(
    p.stem for p in CONFIGS.glob("gemma-4-*.json")
)


@pytest.mark.parametrize("name", REAL)
def test_real_config_counts_equal_transformers_meta_model(name):
    raw = json.loads((CONFIGS / f"{name}.json").read_text())
    text = dict(raw["text_config"])  # the wrappers' text tower; the 31B lock file's quote
    kind = text.pop("model_type", "gemma4_text")
    config_cls, model_cls = {
        "gemma4_text": (transformers.Gemma4TextConfig, transformers.Gemma4ForCausalLM),
        "gemma3n_text": (transformers.Gemma3nTextConfig, transformers.Gemma3nForCausalLM),
    }[kind]
    with torch.device("meta"):
        model = model_cls(config_cls(**text))
    assert count_params(from_hf_dict(released_config(name), name)).text == model.num_parameters()


# preset: (config file, text total, effective, active) with the counts transformers gives
# (tests/data/configs/SOURCES.md) and the model cards' headlines they round to.
PRESET_FILES = {
    "gemma-3n-e2b": ("gemma-3n-E2B-it", 4_435_182_688, 2_421_916_768, 2_421_916_768),
    "gemma-3n-e4b": ("gemma-3n-E4B-it", 6_835_235_568, 4_486_425_328, 4_486_425_328),
    "gemma-4-e2b": ("gemma-4-E2B", 4_628_569_344, 2_279_759_104, 2_279_759_104),
    "gemma-4-e4b": ("gemma-4-E4B-it", 7_463_013_376, 4_644_441_088, 4_644_441_088),
    "gemma-4-26b-a4b": ("gemma-4-26B-A4B-it", 25_233_141_760, 25_233_141_760, 3_822_530_560),
    "gemma-4-31b": ("gemma-4-31B.lock-excerpt", 30_697_345_280, 30_697_345_280, 30_697_345_280),
}


def released_config(file: str) -> dict:
    """A released config.json; for 31B, the text_config its lock file quotes (SOURCES.md)."""
    raw = json.loads((CONFIGS / f"{file}.json").read_text())
    if "model_id" in raw:
        raw = {**raw["text_config"], "model_type": "gemma4_text"}
    return raw


def test_every_new_family_preset_has_a_released_config():
    new = {k for k, c in PRESETS.items() if c.model_type in ("gemma3n_text", "gemma4_text")}
    assert new == set(PRESET_FILES)


@pytest.mark.parametrize("name", PRESET_FILES)
def test_presets_equal_their_released_configs_and_reproduce_the_counts(name):
    file, total, effective, active = PRESET_FILES[name]
    assert PRESETS[name] == from_hf_config(released_config(file))
    p = count_params(from_gemma_config(PRESETS[name]))
    assert (p.total, p.effective, p.active) == (total, effective, active)


# file: Gemma4ForConditionalGeneration's total in transformers (tests/data/configs/SOURCES.md).
MULTIMODAL_TOTALS = {
    "gemma-4-E2B": 5_104_297_504,
    "gemma-4-E4B-it": 7_941_100_832,
    "gemma-4-26B-A4B-it": 25_805_933_872,
}


@pytest.mark.parametrize("name", MULTIMODAL_TOTALS)
def test_released_gemma4_checkpoints_count_their_towers(name, capsys):
    assert main(["inspect", "--json", str(CONFIGS / f"{name}.json")]) == 0
    d = json.loads(capsys.readouterr().out)[0]
    assert d["total_params"] == MULTIMODAL_TOTALS[name]
    assert d["total_params"] == d["text_params"] + d["vision_params"] + d["audio_params"]
    # The cards: E2B "5.1B with embeddings", E4B "8B with embeddings" (towers included).
    billions = d["total_params"] / 1e9
    assert {"gemma-4-E2B": round(billions, 1) == 5.1, "gemma-4-E4B-it": round(billions) == 8}.get(name, True)


def test_published_headline_counts():
    """The model cards' figures (SOURCES.md): Gemma 4 E2B "2.3B effective", 26B A4B "25.2B"
    total and "3.8B" active, 31B "30.7B"; Gemma 3n E2B/E4B compare to "2B" and "4B" models."""

    def billions(name, field):
        return round(getattr(count_params(from_gemma_config(PRESETS[name])), field) / 1e9, 1)

    assert billions("gemma-4-e2b", "effective") == 2.3
    assert (billions("gemma-4-26b-a4b", "total"), billions("gemma-4-26b-a4b", "active")) == (25.2, 3.8)
    assert billions("gemma-4-31b", "total") == 30.7
    assert (round(billions("gemma-3n-e2b", "effective")), round(billions("gemma-3n-e4b", "effective"))) == (
        2,
        4,
    )


def test_inspect_prints_the_effective_and_active_counts_of_the_presets(capsys):
    assert main(["inspect", "--json", "gemma-4-e4b", "google/gemma-4-26B-A4B-it"]) == 0
    e4b, moe = json.loads(capsys.readouterr().out)
    assert (e4b["total_params"], e4b["effective_params"]) == (7_463_013_376, 4_644_441_088)
    assert e4b["per_layer_embedding_params"] == 2_818_572_288 and e4b["kv_cache"]["shared_layers"] == 18
    assert (moe["name"], moe["active_params"]) == ("gemma-4-26b-a4b", 3_822_530_560)


# --- llama-quantize's own types -------------------------------------------------------------------

LLAMA_CPP_SRC = Path(
    os.environ.get("GEMMAKIT_LLAMA_CPP_SRC", "/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp")
)
LLAMA_CPP_BIN = Path(os.environ.get("GEMMAKIT_LLAMA_CPP_BIN", "/nonexistent"))


def llama_cpp_files(case: str, hf, root: Path, ftypes) -> dict:
    """llama.cpp's convert_hf_to_gguf.py (f16) then llama-quantize per ftype; the tensor bytes
    per GGML type of each file (without rope_freqs, a table derived from the config)."""
    cls = CASES[case][1]
    torch.manual_seed(0)
    cls(hf).save_pretrained(root)
    (root / "tokenizer.model").write_bytes(tiny_sentencepiece())
    transformers.GemmaTokenizer.from_pretrained(root, mask_token=None).save_pretrained(root)
    settings = json.loads((root / "tokenizer_config.json").read_text())
    settings.pop("vocab_file", None)  # llama.cpp's Gemma 4 converter reads tokenizer.json
    (root / "tokenizer_config.json").write_text(json.dumps(settings))
    env = {**os.environ, "PYTHONPATH": str(LLAMA_CPP_SRC / "gguf-py"), "LD_LIBRARY_PATH": str(LLAMA_CPP_BIN)}
    convert = [sys.executable, str(LLAMA_CPP_SRC / "convert_hf_to_gguf.py"), str(root)]
    subprocess.run([*convert, "--outtype", "f16", "--outfile", str(root / "f16.gguf")], env=env, check=True)
    out = {}
    for ftype in ftypes:
        quantize = [
            str(LLAMA_CPP_BIN / "llama-quantize"),
            str(root / "f16.gguf"),
            str(root / f"{ftype}.gguf"),
        ]
        subprocess.run([*quantize, ftype.upper()], env=env, check=True, capture_output=True)
        by_type: dict[str, int] = {}
        for name, t in GGUFFile(root / f"{ftype}.gguf").tensors.items():
            if name != "rope_freqs.weight":
                by_type[t.ggml_type.name] = by_type.get(t.ggml_type.name, 0) + t.nbytes
        out[ftype] = by_type
    return out


@pytest.mark.llamacpp
@pytest.mark.skipif(
    not (LLAMA_CPP_BIN / "llama-quantize").is_file()
    or not (LLAMA_CPP_SRC / "convert_hf_to_gguf.py").is_file(),
    reason="needs llama.cpp's source (GEMMAKIT_LLAMA_CPP_SRC) and a folder holding llama-quantize "
    "(GEMMAKIT_LLAMA_CPP_BIN)",
)
@pytest.mark.parametrize("case", ["gemma4", "gemma3n"])
def test_gguf_bytes_per_type_equal_llama_quantizes_files(case, tmp_path):
    """Widths that are multiples of 256 so the k-quant rules, not their fallbacks, decide."""
    if case == "gemma4":
        hf = gemma4_config(
            vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=2,
            num_key_value_heads=1, head_dim=256, global_head_dim=512, hidden_size_per_layer_input=32,
            vocab_size_per_layer_input=256, moe_intermediate_size=256, layer_types=[S, S, F, S, S, F, S, F],
        )  # fmt: skip
    else:
        hf = gemma3n_config(
            vocab_size=256, hidden_size=256, intermediate_size=[512] * 8, num_hidden_layers=8,
            num_attention_heads=2, num_key_value_heads=1, head_dim=256, num_kv_shared_layers=3,
            hidden_size_per_layer_input=32, vocab_size_per_layer_input=256, altup_num_inputs=4,
            laurel_rank=64, activation_sparsity_pattern=[0.0] * 8, layer_types=[S, S, S, S, F, S, S, F],
        )  # fmt: skip
    ftypes = ("q4_k_m", "q8_0", "q4_0")
    files = llama_cpp_files(case, hf, tmp_path, ftypes)
    arch, _ = ours(hf)
    for ftype in ftypes:
        assert gguf_bytes(arch, ftype) == files[ftype], ftype
