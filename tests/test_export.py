"""Export: GGUF round trips, block bytes against the spec, llama.cpp, transformers, the CLI."""

from __future__ import annotations

import functools
import importlib.util
import io
import json

import numpy as np
import pytest
import torch

from gemmakit.cli import main
from gemmakit.errors import GemmakitError
from gemmakit.export import export
from gemmakit.formats.gguf import GGUFFile
from gemmakit.loading import load

FAMILIES = ("gemma", "gemma2", "gemma3")


# --- a tiny model with a real SentencePiece tokenizer ----------------------------------------


@functools.cache
def tiny_sentencepiece() -> bytes:
    """A 256-piece SentencePiece BPE model with Gemma's special ids, trained on our text."""
    import sentencepiece as spm

    from gemmakit.evaluation.verify import DEFAULT_TEXT

    lines = [line for line in DEFAULT_TEXT.read_text().splitlines() if line.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=256, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", control_symbols=["<start_of_turn>", "<end_of_turn>"],
        user_defined_symbols=["\u2581\u2581", "\n"], add_dummy_prefix=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    return buf.getvalue()


@pytest.fixture
def tiny(hf_folder):
    """(folder, hf_model) of a tiny random model of a family, with tokenizer.model."""

    def make(family: str, **overrides):
        folder, hf_model = hf_folder(family, **overrides)
        (folder / "tokenizer.model").write_bytes(tiny_sentencepiece())
        return folder, hf_model

    return make


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids)[None])[0]


IDS = [2, 17, 45, 99, 200, 31, 7, 250, 64, 12, 90, 33]


# --- GGUF: round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_f32_round_trip_tiny(tiny, tmp_path, family):
    folder, _ = tiny(family)
    out = tmp_path / "m.gguf"
    result = export(model=str(folder), to="gguf", output=out, qtype="f32", progress=False)
    assert result["tensor_types"] == {"F32": len(GGUFFile(out).tensors)}
    a, b = load(str(folder), dtype="float32", device="cpu"), load(str(out), dtype="float32", device="cpu")
    ca, cb = a.model.config, b.model.config
    assert cb.layer_types == ca.layer_types and cb.sliding_window == ca.sliding_window
    assert cb.attention_scale == pytest.approx(ca.attention_scale, rel=1e-7)
    assert (cb.attn_logit_softcapping, cb.final_logit_softcapping) == (
        ca.attn_logit_softcapping,
        ca.final_logit_softcapping,
    )
    # Same logits: only llama.cpp's norm + 1 is undone in float32, exact for these values.
    torch.testing.assert_close(_logits(b.model, IDS), _logits(a.model, IDS), rtol=0, atol=1e-5)
    # The vocabulary is the SentencePiece model's: pieces, scores, types, special ids.
    text = "The orchard  and the\nbridge <start_of_turn>user"
    assert b.tokenizer.encode(text) == a.tokenizer.encode(text)
    from sentencepiece import sentencepiece_model_pb2 as pb

    md = GGUFFile(out).metadata
    proto = pb.ModelProto.FromString(tiny_sentencepiece())
    assert list(md["tokenizer.ggml.scores"]) == [p.score for p in proto.pieces]
    assert list(md["tokenizer.ggml.token_type"]) == [p.type for p in proto.pieces]
    assert md["tokenizer.ggml.token_type"][6] == 4  # USER_DEFINED
    assert md["tokenizer.ggml.tokens"][6] == "  "  # user-defined: real spaces, as llama.cpp writes


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q5_1", "bf16", "f16"])
def test_gguf_tensors_are_the_reference_quantization(tiny, tmp_path, qtype):
    """Every tensor in the file is gguf-py's quantization of our weights, bit for bit."""
    import gguf

    folder, _ = tiny("gemma3")
    out = tmp_path / "m.gguf"
    export(model=str(folder), to="gguf", output=out, qtype=qtype, progress=False)
    g = GGUFFile(out)
    state = load(str(folder), dtype="float32", device="cpu").model.state_dict()
    by_gguf_name = {_gguf_name(k): k for k in state}
    for name, info in g.tensors.items():
        w = state[by_gguf_name[name]].float().numpy()
        if name.endswith("norm.weight"):
            assert info.ggml_type.name == "F32"
            np.testing.assert_array_equal(g.raw(name), w + 1)  # llama.cpp's norm + 1
            continue
        # Below 8 bits the tied embedding (also the output layer) is kept in Q8_0.
        low_bit_embedding = name == "token_embd.weight" and qtype not in ("q8_0", "f16", "bf16")
        assert info.ggml_type.name == ("Q8_0" if low_bit_embedding else qtype.upper())
        ref = gguf.quants.quantize(w, info.ggml_type)
        raw = g.raw(name)
        assert np.asarray(raw).tobytes() == np.asarray(ref).tobytes(), name
    assert "output.weight" not in g.tensors  # tied


