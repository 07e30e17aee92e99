"""Shared fixtures: tiny random Gemma models paired with transformers' reference."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

FAMILIES = ("gemma", "gemma2", "gemma3")

# --- gemmakit's cache during a test session -----------------------------------------------
# No test reads or writes the user's cache (~/.cache/gemmakit): the session gets an empty one
# of its own ($GEMMAKIT_CACHE, which subprocesses inherit), removed at the end, where the
# bundled model's converted and tokenizer caches are built once per session. What is slow to
# make and never changes for given inputs lives in pytest's own cache folder
# (.pytest_cache/d/gemmakit/) across sessions: the compiled kernels (~30 s a build,
# $GEMMAKIT_KERNEL_CACHE) and the bundled GGUF assembled from its package (241 MB, linked
# into each session's cache).
_SESSION_ENV = ("GEMMAKIT_CACHE", "GEMMAKIT_KERNEL_CACHE")


def pytest_configure(config):
    config._gemmakit_env = {k: os.environ.get(k) for k in _SESSION_ENV}
    cache = getattr(config, "cache", None)  # None under -p no:cacheprovider
    lasting = Path(cache.mkdir("gemmakit")) if cache is not None else None
    session = Path(tempfile.mkdtemp(prefix="gemmakit-test-cache-"))
    config._gemmakit_session_cache = session
    os.environ["GEMMAKIT_KERNEL_CACHE"] = str((lasting or session) / "kernels")
    if lasting is not None:
        _link_bundled_gguf(lasting, session)
    os.environ["GEMMAKIT_CACHE"] = str(session)


def _link_bundled_gguf(lasting: Path, session: Path):
    """Assembles the bundled GGUF into `lasting` once (`loading.default_gguf`) and links it
    into the session's cache with its stamp, so `default_gguf()` finds it there."""
    from gemmakit.errors import GemmakitError
    from gemmakit.loading import default_gguf

    os.environ["GEMMAKIT_CACHE"] = str(lasting)
    try:
        built = default_gguf()
    except GemmakitError:  # the bundle package is missing: the tests that need it say so
        return
    stamp = built.with_suffix(".gguf.ok")
    (session / built.name).symlink_to(built)
    shutil.copyfile(stamp, session / stamp.name)


def pytest_unconfigure(config):
    session = getattr(config, "_gemmakit_session_cache", None)
    if session is None:
        return
    shutil.rmtree(session, ignore_errors=True)
    for key, value in config._gemmakit_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests: tiny models run fastest that way (and do not
    fight other tests for the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_fresh_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`code` run by a new interpreter (what a module imports is only visible in a fresh
    process); fails the test with the end of its stderr unless it exits 0."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def save_random_adapter(base, folder, seed: int, scale: float, **lora_options) -> None:
    """Writes a PEFT adapter of `base` (left untouched) to `folder` whose LoRA factors are all
    random, N(0, scale^2), so that it changes every output (a fresh adapter's B is zero)."""
    import copy

    from gemmakit import lora

    model = copy.deepcopy(base)
    lora.apply_lora(model, dropout=0.0, **lora_options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    lora.save_adapter(model, folder)


def tiny_hf_config(family: str, **overrides):
    """A 2-layer, 64-wide model with 4 query heads, 1 KV head and a window of 4."""
    import transformers

    common = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    common.update({k: overrides.pop(k) for k in list(overrides) if k in common})
    if family == "gemma":
        cfg = transformers.GemmaConfig(**common, **overrides)
    elif family == "gemma2":
        cfg = transformers.Gemma2Config(
            **common, sliding_window=4, query_pre_attn_scalar=24,
            attn_logit_softcapping=5.0, final_logit_softcapping=3.0, **overrides,
        )  # fmt: skip
    else:
        cfg = transformers.Gemma3TextConfig(
            **common, sliding_window=4, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention"], **overrides,
        )  # fmt: skip
    cfg._attn_implementation = "eager"
    return cfg


def random_hf_model(family: str, seed: int = 0, **overrides):
    """A transformers model with every weight random, norms included (so 1 + w matters)."""
    import transformers

    cfg = tiny_hf_config(family, **overrides)
    torch.manual_seed(seed)
    cls = {
        "gemma": transformers.GemmaForCausalLM,
        "gemma2": transformers.Gemma2ForCausalLM,
        "gemma3": transformers.Gemma3ForCausalLM,
    }[family]
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.5 if "norm" in name else 0.08)
    return model


@pytest.fixture
def hf_folder(tmp_path):
    """Saves a random HF model of a family to a folder; returns (folder, hf_model)."""

    def make(family: str, **overrides):
        model = random_hf_model(family, **overrides)
        folder = tmp_path / family
        model.save_pretrained(folder)
        return folder, model

    return make


@pytest.fixture
def tiny(hf_folder):
    """A tiny random model folder of a family, with a SentencePiece tokenizer.model."""
    from tests.test_export import tiny_sentencepiece

    def make(family: str):
        folder, _ = hf_folder(family)
        (folder / "tokenizer.model").write_bytes(tiny_sentencepiece())
        return folder

    return make


# --- the bundled Gemma 3 270M and transformers' reading of the same file -----------------


@pytest.fixture(scope="session")
def bundled():
    """gemmakit's load of the default model, float32 on CPU."""
    from gemmakit.loading import load

    return load(dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def hf_bundled(request):
    """transformers' own GGUF loader on the bundled file: (model, tokenizer).

    transformers takes ~30 s to dequantize the GGUF and ~14 s to build the tokenizer, so
    the result is kept in pytest's cache and reused by later runs.
    """
    import transformers
    from safetensors.torch import load_file, save_file

    from gemmakit.loading import default_gguf

    folder = request.config.cache.mkdir("hf_gemma3_270m")
    weights, tok_dir = folder / "model.safetensors", folder / "tokenizer"
    if not weights.exists() or not (tok_dir / "tokenizer.json").exists():
        gguf = default_gguf()
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok.save_pretrained(tok_dir)
        model.config.to_json_file(folder / "config.json")
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(weights))
    config = transformers.AutoConfig.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(load_file(str(weights)), strict=False)
    model.tie_weights()
    model.eval()
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    return model, tok
