"""Loading errors: every user mistake is one clear GemmakitError naming the file."""

import json

import pytest
import torch

from gemmakit.config import PRESETS, preset
from gemmakit.errors import ConfigError, GemmakitError, ModelFileError
from gemmakit.formats.gguf import GGUFFile
from gemmakit.hf_config import from_hf_config, to_hf_config
from gemmakit.loading import ModelSource, load, load_model, load_quantized_model, resolve


def test_truncated_gguf_is_a_clear_error(tmp_path, bundled):
    src = bundled.source.path
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src.read_bytes()[:50_000_000])
    with pytest.raises(ModelFileError, match=r"cut\.gguf: truncated"):
        GGUFFile(cut)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(src.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match=r"header\.gguf: truncated"):
        load(header_only)


def test_not_a_gguf(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        load(f)


def test_gguf_is_recognized_by_its_magic(tmp_path):
    """A GGUF without the .gguf suffix is found by its first four bytes, read alone."""
    blob = tmp_path / "model.bin"
    blob.write_bytes(b"GGUF" + bytes(60))
    assert resolve(blob).kind == "gguf"
    other = tmp_path / "weights.bin"
    other.write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(ModelFileError, match="not a GGUF file or a model folder"):
        resolve(other)


def test_unknown_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    )
    with pytest.raises(ConfigError, match="unsupported architecture.*LlamaForCausalLM"):
        load(tmp_path)


def test_unknown_config_key_is_not_dropped(hf_folder):
    folder, _ = hf_folder("gemma3")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["attention_bias"] = True
    with pytest.raises(ConfigError, match="attention_bias"):
        from_hf_config(cfg)
    cfg["attention_bias"] = False
    cfg["some_new_feature"] = 3
    with pytest.raises(ConfigError, match="some_new_feature"):
        from_hf_config(cfg)


def test_pickled_weights_are_refused(hf_folder):
    folder, _ = hf_folder("gemma")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelFileError, match="pickled"):
        load(folder)


def test_truncated_safetensors(hf_folder):
    folder, _ = hf_folder("gemma2")
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match="model.safetensors: truncated"):
        load(folder)


def test_fp16_refused_for_gemma3_allowed_for_gemma1(hf_folder):
    folder3, _ = hf_folder("gemma3")
    with pytest.raises(GemmakitError, match="float16 is refused"):
        load_model(ModelSource("hf", folder3, "x"), dtype=torch.float16)
    folder1, _ = hf_folder("gemma")
    model = load_model(ModelSource("hf", folder1, "x"), dtype=torch.float16)
    assert model.model.embed_tokens.weight.dtype == torch.float16


def test_missing_path_and_preset_without_weights():
    with pytest.raises(ModelFileError, match="no such file"):
        resolve("/nonexistent/model")
    with pytest.raises(GemmakitError, match="preset"):
        resolve("gemma-7b")


def test_presets_match_public_configs():
    g7 = preset("google/gemma-7b")
    assert (g7.num_attention_heads, g7.num_key_value_heads, g7.hidden_size) == (16, 16, 3072)
    g27 = PRESETS["gemma-2-27b"]
    assert g27.query_pre_attn_scalar == 144 and g27.attn_logit_softcapping == 50.0
    g3 = PRESETS["gemma-3-4b"]
    assert g3.layer_types.count("full_attention") == 5 and g3.rope_scaling_factor == 8.0
    assert g3.rope_base("sliding_attention") == 1e4 and g3.rope_base("full_attention") == 1e6


def test_gguf_config_of_bundled_model(bundled):
    c = bundled.config
    assert (c.hidden_size, c.num_hidden_layers, c.sliding_window, c.vocab_size) == (640, 18, 512, 262144)
    assert c.layer_types[5] == "full_attention" and c.layer_types[4] == "sliding_attention"
    # llama.cpp's norm + 1 is undone: the stored GGUF value minus one.
    g = GGUFFile(bundled.source.path)
    stored = g.tensor("blk.0.attn_norm.weight")
    torch.testing.assert_close(bundled.model.model.layers[0].input_layernorm.weight, stored - 1)


def test_converted_cache_equals_direct_gguf_load(bundled, tmp_path, monkeypatch):
    # `bundled` may come from the converted cache; a direct load must be identical.
    monkeypatch.setenv("GEMMAKIT_NO_CACHE", "1")
    direct = load(bundled.source.path, dtype="float32", device="cpu")
    ours, theirs = bundled.model.state_dict(), direct.model.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert bundled.config == direct.config
    text = "  Hello <start_of_turn>user\n\tx 🤖 naïve\n\n"
    assert bundled.tokenizer.encode(text) == direct.tokenizer.encode(text)


def test_hf_config_round_trip():
    for cfg in PRESETS.values():
        assert from_hf_config(to_hf_config(cfg)) == cfg


def test_real_config_quirks():
    # Gemma 2's original config.json repeats the window as sliding_window_size.
    g2 = to_hf_config(PRESETS["gemma-2-9b"])
    g2["sliding_window_size"] = 4096
    assert from_hf_config(g2).sliding_window == 4096
    # Multimodal Gemma 3 4B leaves heads/head_dim/vocab to transformers' defaults.
    mm = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 34, "sliding_window": 1024,
                        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}},
    }  # fmt: skip
    c = from_hf_config(mm)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (8, 4, 256, 262208)
    assert c.replace(eos_token_ids=(1, 106)) == PRESETS["gemma-3-4b"]
    with pytest.raises(ConfigError, match="lacks required"):
        from_hf_config({"architectures": ["GemmaForCausalLM"], "hidden_size": 8})


