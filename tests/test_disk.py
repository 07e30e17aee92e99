"""Disk hygiene: stale temporaries of killed writes are cleaned, the model caches are keyed by
content and bounded (LRU), `gemmakit cache list|clear`, and an HF export's tokenizer.json."""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from gemmakit import cli
from gemmakit import loading as L
from gemmakit.export import export
from gemmakit.files import atomic_folder, atomic_write, content_key, process_alive
from gemmakit.paths import LAST_USED, cache_entries, evict, mark_used
from gemmakit.training.checkpoints import checkpoints, save_checkpoint
from gemmakit.training.config import TrainConfig


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache of our own, so no test reads or evicts the user's."""
    root = tmp_path / "cache"
    monkeypatch.setenv("GEMMAKIT_CACHE", str(root))
    monkeypatch.delenv("GEMMAKIT_NO_CACHE", raising=False)
    monkeypatch.delenv("GEMMAKIT_CACHE_MAX_BYTES", raising=False)
    return root


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not process_alive(child.pid)
    return child.pid


@pytest.fixture
def live_pid():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child.pid
    child.kill()
    child.wait()


# --- stale temporaries ------------------------------------------------------------------------


def test_killed_export_temporaries_are_removed_by_the_next_write(tmp_path, live_pid):
    dead = _dead_pid()
    (tmp_path / f".m.gguf.tmp-{dead}").write_bytes(b"half a model")
    (tmp_path / f".hf.tmp-{dead}").mkdir()
    (tmp_path / f".hf.tmp-{dead}" / "model.safetensors").write_bytes(b"x")
    (tmp_path / f".other.gguf.tmp-{live_pid}").write_bytes(b"a write under way")
    (tmp_path / f".notes.tmp-{dead}x").write_text("not our name pattern")
    atomic_write(tmp_path / "m.gguf", lambda tmp: tmp.write_bytes(b"GGUF"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["m.gguf", f".other.gguf.tmp-{live_pid}", f".notes.tmp-{dead}x"]
    )
    (tmp_path / f".hf.tmp-{dead}").mkdir()
    with atomic_folder(tmp_path / "hf") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not (tmp_path / f".hf.tmp-{dead}").exists() and (tmp_path / "hf" / "config.json").exists()
    assert (tmp_path / f".other.gguf.tmp-{live_pid}").exists()  # never a live process's


def test_killed_checkpoint_save_temporary_is_removed_by_the_next_save(tmp_path, live_pid):
    dead = _dead_pid()
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / f".step-000050.tmp-{dead}").mkdir()
    (root / f".step-000050.tmp-{dead}" / "model.safetensors").write_bytes(b"cut")
    (root / f".step-000060.tmp-{live_pid}").mkdir()
    model = torch.nn.Linear(4, 4)
    cfg = TrainConfig(method="full", keep_checkpoints=0)
    save_checkpoint(tmp_path, 100, model, {"step": 100}, cfg, "base")
    assert [p.name for p in checkpoints(tmp_path)] == ["step-000100"]
    assert sorted(p.name for p in root.iterdir()) == [f".step-000060.tmp-{live_pid}", "step-000100"]


def test_process_alive():
    assert process_alive(os.getpid())
    assert not process_alive(_dead_pid()) and not process_alive(0) and not process_alive(2**80)


# --- the content key --------------------------------------------------------------------------


def test_content_key_follows_content_not_name_or_mtime(tmp_path):
    small = tmp_path / "a.gguf"
    small.write_bytes(os.urandom(10_000))
    big = tmp_path / "b.gguf"
    data = bytearray(os.urandom(9 * 2**20))  # past the sampled size: blocks are sampled
    big.write_bytes(data)
    keys = {content_key(small), content_key(big)}
    os.utime(big, (0, 0))
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(bytes(data))
    assert content_key(big) == content_key(copy) and len(keys) == 2 and content_key(big) in keys
    middle = (len(data) - 64 * 1024) * 32 // 63 + 10  # inside the 33rd of the 64 sampled blocks
    for offset in (0, middle, len(data) - 1):
        changed = bytearray(data)
        changed[offset] ^= 1
        copy.write_bytes(bytes(changed))
        assert content_key(copy) != content_key(big), offset
    copy.write_bytes(bytes(data) + b"\0")
    assert content_key(copy) != content_key(big)  # the size is in the key


def test_touched_or_copied_gguf_reuses_one_converted_entry(tiny, cache, tmp_path):
    folder = tiny("gemma3")
    gguf = tmp_path / "m.gguf"
    export(model=str(folder), to="gguf", output=gguf, qtype="f32", progress=False)
    first = L.load(str(gguf), "float32", "cpu")
    assert [e.kind for e in cache_entries()] == ["converted"]
    os.utime(gguf, (time.time() + 100, time.time() + 100))  # `touch`
    (tmp_path / "renamed.gguf").write_bytes(gguf.read_bytes())
    second = L.load(str(tmp_path / "renamed.gguf"), "float32", "cpu")
    assert second.source.kind == "gguf" and len(cache_entries()) == 1
    assert json.loads((cache_entries()[0].path / "cache-source.json").read_text())["source"] == str(gguf)
    ids = torch.tensor([[2, 17, 45, 99]])
    with torch.no_grad():
        assert torch.equal(first.model(ids), second.model(ids))
    weights = cache_entries()[0].path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # damaged: rebuilt from the GGUF
    third = L.load(str(gguf), "float32", "cpu")
    with torch.no_grad():
        assert torch.equal(first.model(ids), third.model(ids))
    from gemmakit.formats.safetensors import SafetensorsReader

    assert SafetensorsReader([weights]).entries  # the entry written again, whole