def _gguf_name(hf_name):
    from gemmakit.formats.gguf import hf_to_gguf_name

    return hf_to_gguf_name(hf_name)


def _q8_0_spec(x: np.ndarray) -> bytes:
    """Q8_0 from the format's definition, independent of gguf-py.

    ggml's block_q8_0: 32 values as an fp16 scale d = amax / 127 and int8 q = round(x / d).
    """
    out = bytearray()
    for block in x.reshape(-1, 32).astype(np.float32):
        d = np.float32(np.abs(block).max() / np.float32(127))
        inv = np.float32(0) if d == 0 else np.float32(1) / d
        v = block * inv
        q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))  # round half away from zero
        out += np.float16(d).tobytes() + q.astype(np.int8).tobytes()
    return bytes(out)


def _q4_0_spec(x: np.ndarray) -> bytes:
    """Q4_0: d = x[argmax |x|] / -8, q = clip(trunc(x/d + 8.5), 0, 15), low nibbles first."""
    out = bytearray()
    for block in x.reshape(-1, 32).astype(np.float32):
        d = np.float32(block[np.abs(block).argmax()] / np.float32(-8))
        inv = np.float32(0) if d == 0 else np.float32(1) / d
        q = np.clip(np.trunc(block * inv + np.float32(8.5)), 0, 15).astype(np.uint8)
        out += np.float16(d).tobytes() + (q[:16] | (q[16:] << 4)).tobytes()
    return bytes(out)


def test_block_bytes_match_the_format_definition(tiny, tmp_path):
    folder, _ = tiny("gemma")
    w = load(str(folder), dtype="float32", device="cpu").model.state_dict()[
        "model.layers.1.mlp.up_proj.weight"
    ]
    for qtype, spec in (("q8_0", _q8_0_spec), ("q4_0", _q4_0_spec)):
        out = tmp_path / f"{qtype}.gguf"
        export(model=str(folder), to="gguf", output=out, qtype=qtype, progress=False)
        raw = np.asarray(GGUFFile(out).raw("blk.1.ffn_up.weight")).tobytes()
        assert raw == spec(w.numpy())


def test_interrupted_export_leaves_no_file(tiny, tmp_path, monkeypatch):
    import gemmakit.formats.gguf_writer as gw

    folder, _ = tiny("gemma2")
    calls = {"n": 0}
    real = gw._quantize

    def failing(t, qtype):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(t, qtype)

    monkeypatch.setattr(gw, "_quantize", failing)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        export(model=str(folder), to="gguf", output=out / "m.gguf", qtype="q8_0", progress=False)
    assert calls["n"] == 5
    assert list(out.iterdir()) == []  # neither the target nor a temporary file


def test_layer_types_llama_cpp_cannot_express(tmp_path):
    from gemmakit.config import FULL, preset
    from gemmakit.formats.gguf_writer import write_gguf

    cfg = preset("gemma-2-2b")
    cfg = cfg.replace(layer_types=(FULL,) * cfg.num_hidden_layers)
    with pytest.raises(GemmakitError, match="cannot be described"):
        write_gguf(tmp_path / "x.gguf", {}, cfg, progress=False)
    assert not (tmp_path / "x.gguf").exists()


