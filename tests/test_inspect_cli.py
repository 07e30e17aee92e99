"""`gemmakit inspect` through the real dispatcher."""

import json
import shutil
from pathlib import Path

import pytest

from gemmakit.cli import main

CONFIGS = Path(__file__).parent / "data" / "configs"
COMPARISON = ["gemma-7b", "gemma-2b"] + [
    str(CONFIGS / f"{n}.json") for n in ("llama-2-7b", "mistral-7b-v0.1", "qwen1.5-7b")
]


def run(capsys, *argv):
    code = main(["inspect", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_preset_prints_exact_counts_and_notes(capsys):
    code, out, _ = run(capsys, "gemma-7b")
    assert code == 0
    for text in ("8,537,680,896", "786,432,000", "7,751,248,896", "MHA", "28 global", "17.08 GB", "5.57 GB"):
        assert text in out, text
    assert "786,825,216" in out and "256,128" in out  # the report's padded-vocabulary count
    assert "7.1 GB" in out  # the GPU memory reported for NF4, explained


def test_json_shape_and_values(capsys):
    code, out, _ = run(capsys, "--json", *COMPARISON, str(CONFIGS / "gemma-3-4b-it.json"))
    assert code == 0
    data = json.loads(out)
    assert [d["name"] for d in data] == [
        "gemma-7b", "gemma-2b", "llama-2-7b", "mistral-7b-v0.1", "qwen1.5-7b", "gemma-3-4b-it"
    ]  # fmt: skip
    totals = [d["total_params"] for d in data]
    assert totals == [
        8_537_680_896,
        2_506_172_416,
        6_738_415_616,
        7_241_732_096,
        7_721_324_544,
        4_300_079_472,
    ]
    for d in data:
        assert d["embedding_params"] + d["non_embedding_params"] + d["vision_params"] == d["total_params"]
        assert set(d["memory"]) >= {"fp32", "bf16", "int8", "nf4", "q8_0", "q4_0", "q4_k_m"}
        assert d["memory"]["fp32"] == 2 * d["memory"]["bf16"] == 4 * d["text_params"]
        assert d["memory"]["nf4"] < d["memory"]["int8"] < d["memory"]["bf16"]
        assert {"bytes_per_token", "bytes", "context", "batch"} <= set(d["kv_cache"])
        methods = d["training"]["methods"]
        assert set(methods) == {"full", "full_8bit", "lora", "qlora"}
        assert methods["qlora"]["total_checkpointed_chunked"] < methods["full"]["total"]
    assert data[0]["kv_cache"]["bytes_per_token"] == 458_752 and data[0]["kv_cache"]["context"] == 8192
    assert data[4]["config"]["qkv_bias"] is True and data[2]["config"]["tie_word_embeddings"] is False


def test_context_and_batch_flags(capsys):
    _, out, _ = run(capsys, "--json", "gemma-2b", "--context", "1000", "--batch", "3", "--seq-len", "128")
    d = json.loads(out)[0]
    assert d["kv_cache"]["bytes"] == 3 * 1000 * 18_432
    assert d["training"]["batch"] == 3 and d["training"]["seq_len"] == 128


def test_compare_prints_one_table_with_vocabulary_ratios(capsys):
    code, out, _ = run(capsys, "--compare", *COMPARISON)
    assert code == 0
    header = next(line for line in out.splitlines() if "gemma-7b" in line)
    for name in ("gemma-7b", "gemma-2b", "llama-2-7b", "mistral-7b-v0.1", "qwen1.5-7b"):
        assert name in header  # side by side, not one table per model
    total_row = next(line for line in out.splitlines() if line.strip().startswith("total"))
    for count in ("8,537,680,896", "2,506,172,416", "6,738,415,616", "7,241,732,096", "7,721,324,544"):
        assert count in total_row
    assert "8.0x llama-2-7b" in out and "1.7x qwen1.5-7b" in out
    assert "MQA" in out and "GQA" in out and "32 sliding (window 4,096)" in out


def test_unknown_target_is_a_one_line_error(capsys):
    code, out, err = run(capsys, "gemma-99b")
    assert code == 2 and out == ""
    assert "gemma-99b: not a preset" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "not valid JSON"),
        ('{"architectures": ["GPT2LMHeadModel"]}', "not one inspect can count"),
    ],
)
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    code, _, err = run(capsys, str(path))
    assert code == 2 and message in err and "Traceback" not in err


def test_model_folder_target_is_named_after_the_folder(tmp_path, capsys):
    folder = tmp_path / "Mistral-7B-v0.1"
    folder.mkdir()
    shutil.copy(CONFIGS / "mistral-7b-v0.1.json", folder / "config.json")
    _, out, _ = run(capsys, "--json", str(folder))
    d = json.loads(out)[0]
    assert d["name"] == "Mistral-7B-v0.1" and d["non_embedding_params"] == 6_979_588_096


