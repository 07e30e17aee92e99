"""GGUF for Gemma 3n and Gemma 4 as llama.cpp names them (architectures `gemma3n`, `gemma4`).

Tiny random transformers models of each family are converted by llama.cpp's own
convert_hf_to_gguf.py (its source: GEMMAKIT_LLAMA_CPP_SRC) and by gemmakit's writer; gemmakit
must read llama.cpp's file into the same config and tensors, write the same tensor names,
shapes, types and metadata, and (with GEMMAKIT_LLAMA_CPP_BIN, a folder holding llama-simple)
decode greedily as llama.cpp does on its own export. The export -> load round trip needs none
of that and runs everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gemmakit.export import export
from gemmakit.formats.gguf import SHARED_LAYER_KV_TENSORS, GGUFFile, config_from_gguf, state_dict_from_gguf
from gemmakit.hf_config import load_hf_config
from tests.test_export import tiny_sentencepiece

LLAMA_CPP_SRC = Path(
    os.environ.get("GEMMAKIT_LLAMA_CPP_SRC", "/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp")
)
LLAMA_CPP_BIN = os.environ.get("GEMMAKIT_LLAMA_CPP_BIN")
needs_converter = pytest.mark.skipif(
    not (LLAMA_CPP_SRC / "convert_hf_to_gguf.py").is_file(),
    reason=f"llama.cpp's source is not at {LLAMA_CPP_SRC} (set GEMMAKIT_LLAMA_CPP_SRC)",
)

SLIDE, FULL = "sliding_attention", "full_attention"
COMMON = dict(
    vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=256, sliding_window=4, bos_token_id=2, eos_token_id=1, pad_token_id=0,
)  # fmt: skip
# Every feature on somewhere: PLE, KV sharing, double-wide MLP, K = V with its own KV-head
# count, proportional RoPE, experts (gemma4_e); separate V on global layers, no PLE, no
# sharing, soft-capping and a half-rotary global head (gemma4_dense); AltUp, LAuReL,
# sparsity, per-layer widths (gemma3n).
CASES = {
    "gemma4_e": dict(
        num_hidden_layers=6, intermediate_size=96, global_head_dim=32, num_global_key_value_heads=1,
        attention_k_eq_v=True, num_kv_shared_layers=2, use_double_wide_mlp=True,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=256, layer_types=[SLIDE, FULL] * 3,
        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=24,
    ),
    "gemma4_dense": dict(
        num_hidden_layers=4, intermediate_size=96, global_head_dim=32, hidden_size_per_layer_input=0,
        num_kv_shared_layers=0, layer_types=[SLIDE, SLIDE, SLIDE, FULL], final_logit_softcapping=30.0,
        rope_parameters={
            SLIDE: {"rope_type": "default", "rope_theta": 10000.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e6},
        },
    ),
    "gemma3n": dict(
        num_hidden_layers=5, intermediate_size=[96, 128, 96, 64, 96], num_kv_shared_layers=2,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=256, laurel_rank=8,
        layer_types=[SLIDE, FULL] * 2 + [SLIDE], activation_sparsity_pattern=[0.95, 0.9, 0.0, 0.0, 0.0],
    ),
    # The shapes llama.cpp's gemma3n hard-codes (src/models/gemma3n.cpp, models.h: 20 layers
    # with their own KV, LAuReL rank 64, 256-wide PLE, 0.95 sparsity on the first 10 layers).
    "gemma3n_llama_cpp": dict(
        num_hidden_layers=22, intermediate_size=1024, num_kv_shared_layers=2,
        hidden_size_per_layer_input=256, vocab_size_per_layer_input=256, laurel_rank=64,
        layer_types=[FULL if (i + 1) % 5 == 0 else SLIDE for i in range(22)],
        activation_sparsity_pattern=[0.95] * 10 + [0.0] * 12,
    ),
}  # fmt: skip


def random_hf_model(case: str, seed: int = 0, wide_margins: bool = False):
    """The transformers model of a case, every parameter and checkpoint buffer random.

    `wide_margins` scales the final norm up, so that greedy decoding is decided by the weights
    and not by float rounding (llama.cpp's GELU is a table lookup on the CPU, its Gemma 3n
    sparsity cutoff uses the n - 1 standard deviation where transformers uses n).
    """
    import transformers

    family = "gemma4" if case.startswith("gemma4") else "gemma3n"
    config_cls = transformers.Gemma4TextConfig if family == "gemma4" else transformers.Gemma3nTextConfig
    cfg = config_cls(**COMMON, **CASES[case])
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    cls = transformers.Gemma4ForCausalLM if family == "gemma4" else transformers.Gemma3nForCausalLM
    model = cls(cfg).eval()
    persistent = set(model.state_dict())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.3 if "norm" in name else 0.1)
        if wide_margins:
            model.model.norm.weight.normal_(8.0, 2.0)
        for name, b in model.named_buffers():
            if name in persistent:  # layer_scalar: a loader that drops it changes the logits
                b.uniform_(0.5, 1.5)
    return model


def save_folder(model, folder: Path) -> Path:
    """save_pretrained plus the tiny SentencePiece model, as tokenizer.model and tokenizer.json
    (llama.cpp's Gemma 4 converter reads the vocabulary from tokenizer.json)."""
    import transformers

    model.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(tiny_sentencepiece())
    tok = transformers.GemmaTokenizer.from_pretrained(folder, mask_token=None)
    tok.save_pretrained(folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.pop("vocab_file", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder


def llama_cpp_convert(folder: Path, out: Path, outtype: str = "f32") -> GGUFFile:
    env = {**os.environ, "PYTHONPATH": str(LLAMA_CPP_SRC / "gguf-py")}
    cmd = [sys.executable, str(LLAMA_CPP_SRC / "convert_hf_to_gguf.py"), str(folder)]
    done = subprocess.run(
        [*cmd, "--outtype", outtype, "--outfile", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return GGUFFile(out)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """case -> (folder, hf_model, {outtype: llama.cpp's GGUF}), built once per module."""
    made: dict = {}

    def get(case: str, outtype: str = "f32"):
        if case not in made:
            root = tmp_path_factory.mktemp(case)
            model = random_hf_model(case)
            made[case] = (save_folder(model, root / "hf"), model, {})
        folder, model, files = made[case]
        if outtype not in files:
            files[outtype] = llama_cpp_convert(folder, folder.parent / f"llama_cpp.{outtype}.gguf", outtype)
        return folder, model, files[outtype]

    return get


def hf_state(model) -> dict[str, torch.Tensor]:
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


def assert_same_config(ours, reference):
    for field in dataclasses.fields(reference):
        a, b = getattr(ours, field.name), getattr(reference, field.name)
        if field.name == "rms_norm_eps":  # a float32 key in GGUF
            assert a == pytest.approx(b, rel=1e-6)
        elif field.name != "name":
            assert a == b, f"{field.name}: {a!r} != {b!r}"


def gemmakit_model(config, state):
    """gemmakit's model of a Gemma 3n / 4 config, holding `state` (every key of it)."""
    from gemmakit.model.families import model_class

    model = model_class(config)(config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    return model


IDS = [2, 17, 45, 99, 200, 31, 7, 250, 64, 12, 90, 33]


def logits_of(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.as_tensor(ids)[None])
    return (out.logits if hasattr(out, "logits") else out)[0]


# --- (a) llama.cpp's conversion read by gemmakit ----------------------------------------------


@needs_converter
@pytest.mark.parametrize("case", ["gemma4_e", "gemma4_dense", "gemma3n"])
def test_reads_llama_cpp_conversion(converted, case):
    folder, model, g = converted(case)
    config = config_from_gguf(g)
    assert_same_config(config, load_hf_config(folder))
    state = state_dict_from_gguf(g, config=config)
    expected = hf_state(model)
    assert set(state) == set(expected)
    for name, t in expected.items():
        assert torch.equal(state[name], t), name
    # The same logits as transformers.
    torch.testing.assert_close(logits_of(gemmakit_model(config, state)), logits_of(model), atol=1e-4, rtol=0)


def test_sparsity_quantile_round_trip():
    """Gemma 3n's sparsity is stored as a float32 normal quantile; it reads back exactly."""
    from gemmakit.formats.gguf import _normal_cdf

    normal = torch.distributions.normal.Normal(0, 1)
    for p in (0.95, 0.9, 0.5, 0.75, 0.999):
        assert _normal_cdf(normal.icdf(torch.tensor(p)).item()) == p
    assert _normal_cdf(float("-inf")) == 0.0


# --- (b) gemmakit's export against llama.cpp's ------------------------------------------------

# What gemmakit writes differently, and why: general.name (the folder's name) and
# general.size_label (llama.cpp's guess) are descriptive; gemmakit always writes its tokenizer
# as SentencePiece ("llama" with pieces, scores and types, the format its reader and llama.cpp
# both read), plus eot, add_eos and a chat template, where llama.cpp's converter writes Gemma 4
# vocabularies as BPE ("gemma4", merges) from tokenizer.json.
DESCRIPTIVE_KEYS = ("general.name", "general.size_label")


@needs_converter
@pytest.mark.parametrize(("case", "outtype"), [("gemma4_e", "f32"), ("gemma4_dense", "f32"), ("gemma3n", "f32"),
                                               ("gemma4_e", "f16"), ("gemma3n", "f16")])  # fmt: skip
def test_export_matches_llama_cpp(converted, tmp_path, case, outtype):
    folder, model, theirs = converted(case, outtype)
    config = load_hf_config(folder)
    out = tmp_path / "ours.gguf"
    export(model=str(folder), to="gguf", output=out, qtype=outtype, progress=False)  # export --to gguf
    ours = GGUFFile(out)
    model_keys = {k for k in theirs.metadata if not k.startswith(("tokenizer.", "general."))}
    model_keys |= {"general.architecture", "general.file_type", "general.quantization_version"}
    assert {k for k in ours.metadata if not k.startswith(("tokenizer.", *DESCRIPTIVE_KEYS))} == (
        model_keys | {"general.type"}
    )
    for key in model_keys:
        a, b = ours.metadata[key], theirs.metadata[key]
        assert type(a) is type(b) and np.array_equal(np.asarray(a), np.asarray(b)), (key, a, b)
    # gemmakit adds zero K/V on Gemma 3n's KV-shared layers: llama.cpp's gemma3n loader
    # requires them (its converter, from transformers 5's checkpoints, writes a file that
    # llama.cpp then refuses: "blk.N.attn_k.weight not found").
    shared = [i for i in range(config.num_hidden_layers) if not config.layer_owns_kv(i)]
    placeholders = {f"blk.{i}.{t}" for i in shared for t in SHARED_LAYER_KV_TENSORS}
    assert ours.tensors.keys() - theirs.tensors.keys() == (
        placeholders if case.startswith("gemma3n") else set()
    )
    assert theirs.tensors.keys() <= ours.tensors.keys()
    for name, info in theirs.tensors.items():
        mine = ours.tensors[name]
        assert (mine.shape, mine.ggml_type) == (info.shape, info.ggml_type), name
        np.testing.assert_array_equal(ours.raw(name), theirs.raw(name), err_msg=name)
    # The vocabulary: the same ids for the special tokens and as many pieces (spelling and
    # typing of user-defined pieces are the tokenizer's business: tests/test_export.py).
    for key in (
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
    ):
        assert ours.metadata[key] == theirs.metadata[key], key
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == len(theirs.metadata["tokenizer.ggml.tokens"])


# --- round trips that need nothing from llama.cpp ---------------------------------------------


@pytest.mark.parametrize("case", ["gemma4_e", "gemma4_dense", "gemma3n"])
def test_export_load_round_trip(tmp_path, case):
    """gemmakit's export read back by gemmakit: the same config, tensors and logits."""
    model = random_hf_model(case)
    folder = save_folder(model, tmp_path / "hf")
    config = load_hf_config(folder)
    out = tmp_path / "m.gguf"
    export(model=str(folder), to="gguf", output=out, qtype="f32", progress=False)
    g = GGUFFile(out)
    back = config_from_gguf(g)
    assert_same_config(back, config)
    state = state_dict_from_gguf(g, config=back)
    expected = hf_state(model)
    assert set(state) == set(expected) and all(torch.equal(state[k], v) for k, v in expected.items())
    from gemmakit.loading import load

    a, b = load(str(folder), dtype="float32", device="cpu"), load(str(out), dtype="float32", device="cpu")
    assert torch.equal(logits_of(a.model), logits_of(b.model))
    torch.testing.assert_close(logits_of(b.model), logits_of(model), atol=1e-4, rtol=0)


# --- (c) llama.cpp runs gemmakit's export -----------------------------------------------------


def _piece_text(piece: str) -> str:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return chr(int(piece[3:5], 16))
    return piece.replace("\u2581", " ")


# A prompt per case on which the tiny random model's greedy choices are clear: the top two
# logits at least MARGIN apart at every step (asserted), well above the float differences
# between llama.cpp and torch (measured: up to 0.05 on gemma3n_llama_cpp, where llama.cpp's
# sparsity cutoff uses the n - 1 standard deviation and transformers the n one).
PROMPTS = {"gemma4_e": "We the people", "gemma4_dense": "She said that", "gemma3n_llama_cpp": "A"}
MARGIN = 0.1


@pytest.mark.llamacpp
@pytest.mark.skipif(not LLAMA_CPP_BIN, reason="set GEMMAKIT_LLAMA_CPP_BIN to the folder holding llama-simple")
@pytest.mark.parametrize("case", sorted(PROMPTS))
def test_llama_cpp_decodes_like_gemmakit(tmp_path, case):
    """llama.cpp's llama-simple, greedy on gemmakit's f32 export, prints the tokens gemmakit's
    own greedy decode of the same file picks (24 tokens, or up to an end token)."""
    from gemmakit.loading import load

    model = random_hf_model(case, wide_margins=True)
    folder = save_folder(model, tmp_path / "hf")
    out = tmp_path / "m.gguf"
    export(model=str(folder), to="gguf", output=out, qtype="f32", progress=False)
    loaded = load(str(out), dtype="float32", device="cpu")
    ids = loaded.tokenizer.encode(PROMPTS[case])
    stops = {loaded.tokenizer.eos_id, loaded.tokenizer.end_of_turn_id}
    generated: list[int] = []
    for _ in range(24):
        top = logits_of(loaded.model, ids + generated)[-1].topk(2)
        assert float(top.values[0] - top.values[1]) >= MARGIN, "a near tie: pick another prompt"
        if int(top.indices[0]) in stops:
            break
        generated.append(int(top.indices[0]))
    binary = Path(LLAMA_CPP_BIN) / "llama-simple"
    done = subprocess.run(
        [str(binary), "-m", str(out), "-n", "24", PROMPTS[case]], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pieces = loaded.tokenizer.pieces
    # llama-simple prints the prompt's pieces (specials included), then each token it picks.
    expected = "".join(_piece_text(pieces[i]) for i in ids + generated)
    assert len(generated) >= 8
    assert done.stdout.rstrip("\n") == expected, (done.stdout, expected)


def test_inspect_counts_a_gemma3n_export_without_its_kv_placeholders(tmp_path):
    """The zero K/V a gemma3n GGUF carries for llama.cpp's loader are no model weights: the
    file's own tensors then hold exactly the parameters its metadata describes."""
    from gemmakit.planning.architecture import from_gguf
    from gemmakit.planning.params import count_params
    from gemmakit.planning.report import gguf_file_summary

    folder = save_folder(random_hf_model("gemma3n"), tmp_path / "hf")
    out = tmp_path / "m.gguf"
    export(model=str(folder), to="gguf", output=out, qtype="f32", progress=False)
    g = GGUFFile(out)
    assert any(name.startswith("blk.4.attn_k") for name in g.tensors)  # the placeholders are there
    assert gguf_file_summary(g)["params"] == count_params(from_gguf(g)).total