# --- GGUF: the bundled model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_q8(tmp_path_factory, bundled):
    path = tmp_path_factory.mktemp("gguf") / "bundled.q8_0.gguf"
    export(loaded=bundled, to="gguf", output=path, qtype="q8_0", progress=False)
    return path


def test_bundled_gguf_metadata(bundled_q8, bundled):
    from gemmakit.formats.gguf_writer import GEMMA_CHAT_TEMPLATE
    from gemmakit.loading import default_gguf

    g, src = GGUFFile(bundled_q8), GGUFFile(default_gguf())
    md = g.metadata
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv", "attention.key_length",
                "attention.value_length", "rope.freq_base", "attention.sliding_window"):  # fmt: skip
        assert md[f"gemma3.{key}"] == src.metadata[f"gemma3.{key}"], key
    assert md["gemma3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert "gemma3.rope.scaling.type" not in md  # factor 1: no scaling keys
    # The vocabulary arrays are the source's, unchanged.
    assert md["tokenizer.ggml.tokens"] == src.metadata["tokenizer.ggml.tokens"]
    assert np.array_equal(md["tokenizer.ggml.scores"], src.metadata["tokenizer.ggml.scores"])
    assert np.array_equal(md["tokenizer.ggml.token_type"], src.metadata["tokenizer.ggml.token_type"])
    # Special ids by token string, Gemma's flags.
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]) == (2, 1)
    assert (md["tokenizer.ggml.unknown_token_id"], md["tokenizer.ggml.padding_token_id"]) == (3, 0)
    assert md["tokenizer.ggml.eot_token_id"] == 106
    assert md["tokenizer.ggml.add_bos_token"] is True and md["tokenizer.ggml.add_eos_token"] is False
    assert md["tokenizer.ggml.add_space_prefix"] is False
    assert md["tokenizer.chat_template"] == GEMMA_CHAT_TEMPLATE
    assert md["general.file_type"] == 7 and md["general.quantization_version"] == 2
    # Tied output, norms + 1 in F32, the embedding in Q8_0.
    assert "output.weight" not in g.tensors
    assert g.tensors["token_embd.weight"].ggml_type.name == "Q8_0"
    norm = bundled.model.model.norm.weight.detach().numpy()
    np.testing.assert_array_equal(g.raw("output_norm.weight"), norm + np.float32(1))