def test_quantized_entry_is_keyed_by_content(tiny, cache, tmp_path):
    folder = tiny("gemma3")
    L.load(str(folder), "float32", "cpu", quantize="int8")
    (entry,) = cache_entries()
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    L.load(str(copy), "float32", "cpu", quantize="int8")
    assert [e.path for e in cache_entries()] == [entry.path]
    weights = entry.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # damaged: rebuilt, not left in the way
    L.load(str(copy), "float32", "cpu", quantize="int8")
    assert L._read_quantized(entry.path, torch.float32, {"kind": "int8"}) is not None


# --- the bound --------------------------------------------------------------------------------


def _entry(root, kind, name, size, used):
    folder = root / kind / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * size)
    (folder / LAST_USED).touch()
    os.utime(folder / LAST_USED, (used, used))
    return folder


def test_eviction_removes_least_recently_used_first_never_the_kept_one(cache):
    now = time.time()
    a = _entry(cache, "converted", "a", 4000, now - 300)
    b = _entry(cache, "quantized", "b", 4000, now - 200)
    c = _entry(cache, "converted", "c", 4000, now - 100)
    (cache / "converted" / f".d.tmp-{os.getpid()}").mkdir()  # a write under way: not an entry
    assert [e.path for e in cache_entries()] == [a, b, c]
    mark_used(a)  # a read makes `a` the newest
    assert [e.path for e in cache_entries()] == [b, c, a]
    assert [e.path for e in evict(limit=9000)] == [b]
    assert not b.exists() and c.exists() and a.exists()
    assert evict(limit=0, keep=c) == []  # `a` was used a moment ago: perhaps being opened
    removed = evict(limit=0, keep=c, grace=0)
    assert [e.path for e in removed] == [a] and c.exists()
    assert (cache / "converted" / f".d.tmp-{os.getpid()}").exists()


def test_cache_writes_evict_to_the_limit(tiny, cache, monkeypatch):
    old = _entry(cache, "converted", "old", 100_000, time.time() - 1000)
    folder = tiny("gemma3")
    monkeypatch.setenv("GEMMAKIT_CACHE_MAX_BYTES", "1000")
    L.load(str(folder), "float32", "cpu", quantize="int8")
    (entry,) = cache_entries()  # the new entry stays although over the limit: it is in use
    assert entry.kind == "quantized" and not old.exists()


# --- gemmakit cache ---------------------------------------------------------------------------