@pytest.mark.parametrize("kind", ["int8", "int4", "nf4"])
@pytest.mark.parametrize("tied", [True, False])
def test_quantized_load_streams_the_same_model(hf_folder, monkeypatch, kind, tied):
    """load(quantize=...) reads and quantizes tensor by tensor (the embedding in row chunks,
    here 4 of 64 rows) and must give exactly the model that quantizing a float load gives."""
    from gemmakit import quant as Q

    folder, _ = hf_folder("gemma3", tie_word_embeddings=tied)
    monkeypatch.setattr(Q.integer, "CHUNK_ROWS", 64)
    source = resolve(str(folder))
    streamed = load_quantized_model(source, torch.float32, {"kind": kind})
    after = Q.quantize_model(load_model(source, torch.float32), kind)
    a, b = streamed.state_dict(), after.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not any(t.is_meta for t in a.values())
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(streamed(ids), after(ids))
    assert streamed.quantization == after.quantization


def test_safetensors_reader_reads_rows_without_mmap(tmp_path):
    from gemmakit.formats.safetensors import SafetensorsReader, save_safetensors

    tensors = {
        "a": torch.randn(10, 3, 2),
        "b": torch.arange(7, dtype=torch.int32),
        "c": torch.randn(4).bfloat16(),
    }
    save_safetensors(tensors, tmp_path / "x.safetensors")
    reader = SafetensorsReader([tmp_path / "x.safetensors"])
    for name, t in tensors.items():
        assert torch.equal(reader.tensor(name), t)
    assert torch.equal(reader.rows("a", 3, 7), tensors["a"][3:7])
    assert torch.equal(reader.rows("a", 2, 5, torch.bfloat16), tensors["a"][2:5].bfloat16())


@pytest.mark.parametrize("kind", ["int8", "int4", "nf4"])
def test_quantized_cache_round_trip(hf_folder, tmp_path, monkeypatch, kind):
    """A quantized model written to the cache reads back identical (int4's packed layout
    included); a damaged entry is ignored, not trusted."""
    from gemmakit import loading as L

    monkeypatch.setenv("GEMMAKIT_CACHE", str(tmp_path / "cache"))
    folder, _ = hf_folder("gemma3")
    source, q = resolve(str(folder)), {"kind": kind}
    target = L.quantized_folder(source, torch.float32, q)
    assert target != L.quantized_folder(source, torch.bfloat16, q)
    built = L.load_quantized_model(source, torch.float32, q)
    assert L._read_quantized(target, torch.float32, q) is None  # nothing cached yet
    L._write_quantized(target, built)
    cached = L._read_quantized(target, torch.float32, q)
    a, b = built.state_dict(), cached.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [getattr(m, "layout", None) for m in built.modules()] == [
        getattr(m, "layout", None) for m in cached.modules()
    ]
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(built(ids), cached(ids))
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert L._read_quantized(target, torch.float32, q) is None


def test_cache_writes_are_best_effort_and_leave_nothing_partial(hf_folder, tmp_path, monkeypatch):
    """A cache write that fails (a full or read-only disk) is dropped: no folder, no temp folder,
    no error; a write that succeeds is not replaced by a later one."""
    from gemmakit import loading as L

    folder, _ = hf_folder("gemma3")
    built = L.load_quantized_model(resolve(str(folder)), torch.float32, {"kind": "int8"})
    target = tmp_path / "cache" / "entry"

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(L.safetensors, "save_safetensors", disk_full)
        L._write_quantized(target, built)
    assert not any(target.parent.iterdir())
    L._write_quantized(target, built)
    assert (target / L.READY).exists()
    first = (target / "model.safetensors").stat().st_mtime_ns
    L._write_quantized(target, built)
    assert (target / "model.safetensors").stat().st_mtime_ns == first
    assert sorted(p.name for p in target.parent.iterdir()) == ["entry"]


def test_loading_builds_the_model_without_initializing_it():
    """The model is built on the meta device with torch's initializers skipped: a meta
    `normal_` would import torch._dynamo (over a second of every load), and the initializers
    are back in place afterwards."""
    from tests.conftest import run_fresh_python

    code = (
        "import sys, torch\n"
        "from gemmakit.loading import load\n"
        "load()\n"
        "print('torch._dynamo' in sys.modules)\n"
        "print(float(torch.nn.init.ones_(torch.zeros(2)).sum()))\n"
    )
    out = run_fresh_python(code, timeout=300)
    assert out.stdout.split() == ["False", "2.0"], out.stdout + out.stderr


def test_a_loaded_awq_folder_says_awq(hf_folder, tmp_path):
    """A GPTQ or AWQ checkpoint's linears are held in GPTQ's layout either way; the model still
    records which method made them (`model.quantization`), as a model quantized in-process does."""
    from gemmakit.formats.gptq_folder import awq_config, write_gptq_folder
    from gemmakit.loading import load
    from gemmakit.quant.awq import awq_quantize_model
    from gemmakit.quant.packed4 import gptq_state_to_awq
    from tests.test_gptq_awq import _tiny_loaded

    _, loaded = _tiny_loaded(hf_folder)
    model = loaded.model
    ids = torch.tensor([[2, 10, 20, 30, 40, 50, 60, 70]])
    with torch.no_grad():
        awq_quantize_model(model, [ids], group_size=32)
        logits = model(ids)
    out = tmp_path / "awq"
    state = gptq_state_to_awq(model.state_dict())
    write_gptq_folder(out, state, model.config, loaded.tokenizer, awq_config(32), torch.float32)
    again = load(out, dtype="float32", device="cpu").model
    assert model.quantization["kind"] == again.quantization["kind"] == "awq"
    with torch.no_grad():
        assert torch.equal(again(ids), logits)