def test_chat_template_renders_like_gemmakit():
    import jinja2

    from gemmakit.formats.gguf_writer import GEMMA_CHAT_TEMPLATE
    from gemmakit.formats.tokenizer import render_chat

    def raise_exception(msg):
        raise ValueError(msg)

    env = jinja2.Environment()
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(GEMMA_CHAT_TEMPLATE)
    conversations = [
        [{"role": "user", "content": "Hi!"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hello "},
         {"role": "assistant", "content": "Hello.\n"}, {"role": "user", "content": "Bye"}],
    ]  # fmt: skip
    for conv in conversations:
        for gen in (True, False):
            assert template.render(
                messages=conv, bos_token="<bos>", add_generation_prompt=gen
            ) == render_chat(conv, gen)
    with pytest.raises(ValueError, match="alternate"):
        template.render(messages=[{"role": "user", "content": "a"}] * 2, bos_token="<bos>")


def test_bundled_q8_0_within_tolerance(bundled_q8, bundled):
    """Q8_0 read back: logits within 1.0 of the source's (their range is ~40) and the same
    next-token choice at >= 95% of the positions of a text."""
    q8 = load(str(bundled_q8), dtype="float32", device="cpu")
    ids = bundled.tokenizer.encode(
        "The keeper's daughter took over the ledger when her father's eyesight began to fail. "
        "Her handwriting is smaller and neater, and she writes more about the birds."
    )
    a, b = _logits(bundled.model, ids), _logits(q8.model, ids)
    assert (a - b).abs().max() < 1.0
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95


def test_bundled_f32_round_trip_identical(bundled, tmp_path):
    out = tmp_path / "b.f32.gguf"
    export(loaded=bundled, to="gguf", output=out, qtype="f32", progress=False)
    back = load(str(out), dtype="float32", device="cpu")
    ids = bundled.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    assert torch.equal(_logits(back.model, ids), _logits(bundled.model, ids))


# --- llama.cpp itself -----------------------------------------------------------------------------

PROMPTS = ["The capital of France is", "Once upon a time, there was a little", "def fibonacci(n):",
           "The three primary colors are"]  # fmt: skip


@pytest.mark.llamacpp
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_llama_cpp_runs_the_export(bundled, tmp_path, qtype):
    """llama.cpp loads our file and decodes greedily like gemmakit on the same file.

    f16: gemmakit's free-running greedy tokens equal llama.cpp's for 24 tokens on every prompt.
    q8_0: llama.cpp also quantizes activations to 8 bits in its Q8_0 dot products, so exact
    agreement is not expected everywhere: llama.cpp reads gemmakit's greedy sequence (teacher
    forcing) and must pick gemmakit's token at >= 20 of 24 positions, disagreeing only where
    gemmakit's top two logits are within 0.5 (a near tie).
    """
    from llama_cpp import Llama

    from gemmakit import LLM, SamplingParams

    path = tmp_path / f"b.{qtype}.gguf"
    export(loaded=bundled, to="gguf", output=path, qtype=qtype, progress=False)
    ours = LLM(model=str(path))
    llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, logits_all=True)
    try:
        for prompt in PROMPTS:
            ids = ours.tokenizer.encode(prompt)
            assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == ids
            params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
            gen = ours.generate([ids], params)[0].outputs[0].token_ids
            if qtype == "f16":
                theirs = []
                for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                    theirs.append(token)
                    if len(theirs) == 24:
                        break
                assert theirs == gen, prompt
            full = ids + gen
            llm.reset()
            llm.eval(full)
            scores = np.array(llm.scores[: len(full)])
            ref = _logits(ours.model, full).numpy()
            pos = np.arange(len(ids) - 1, len(full) - 1)
            agree = scores[pos].argmax(-1) == np.array(gen)
            top2 = np.sort(ref[pos], axis=-1)[:, -2:]
            margins = top2[:, 1] - top2[:, 0]
            assert agree.sum() >= 20, prompt
            assert np.all(margins[~agree] < 0.5), prompt
    finally:
        llm.close()


# --- Hugging Face folders ---------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_export_loads_in_transformers(tiny, tmp_path, family):
    import transformers

    folder, _ = tiny(family)
    out = tmp_path / "hf"
    gguf_path = tmp_path / "m.gguf"
    export(model=str(folder), to="gguf", output=gguf_path, qtype="f32", progress=False)
    # From the GGUF (so config, weights and tokenizer are all rebuilt, not copied).
    result = export(model=str(gguf_path), to="hf", output=out, qtype="f32", progress=False)
    assert {"config.json", "model.safetensors", "tokenizer.model", "generation_config.json"} <= set(
        result["files"]
    )
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load(str(gguf_path), dtype="float32", device="cpu")
    # max_position_embeddings comes from the GGUF context length; everything else round-trips.
    with torch.no_grad():
        theirs = ref(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(theirs, _logits(ours.model, IDS), rtol=1e-5, atol=1e-5)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == list(ours.stop_ids)


def test_hf_export_copies_source_tokenizer_and_refuses_non_empty(tiny, tmp_path):
    folder, _ = tiny("gemma2")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'x' }}"}))
    out = tmp_path / "hf"
    export(model=str(folder), to="hf", output=out, qtype="bf16", progress=False)
    assert (out / "tokenizer.model").read_bytes() == tiny_sentencepiece()
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == "{{ 'x' }}"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(GemmakitError, match="not empty"):
        export(model=str(folder), to="hf", output=out, progress=False)
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    export(model=str(folder), to="hf", output=out, qtype="f32", force=True, progress=False)
    assert not (out / "model-00001-of-00002.safetensors").exists()
    assert load(str(out), device="cpu").model.model.norm.weight.dtype == torch.float32