def test_cache_command_lists_and_clears(cache, capsys, monkeypatch):
    now = time.time()
    a = _entry(cache, "converted", "gguf-a", 3000, now - 7200)
    (a / "cache-source.json").write_text(json.dumps({"source": "/models/m.gguf"}))
    b = _entry(cache, "quantized", "int8-b", 2000, now - 60)
    assert cli.main(["cache", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["cache_dir"] == str(cache) and listed["bytes"] == 5000 + len(
        json.dumps({"source": "/models/m.gguf"})
    )
    assert [(e["path"], e["kind"], e["source"]) for e in listed["entries"]] == [
        (str(a), "converted", "/models/m.gguf"),
        (str(b), "quantized", None),
    ]
    assert cli.main(["cache", "list"]) == 0
    text = capsys.readouterr().out
    assert "2 entries" in text and "2 h ago" in text and "/models/m.gguf" in text
    assert cli.main(["cache", "clear", "--kind", "quantized"]) == 0
    assert "removed 1 entry" in capsys.readouterr().out and a.exists() and not b.exists()
    assert cli.main(["cache", "clear"]) == 0
    assert not a.exists() and cache_entries() == []
    monkeypatch.setenv("GEMMAKIT_CACHE_MAX_BYTES", "lots")
    assert cli.main(["cache", "list"]) == 2
    assert "GEMMAKIT_CACHE_MAX_BYTES='lots'" in capsys.readouterr().err


# --- tokenizer.json in HF exports -------------------------------------------------------------

TEXTS = [
    "The orchard  produced\n\nmore fruit than she could sell.",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "   runs   of\t\tspaces, tabs\n\n\nand newlines   ",
    "héllo wörld: 日本語, emoji 🍎, ligature ﬁ, nbsp\u00a0here",
    "digits 1234567 and symbols #$%^&*",
    " a leading space",
]


@functools.cache
def byte_fallback_sentencepiece() -> bytes:
    """A 400-piece SentencePiece BPE model with byte fallback (as Gemma's): non-ASCII text
    becomes <0xXX> pieces, so the tokenizer.json must fall back the same way."""
    import sentencepiece as spm

    from gemmakit.evaluation.verify import DEFAULT_TEXT

    lines = [line for line in DEFAULT_TEXT.read_text().splitlines() if line.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=400, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", control_symbols=["<start_of_turn>", "<end_of_turn>"],
        user_defined_symbols=["\u2581\u2581", "\n", "\n\n", "\t"], add_dummy_prefix=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, byte_fallback=True, split_digits=True, minloglevel=2,
    )  # fmt: skip
    return buf.getvalue()


@pytest.fixture
def exported(hf_folder, tmp_path):
    """(gemmakit's tokenizer, an HF export of a model whose source has only tokenizer.model)."""
    folder, _ = hf_folder("gemma3", vocab_size=400)
    (folder / "tokenizer.model").write_bytes(byte_fallback_sentencepiece())
    out = tmp_path / "hf"
    result = export(model=str(folder), to="hf", output=out, qtype="f32", progress=False)
    assert {"tokenizer.model", "tokenizer.json"} <= set(result["files"])
    return L.load(str(folder), "float32", "cpu").tokenizer, out


def test_hf_export_tokenizer_json_tokenizes_as_gemmakit(exported):
    import tokenizers
    import transformers

    ours, out = exported
    tj = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert any(ours.pieces[i].startswith("<0x") for i in ours.encode(TEXTS[3]))  # bytes were used
    for text in TEXTS:
        ids = ours.encode(text)
        assert tj.encode(text).ids == ids, text
        assert fast(text)["input_ids"] == ids, text
        assert tj.decode(ids[1:], skip_special_tokens=False) == text, text


NO_PROTOBUF = """
import json, sys
sys.modules["google.protobuf"] = None  # as if protobuf were not installed
import transformers
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
print(json.dumps([tok(t)["input_ids"] for t in json.loads(sys.argv[2])]))
"""


def test_hf_export_loads_in_transformers_without_protobuf(exported):
    """AutoTokenizer reads the export with protobuf unimportable; without tokenizer.json it
    cannot (which shows the simulation takes protobuf away)."""
    ours, out = exported

    def auto_tokenizer(folder):
        return subprocess.run(
            [sys.executable, "-c", NO_PROTOBUF, str(folder), json.dumps(TEXTS)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    done = auto_tokenizer(out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [ours.encode(t) for t in TEXTS]
    (out / "tokenizer.json").unlink()
    failed = auto_tokenizer(out)  # transformers' message is about tiktoken (issue 19, item 13)
    assert failed.returncode != 0 and ("tiktoken" in failed.stderr or "protobuf" in failed.stderr)


def test_hf_export_copies_the_source_tokenizer_json(hf_folder, tmp_path):
    folder, _ = hf_folder("gemma3", vocab_size=400)
    (folder / "tokenizer.model").write_bytes(byte_fallback_sentencepiece())
    source_json = b'{"copied": "verbatim"}'
    (folder / "tokenizer.json").write_bytes(source_json)
    out = tmp_path / "hf"
    export(loaded=L.load(str(folder), "float32", "cpu"), to="hf", output=out, qtype="f32", progress=False)
    assert (out / "tokenizer.json").read_bytes() == source_json


def test_gemma_vocabulary_tokenizer_json_tokenizes_as_gemmakit(bundled):
    """Gemma 3's own 262k-piece vocabulary (byte fallback, whitespace-run pieces, control tokens)."""
    import tokenizers

    from gemmakit.formats.hf_folder import sentencepiece_tokenizer_json

    ours = bundled.tokenizer
    tj = tokenizers.Tokenizer.from_str(sentencepiece_tokenizer_json(ours).decode())
    for text in TEXTS + ["def f(x):\n    return x ** 2  # 平方", "\x00\x07 control bytes \u200b"]:
        assert tj.encode(text).ids == ours.encode(text), text


def test_kernel_cache_is_its_own_variable_or_the_caches_kernels(tmp_path, monkeypatch):
    from gemmakit.paths import cache_dir, kernel_cache_dir

    monkeypatch.setenv("GEMMAKIT_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv("GEMMAKIT_KERNEL_CACHE", raising=False)
    assert kernel_cache_dir() == cache_dir() / "kernels" == tmp_path / "c" / "kernels"
    monkeypatch.setenv("GEMMAKIT_KERNEL_CACHE", str(tmp_path / "k"))
    assert kernel_cache_dir() == tmp_path / "k"


def test_the_suite_never_uses_the_users_cache():
    """tests/conftest.py gives the session a cache of its own (and subprocesses inherit it)."""
    import os
    from pathlib import Path

    from gemmakit.loading import default_gguf
    from gemmakit.paths import cache_dir, kernel_cache_dir

    users = Path(os.path.expanduser("~/.cache")) / "gemmakit"
    for folder in (cache_dir(), kernel_cache_dir(), default_gguf().parent):
        assert users.resolve() not in (folder.resolve(), *folder.resolve().parents)
    assert default_gguf().parent == cache_dir()