def test_default_target_is_the_bundled_gguf(capsys):
    code, out, _ = run(capsys)
    assert code == 0
    assert "268,098,176" in out and "GGUF" in out
    assert "15 local (window 512) + 3 global" in out
    assert "246,587,904" in out  # the file's tensor bytes, equal to the Q4_K_M rule's estimate
    _, out, _ = run(capsys, "--json")
    d = json.loads(out)[0]
    assert d["total_params"] == 268_098_176 and d["source"] == "GGUF"
    assert d["gguf_file"]["params"] == 268_098_176
    assert d["gguf_file"]["bytes_by_type"]["Q8_0"] == 179_824_640  # the tied embedding (Q6_K fallback)
    assert d["memory"]["gguf_file"] == d["memory"]["q4_k_m"] == 246_587_904


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--compare", "--json", "--context", "--batch", "--seq-len", "--kv-dtype", "--train-dtype",
                 "--lora-rank", "--ce-chunk"):  # fmt: skip
        assert flag in out
    assert "4.127" in out and "Q6_K" in out  # the rules behind the numbers


def tiny_qwen2_gguf(path: Path) -> dict:
    """A 2-layer Qwen2-style GGUF (q/k/v biases, untied output) and its equivalent config.json."""
    import gguf
    import numpy as np

    vocab, hidden, inter, heads, kv, layers = 64, 32, 48, 4, 2, 2
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(layers)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_context_length(128)
    w.add_rope_freq_base(1e6)
    f32 = lambda *shape: np.zeros(shape, dtype=np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", f32(vocab, hidden))
    kv_dim = kv * hidden // heads
    for i in range(layers):
        for name, shape in (
            ("attn_q", (hidden, hidden)),
            ("attn_k", (kv_dim, hidden)),
            ("attn_v", (kv_dim, hidden)),
        ):
            w.add_tensor(f"blk.{i}.{name}.weight", f32(*shape))
            w.add_tensor(f"blk.{i}.{name}.bias", f32(shape[0]))
        w.add_tensor(f"blk.{i}.attn_output.weight", f32(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", f32(inter, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", f32(inter, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", f32(hidden, inter))
        w.add_tensor(f"blk.{i}.attn_norm.weight", f32(hidden))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", f32(hidden))
    w.add_tensor("output_norm.weight", f32(hidden))
    w.add_tensor("output.weight", f32(vocab, hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {
        "architectures": ["Qwen2ForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "tie_word_embeddings": False,
    }  # fmt: skip


def test_non_gemma_gguf_counts_agree_with_its_config(tmp_path, capsys):
    config = tiny_qwen2_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "config.json").write_text(json.dumps(config))
    _, out, _ = run(capsys, "--json", str(tmp_path / "tiny.gguf"), str(tmp_path / "config.json"))
    from_gguf, from_config = json.loads(out)
    assert from_gguf["gguf_file"]["params"] == from_gguf["total_params"] == from_config["total_params"]
    assert from_gguf["config"]["qkv_bias"] and not from_gguf["config"]["tie_word_embeddings"]
    assert from_gguf["gguf_file"]["bytes_by_type"] == {"F32": 4 * from_gguf["total_params"]}


def test_piped_output_is_plain_unwrapped_text(capsys):
    # Not a terminal: no ANSI styling, no markup, and each table row on one line.
    code, out, _ = run(capsys, "--compare", *COMPARISON[:3])
    assert code == 0
    header = out.splitlines()[0]
    assert all(name in header for name in ("gemma-7b", "gemma-2b", "llama-2-7b"))
    assert "8.0x llama-2-7b" in out and "6,738,415,616" in out
    assert "\x1b[" not in out and "[bold]" not in out


def test_gguf_target_reads_no_tensor_data(monkeypatch, capsys):
    from gemmakit.formats.gguf import GGUFFile

    def refuse(self, name):
        raise AssertionError(f"inspect read tensor data of {name}")

    monkeypatch.setattr(GGUFFile, "raw", refuse)
    code, out, _ = run(capsys, "--json")
    assert code == 0 and json.loads(out)[0]["total_params"] == 268_098_176


def test_hub_ids_resolve_to_presets_named_as_the_preset(capsys):
    _, out, _ = run(capsys, "--json", "google/gemma-2-9b-it", "gemma-3-1b-pt")
    assert [d["name"] for d in json.loads(out)] == ["gemma-2-9b", "gemma-3-1b"]