def test_bundled_hf_export_matches_transformers(bundled, tmp_path):
    import transformers

    out = tmp_path / "hf"
    export(loaded=bundled, to="hf", output=out, qtype="f32", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "The orchard  produced\n\nmore fruit than <start_of_turn>user she could sell."
    ids = bundled.tokenizer.encode(text)
    assert tok(text)["input_ids"] == ids
    from gemmakit.formats.tokenizer import render_chat

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == render_chat(chat)
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(theirs, _logits(bundled.model, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_vocabulary_rebuilt_from_tokenizer_json(hf_bundled):
    """A source with only tokenizer.json (llama.cpp GH#19152): pieces and types come back
    exactly, scores in the original order."""
    from gemmakit.formats.gguf_writer import _vocab_arrays
    from gemmakit.formats.tokenizer import NORMAL, Tokenizer
    from gemmakit.loading import default_gguf

    _, hf_tok = hf_bundled
    tok = Tokenizer.from_file(hf_tok.name_or_path + "/tokenizer.json")
    pieces, scores, types = _vocab_arrays(tok, 262144, None)
    md = GGUFFile(default_gguf()).metadata
    assert pieces == md["tokenizer.ggml.tokens"]
    assert types == md["tokenizer.ggml.token_type"].tolist()
    normal = np.array(types) == NORMAL
    assert np.array_equal(np.argsort(-np.array(scores)[normal], kind="stable"),
                          np.argsort(-md["tokenizer.ggml.scores"][normal], kind="stable"))  # fmt: skip


# --- adapters -----------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("gemmakit.lora") is None, reason="gemmakit.lora not present")
def test_export_merges_an_adapter(tiny, tmp_path):
    import copy

    from gemmakit import lora

    folder, _ = tiny("gemma3")
    base = load(str(folder), dtype="float32", device="cpu")
    tuned = copy.deepcopy(base.model)
    lora.apply_lora(tuned, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    lora.save_adapter(tuned, tmp_path / "adapter")
    merged = lora.merge(tuned)
    out = tmp_path / "merged.gguf"
    export(
        model=str(folder),
        adapter=str(tmp_path / "adapter"),
        to="gguf",
        output=out,
        qtype="f32",
        progress=False,
    )
    back = load(str(out), dtype="float32", device="cpu")
    torch.testing.assert_close(_logits(back.model, IDS), _logits(merged, IDS), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(back.model, IDS), _logits(base.model, IDS), atol=1e-3)


# --- CLI --------------------------------------------------------------------------------------


def test_cli_help(capsys):
    for command in ("export", "quantize", "verify"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--to" in text and "q8_0" in text and "--embedding-type" in text and "--types" in text


def test_cli_export_json(tiny, tmp_path, capsys):
    folder, _ = tiny("gemma")
    out = tmp_path / "m.q8_0.gguf"
    assert (
        main(["export", "--model", str(folder), "--to", "gguf", "--type", "q8_0", "-o", str(out), "--json"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["bytes"] == out.stat().st_size and result["type"] == "q8_0"
    assert result["tensor_types"]["Q8_0"] == 15


def test_cli_export_bad_input(tiny, tmp_path, capsys):
    folder, _ = tiny("gemma")
    capsys.readouterr()
    base = ["export", "--model", str(folder)]
    assert main([*base, "--to", "gguf", "--type", "q3_k", "-o", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "--type q3_k is not valid with --to gguf" in err and err.count("\n") == 1
    assert main([*base, "--to", "hf", "--type", "q8_0", "-o", str(tmp_path / "hf")]) == 2
    assert "not valid with --to hf" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a file where a folder should be: not writable, even for root
    assert main([*base, "--to", "gguf", "-o", str(blocker / "x.gguf")]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert main([*base, "--to", "hf", "-o", str(blocker / "hf")]) == 2
    assert "cannot write" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--to", "onnx", "-o", str(tmp_path / "x")])
    assert (
        main(["export", "--model", str(tmp_path / "missing"), "--to", "gguf", "-o", str(tmp_path / "y.gguf")])
        == 2
    )
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "hf").exists()
