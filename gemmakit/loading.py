"""Finding and loading a model: a folder, a GGUF file, a preset name, or the bundled default.

`resolve()` turns what the user typed into a `ModelSource`; `load_model()` builds the
`Gemma` module from it; `load()` returns model and tokenizer together.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gemmakit.config import GemmaConfig
from gemmakit.errors import GemmakitError, ModelFileError
from gemmakit.files import atomic_folder, content_key
from gemmakit.formats import safetensors
from gemmakit.formats.gptq_folder import gptq_config, read_quantization_config
from gemmakit.formats.tokenizer import Tokenizer, generation_stop_ids, gguf_tokenizer
from gemmakit.hf_config import load_hf_assistant_config, load_hf_config, to_hf_config
from gemmakit.memory import release_freed_memory
from gemmakit.model.families import build_empty
from gemmakit.model.gemma import Gemma
from gemmakit.model_source import DEFAULT_MODEL, DEFAULT_PACKAGE, ModelSource, default_gguf, resolve  # noqa: F401 (the API)
from gemmakit.paths import SOURCE_FILE, cache_dir, evict, mark_used

log = logging.getLogger(__name__)


def parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
    if dtype not in table:
        raise GemmakitError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return table[dtype]


def check_dtype(config: GemmaConfig, dtype: torch.dtype) -> list[str]:
    """Refuses float16 where it overflows; returns warnings for the caller to show."""
    if dtype != torch.float16:
        return []
    if config.use_post_norms:
        raise GemmakitError(
            "float16 is refused for Gemma 2/3: they were trained in bfloat16 and their "
            "activations exceed float16's range (65504), giving inf/NaN; use bfloat16 or float32"
        )
    return ["float16 with Gemma 1 can overflow on long inputs; bfloat16 is safer"]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    source: ModelSource, dtype: torch.dtype = torch.float32, device: str = "cpu", gguf_file=None
) -> Gemma:
    """Builds the model and copies the weights in; no random initialization is done."""
    if source.kind == "hf":
        config = load_hf_config(source.path)
        check_dtype(config, dtype)
        files = safetensors.safetensors_files(source.path)
        reader = safetensors.SafetensorsReader(files)  # the headers: which tensors to read
        text, towers = safetensors.split_towers(reader.entries)
        report_skipped_towers(source, reader, towers)
        tensors = safetensors.read_safetensors(files, text if towers else None)
        state = safetensors.hf_to_native(tensors, config)
    else:
        from gemmakit.formats.gguf import GGUFFile, config_from_gguf, state_dict_from_gguf

        g = gguf_file or GGUFFile(source.path)
        config = config_from_gguf(g)
        check_dtype(config, dtype)
        # Dequantized straight into `dtype`, chunk by chunk: no float32 copy of a bf16 model.
        state = state_dict_from_gguf(g, dtype)
    packed = read_quantization_config(source.path) if source.kind == "hf" else None
    model = build_empty(config)
    head = None
    if packed is not None:  # a GPTQ/AWQ folder: its linears hold packed 4-bit tensors
        from gemmakit.quant.gptq_linear import EMBEDDING_KEY, packed_checkpoint_state, swap_in_stored_head

        state, head = packed_checkpoint_state(model, state, packed, dtype, source.path)
        model.quantization["kind"] = packed["quant_method"]  # held in GPTQ's layout either way
    # Cast tensor by tensor, dropping each source as we go: never two full copies at once.
    for key in list(state):
        t = state.pop(key)
        keep = packed is not None and (not t.is_floating_point() or key.endswith(".scales"))
        state[key] = t.to(device=device) if keep else t.to(device=device, dtype=dtype)
    if head is not None:  # its shape for the checks below; the bf16 tensor goes in after
        state[EMBEDDING_KEY] = head.to("meta")
    safetensors.load_into(model, state, str(source.path))
    if head is not None:
        swap_in_stored_head(model, head.to(device))
    return model.eval()


def is_assistant_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder whose config.json is a Gemma 4 assistant's (MTP drafter)."""
    file = Path(path) / "config.json"
    try:
        return json.loads(file.read_text()).get("model_type") == "gemma4_assistant"
    except (OSError, ValueError, AttributeError):
        return False


def load_assistant(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A Gemma 4 MTP drafter (`gemma4_assistant`) from an HF folder (config.json + safetensors)."""
    from gemmakit.model.gemma4_assistant import Gemma4Assistant

    path = Path(path)
    if not path.is_dir():
        raise GemmakitError(f"{path}: an assistant model is a folder with config.json and safetensors")
    config = load_hf_assistant_config(path)
    check_dtype(config.text, dtype)
    tensors = safetensors.read_safetensors(safetensors.safetensors_files(path))
    state = safetensors.assistant_to_native(tensors, config.tie_word_embeddings)
    with torch.device("meta"):
        model = Gemma4Assistant(config)
    for key in list(state):
        t = state.pop(key)
        state[key] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)
    safetensors.load_into(model, state, str(path))
    return model.eval()


def native_gguf_tensors(g, config: GemmaConfig) -> dict[str, str]:
    """HF name -> GGUF name of the matrices a GGUF keeps in its own block types: the seven
    projections of each block, the embedding and the output matrix, where the C kernels run
    their type and width (`ops.gguf_supported`). Float tensors (norms, F16/BF16 matrices) and
    types without a kernel are dequantized as before."""
    from gemmakit import ops
    from gemmakit.config import PROJECTIONS
    from gemmakit.formats.gguf import FLOAT_TYPES, gguf_to_hf_name

    out = {}
    for name, info in g.tensors.items():
        hf = gguf_to_hf_name(name)
        if hf is None or info.ggml_type in FLOAT_TYPES or len(info.shape) != 2:
            continue
        parts = hf.split(".")  # model.layers.3.self_attn.q_proj.weight
        matrix = hf in ("model.embed_tokens.weight", "lm_head.weight") or (
            len(parts) == 6
            and parts[1] == "layers"
            and parts[3] in ("self_attn", "mlp")
            and parts[4] in PROJECTIONS
        )
        if matrix and ops.gguf_supported(int(info.ggml_type), info.shape[1]):
            out[hf] = name
    return out


def load_native_gguf(g, source: ModelSource) -> Gemma:
    """A float32 model whose quantized matrices stay in the file's GGUF blocks (`GGUFLinear`,
    zero-copy views of the memory-mapped file): no float copy, no converted-cache entry.

    The tied embedding is a `GGUFEmbedding` over the lm_head's blocks; an untied one owns its
    blocks under `model.embed_tokens_q` (gemmakit's convention for quantized embeddings).
    """
    from gemmakit.formats.gguf import config_from_gguf, state_dict_from_gguf
    from gemmakit.quant.gguf_blocks import GGUFEmbedding, GGUFLinear

    config = config_from_gguf(g)
    model = build_empty(config)
    # Only matrices the model has: the K/V of Gemma 3n/4's KV-shared layers stay unread.
    expected = model.state_dict().keys()
    native = {k: v for k, v in native_gguf_tensors(g, config).items() if k in expected}
    state = state_dict_from_gguf(g, torch.float32, config, skip=set(native.values()))
    shapes = {k: tuple(t.shape) for k, t in state.items()} | {
        k: g.tensors[v].shape for k, v in native.items()
    }
    safetensors.check_shapes(model, shapes, str(source.path))
    model.load_state_dict(state, strict=False, assign=True)

    def linear(hf_name: str) -> GGUFLinear:
        info = g.tensors[native[hf_name]]
        return GGUFLinear(g.blocks(info.name), int(info.ggml_type), info.shape[1])

    embed = model.model.embed_tokens
    for hf_name in native:
        module_path = hf_name.removesuffix(".weight")
        if hf_name.startswith("model.layers."):
            parent, _, leaf = module_path.rpartition(".")
            setattr(model.get_submodule(parent), leaf, linear(hf_name))
    if "model.embed_tokens.weight" in native:
        table = linear("model.embed_tokens.weight")
        if config.tie_word_embeddings:
            model.lm_head = table
        else:
            model.model.add_module("embed_tokens_q", table)
        model.model.embed_tokens = GGUFEmbedding(table, embed.padding_idx)
    elif config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if "lm_head.weight" in native:
        model.lm_head = linear("lm_head.weight")
    still = [name for name, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if still:
        raise ModelFileError(f"{source.path}: no weights were read for {', '.join(still[:3])}")
    return model.eval()


def report_skipped_towers(source: ModelSource, reader: safetensors.SafetensorsReader, names: list[str]):
    """One line on stderr (the `gemmakit.loading` logger) when a multimodal checkpoint's
    vision/audio weights are left out: gemmakit runs its text model only."""
    if names:
        size = sum(reader.nbytes(n) for n in names)
        log.warning(
            f"{source.path}: skipped {len(names)} vision/audio tower tensors ({size / 2**20:.1f} MiB); "
            "gemmakit runs the text model only"
        )


class _LazyRows:
    """A weight read from disk in row chunks when the quantizer asks (`gemmakit.quant.integer.row_chunks`)."""

    def __init__(self, reader: safetensors.SafetensorsReader, name: str, dtype: torch.dtype):
        self.reader, self.name, self.dtype = reader, name, dtype
        self.shape, self.device = reader.shape(name), torch.device("cpu")

    def rows(self, start: int, stop: int) -> torch.Tensor:
        release_freed_memory()
        return self.reader.rows(self.name, start, stop, self.dtype)


def load_quantized_model(
    source: ModelSource, dtype: torch.dtype, quantize: dict, progress: bool = False
) -> Gemma:
    """Builds a quantized model from an HF folder on the CPU, never holding its float weights.

    Each linear weight is read, quantized and dropped in turn, and the embedding is read in
    row chunks, so peak memory is the quantized model plus one chunk (Gemma 3 270M int8:
    ~0.6 GB peak RSS against 2.8 GB for loading float32 and quantizing after).
    """
    from gemmakit.quant import quantize_model

    config = load_hf_config(source.path)
    check_dtype(config, dtype)
    reader = safetensors.SafetensorsReader(safetensors.safetensors_files(source.path))
    report_skipped_towers(source, reader, safetensors.split_towers(reader.entries)[1])
    hf_name = safetensors.hf_to_native({k: k for k in reader.entries}, config)  # native -> HF
    model = build_empty(config)
    safetensors.check_shapes(model, {k: reader.shape(v) for k, v in hf_name.items()}, str(source.path))

    def read(name):
        # Each read frees the previous tensor's float copy; glibc keeps such freed blocks in
        # its heap (its mmap threshold grows as large blocks are freed), so without a trim
        # the resident set climbs ~400 MB above what is live (measured on the bundled int8).
        release_freed_memory()
        return reader.tensor(name, dtype)

    matrices = ("model.embed_tokens.weight", "lm_head.weight")  # the big ones go by rows
    sources = {
        k: (lambda v=v: _LazyRows(reader, v, dtype)) if k in matrices else (lambda v=v: read(v))
        for k, v in hf_name.items()
    }
    quantize_model(model, progress=progress, sources=sources, **quantize)
    left = {name for name, t in model.state_dict(keep_vars=True).items() if t.is_meta}
    model.load_state_dict(
        {k: reader.tensor(hf_name[k], dtype) for k in left & set(hf_name)}, strict=False, assign=True
    )
    if config.tie_word_embeddings and not hasattr(model.lm_head, "kind"):
        model.lm_head.weight = model.model.embed_tokens.weight
    still = [name for name, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if still:  # a module this loader does not know how to fill
        raise ModelFileError(f"{source.path}: no weights were read for {', '.join(still[:3])}")
    return model.eval()


def load_tokenizer(source: ModelSource, gguf_file=None) -> Tokenizer:
    if source.kind == "hf":
        return Tokenizer.from_folder(source.path)
    from gemmakit.formats.gguf import GGUFFile

    g = gguf_file or GGUFFile(source.path)
    return Tokenizer.from_gguf_metadata(g.metadata, str(source.path))


@dataclass
class Loaded:
    """A model ready to run: module, tokenizer, where it came from and its stop ids."""

    model: Gemma
    tokenizer: Tokenizer
    source: ModelSource
    stop_ids: tuple[int, ...]
    load_seconds: float

    @property
    def config(self) -> GemmaConfig:
        return self.model.config


def load(
    model: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    quantize: str | dict | None = None,
    progress: bool = False,
    keep_blocks: bool = True,
) -> Loaded:
    """Loads model and tokenizer: `model` is a folder, a .gguf file, or None (the default).

    `quantize` is a kind ("nf4", "int8", "int4") or `gemmakit.quant.apply.quantize_model`'s keyword
    arguments as a dict; on the CPU the weights are then quantized as they are read.

    A quantized GGUF loaded on the CPU with dtype "auto" (or None) keeps its matrices in the
    file's own block types (`load_native_gguf`), unless `quantize` is given or `keep_blocks`
    is False (a caller that will quantize the model itself); a named dtype dequantizes.
    """
    start = time.perf_counter()
    freeze_startup_objects()
    device = device or default_device()
    torch_dtype = parse_dtype(dtype, device)
    source = resolve(model)
    if isinstance(quantize, str):
        quantize = {"kind": quantize}
    if keep_blocks and not quantize and dtype in (None, "auto") and device == "cpu" and source.kind == "gguf":
        native = _load_native(source, start)
        if native is not None:
            return native
    weights = source
    gguf_file = None
    if source.kind == "gguf":
        converted = converted_folder(source)
        if converted is not None:
            _drop_if_damaged(converted)
        if converted is not None and not (converted / READY).exists() and quantize and device == "cpu":
            load(source.path, "float32", "cpu")  # writes the converted folder streamed from below
        if converted is not None and (converted / READY).exists():
            mark_used(converted)
            weights = ModelSource("hf", converted, source.name)
        else:
            from gemmakit.formats.gguf import GGUFFile

            gguf_file = GGUFFile(source.path)
            if "tokenizer.ggml.tokens" not in gguf_file.metadata:
                # Checked before the weights are read, so the error comes at once.
                raise ModelFileError(
                    f"{source.path}: no tokenizer in the file (tokenizer.ggml.tokens missing)"
                )
    if quantize and quantize.get("kind") in ("gptq", "awq"):
        net = _load_gptq(weights, torch_dtype, device, quantize, gguf_file, progress)
    elif quantize and device == "cpu" and weights.kind == "hf":
        folder = quantized_folder(weights, torch_dtype, quantize)
        net = _read_quantized(folder, torch_dtype, quantize) if folder is not None else None
        if net is None:
            net = load_quantized_model(weights, torch_dtype, quantize, progress)
            if folder is not None:
                # An entry there could not be read (damaged): it would shadow the new one.
                shutil.rmtree(folder, ignore_errors=True)
                _write_quantized(folder, net, source.path)
    else:
        net = load_model(weights, torch_dtype, device, gguf_file)
        if quantize:
            from gemmakit.quant import quantize_model

            quantize_model(net, progress=progress, **quantize)
    tokenizer = load_tokenizer(weights, gguf_file)
    # Only a float32 load holds the exact dequantized values worth caching.
    if gguf_file is not None and torch_dtype == torch.float32 and converted_folder(source) is not None:
        if not quantize:
            _write_converted(converted_folder(source), net, tokenizer, source.path)
    if tokenizer.vocab_size > net.config.vocab_size:
        raise ModelFileError(
            f"{source.path}: tokenizer has {tokenizer.vocab_size} tokens, model only {net.config.vocab_size}"
        )
    stop_ids = generation_stop_ids(tokenizer, read_generation_config(source), net.config.eos_token_ids)
    return Loaded(net, tokenizer, source, stop_ids, time.perf_counter() - start)


@functools.cache
def freeze_startup_objects():
    """Moves the objects alive at the first load (torch's ~170k import-time objects, which
    live as long as the process) out of the garbage collector's sight (`gc.freeze`). Every
    full collection scanned them: 0.08-0.19 s each (measured; one landed in every load of the
    bundled model, as building the modules allocates), ~6 ms after the freeze. Once per
    process: a later call would also pin the garbage of earlier loads."""
    gc.freeze()


def _load_native(source: ModelSource, start: float) -> Loaded | None:
    """`load` of a GGUF in its own block types, or None when no matrix of it has a kernel
    (a float GGUF, a type without one, no C compiler): the caller dequantizes as before."""
    from gemmakit.formats.gguf import GGUFFile, config_from_gguf

    g = GGUFFile(source.path)
    if "tokenizer.ggml.tokens" not in g.metadata:
        raise ModelFileError(f"{source.path}: no tokenizer in the file (tokenizer.ggml.tokens missing)")
    if not native_gguf_tensors(g, config_from_gguf(g)):
        return None
    net = load_native_gguf(g, source)
    tokenizer, stop_ids = gguf_tokenizer(
        g.metadata, str(source.path), net.config.vocab_size, net.config.eos_token_ids
    )
    return Loaded(net, tokenizer, source, stop_ids, time.perf_counter() - start)


# --- the converted-GGUF cache ------------------------------------------------------------------
# Dequantizing a GGUF takes seconds (measured: 4.6 s for the bundled 270M), so the first load writes the
# dequantized float32 weights, config, SentencePiece model and chat template into the cache as an HF
# folder; later loads memory-map it (milliseconds). Large models are not cached: their float32
# copy would be tens of GB. Entries are keyed by the file's content (`files.content_key`), so a
# `touch` or a copy finds the same entry, and bounded with LRU eviction (`paths.evict`).
CACHE_VERSION = 3
CACHE_MAX_BYTES = 4 * 2**30
READY = ".complete"


def converted_folder(source: ModelSource) -> Path | None:
    if os.environ.get("GEMMAKIT_NO_CACHE"):
        return None
    key = f"{content_key(source.path)}|v{CACHE_VERSION}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return cache_dir() / "converted" / f"gguf-{digest}"


def _drop_if_damaged(folder: Path):
    """Removes a converted entry whose config or weights cannot be read (a disk fault, a
    copy cut short): its content key is stable, so it would fail every later load."""
    if not (folder / READY).exists():
        return
    try:
        load_hf_config(folder)
        safetensors.SafetensorsReader([folder / "model.safetensors"])
    except (OSError, ValueError, GemmakitError):
        shutil.rmtree(folder, ignore_errors=True)


def _write_converted(folder: Path, model: Gemma, tokenizer: Tokenizer, source: Path | None = None):
    """Writes the HF folder atomically (`atomic_folder`), then evicts what no longer fits;
    best effort: a read-only or full cache only costs speed, so a failed write is dropped."""
    state = safetensors.native_to_hf(model.state_dict(), model.config)
    if sum(t.numel() for t in state.values()) * 4 > CACHE_MAX_BYTES or not hasattr(
        tokenizer.backend, "serialized_model_proto"
    ):
        return
    try:
        with atomic_folder(folder) as tmp:
            (tmp / "config.json").write_text(json.dumps(to_hf_config(model.config), indent=2))
            (tmp / "tokenizer.model").write_bytes(tokenizer.backend.serialized_model_proto())
            if tokenizer.chat_template is not None:  # the GGUF's own template travels with the cache
                _write_chat_template(tmp, tokenizer.chat_template)
            safetensors.save_safetensors({k: v.float() for k, v in state.items()}, tmp / "model.safetensors")
            if source is not None:
                (tmp / SOURCE_FILE).write_text(json.dumps({"source": str(Path(source).resolve())}))
            (tmp / READY).write_text("")
    except OSError:
        return
    evict(keep=folder)


def _write_chat_template(folder: Path, template):
    from gemmakit.formats.chat_template import folder_files

    for name, text in folder_files(template).items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(template.special_tokens, indent=2))


def read_generation_config(source: ModelSource) -> dict:
    if source.kind != "hf":
        return {}
    f = source.path / "generation_config.json"
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{f}: not valid JSON ({e})") from None


# --- the quantized cache ---------------------------------------------------------------------
# Quantizing on load costs seconds (measured, int8 270M: 2.7 s, mostly elementwise passes over the
# float32 weights), so the quantized tensors are kept too: a later load of the same model,
# dtype and quantization reads them back (0.3 s). The key includes torch's version and the
# int4 kernel's packed layout, which can differ between builds and CPUs.


def quantized_folder(weights: ModelSource, dtype: torch.dtype, quantize: dict) -> Path | None:
    from gemmakit.quant import tinygemm_layout

    if os.environ.get("GEMMAKIT_NO_CACHE"):
        return None
    stamps = [content_key(f) for f in safetensors.safetensors_files(weights.path)]
    key = json.dumps(
        [stamps, str(dtype), quantize, torch.__version__, tinygemm_layout(), CACHE_VERSION], sort_keys=True
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return cache_dir() / "quantized" / f"{quantize['kind']}-{digest}"


def _quantized_state(model: Gemma) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_word_embeddings and not hasattr(model.lm_head, "kind"):
        state.pop("lm_head.weight")  # the float embedding, stored once
    return state


def _read_quantized(folder: Path, dtype: torch.dtype, quantize: dict) -> Gemma | None:
    """The cached quantized model, or None when there is none (or it does not fit)."""
    from gemmakit.quant import quantize_model

    if not (folder / READY).exists():
        return None
    mark_used(folder)
    try:
        config = load_hf_config(folder)
        reader = safetensors.SafetensorsReader([folder / "model.safetensors"])
        with torch.device("meta"):  # the same modules, shapes and dtypes, without the work
            model = quantize_model(build_empty(config).to(dtype), **quantize)
        expected = {k: (tuple(t.shape), t.dtype) for k, t in _quantized_state(model).items()}
        found = {k: (reader.shape(k), reader.entries[k][1]) for k in reader.entries}
        if found != expected:
            return None
        model.load_state_dict({k: reader.tensor(k) for k in found}, strict=False, assign=True)
    except (OSError, ValueError, GemmakitError):
        return None  # an unreadable entry only costs speed: it is rebuilt
    if config.tie_word_embeddings and not hasattr(model.lm_head, "kind"):
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _write_quantized(folder: Path, model: Gemma, source: Path | None = None):
    """Writes the quantized tensors atomically (`atomic_folder`); best effort, as the
    converted cache."""
    state = _quantized_state(model)
    if sum(t.nbytes for t in state.values()) > CACHE_MAX_BYTES:
        return
    try:
        with atomic_folder(folder) as tmp:
            (tmp / "config.json").write_text(json.dumps(to_hf_config(model.config), indent=2))
            safetensors.save_safetensors(state, tmp / "model.safetensors")
            if source is not None:
                (tmp / SOURCE_FILE).write_text(json.dumps({"source": str(Path(source).resolve())}))
            (tmp / READY).write_text("")
    except OSError:
        return
    evict(keep=folder)


# --- GPTQ on load ----------------------------------------------------------------------------
# GPTQ calibrates on a text (seconds to minutes), so its result is cached as a GPTQ folder
# (config.json with quantization_config + model.safetensors) that `load_model` reads back.


def _load_gptq(weights: ModelSource, dtype, device, quantize: dict, gguf_file, progress: bool) -> Gemma:
    """The model with GPTQ- or AWQ-calibrated 4-bit block linears (`quantize["kind"]`),
    calibrated on `quantize["calibration"]` (a text file; default the shipped wiki text and guanaco sample,
    disjoint from the evaluation text). Both are held in GPTQ's layout, and cached so."""
    from gemmakit.quant.awq import awq_quantize_model
    from gemmakit.quant.gptq import (
        REVISION,
        calibration_windows,
        default_calibration_text,
        gptq_quantize_model,
    )
    from gemmakit.quant.gptq_linear import keep_head_in_bf16

    calibration = quantize.get("calibration")
    try:
        text = Path(calibration).read_text(encoding="utf-8") if calibration else default_calibration_text()
    except OSError as e:
        raise GemmakitError(f"{calibration}: {e.strerror or e}") from None
    group_size, desc_act = quantize.get("group_size", 128), bool(quantize.get("desc_act", True))
    method = quantize["kind"]
    key = {"kind": method, "group_size": group_size, "desc_act": desc_act, "revision": REVISION,
           "calibration": hashlib.sha1(text.encode()).hexdigest()}  # fmt: skip
    folder = quantized_folder(weights, dtype, key) if weights.kind == "hf" and device == "cpu" else None
    if folder is not None and (folder / READY).exists():
        try:
            mark_used(folder)
            return load_model(ModelSource("hf", folder, weights.name), dtype, device)
        except (OSError, ValueError, GemmakitError):
            shutil.rmtree(folder, ignore_errors=True)  # damaged: rebuilt below
    net = load_model(weights, dtype, device, gguf_file)
    tokenizer = load_tokenizer(weights, gguf_file)
    windows = calibration_windows(tokenizer.encode(text, add_bos=False), tokenizer.bos_id)
    windows = [w.to(device) for w in windows]
    if method == "awq":
        awq_quantize_model(net, windows, group_size, progress)
    else:
        gptq_quantize_model(net, windows, group_size, desc_act, progress)
    keep_head_in_bf16(net)  # as a written folder holds it
    if folder is not None:
        _write_gptq_cache(folder, net, method, group_size, desc_act)
    return net


def _write_gptq_cache(folder: Path, model: Gemma, method: str, group_size: int, desc_act: bool):
    """Best effort, as the other caches; AWQ in its own layout, so it loads as AWQ again."""
    from gemmakit.formats.gptq_folder import awq_config
    from gemmakit.quant.gptq import GPTQSettings
    from gemmakit.quant.gptq_linear import stored_head_as_embedding
    from gemmakit.quant.packed4 import gptq_state_to_awq

    state = stored_head_as_embedding(model, _quantized_state(model))
    if method == "awq":
        state, qconfig = gptq_state_to_awq(state), awq_config(group_size)
    else:
        qconfig = gptq_config(group_size, desc_act, settings=GPTQSettings(group_size, desc_act))
    config = to_hf_config(model.config) | {"quantization_config": qconfig}
    try:
        with atomic_folder(folder) as tmp:
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            safetensors.save_safetensors(
                safetensors.native_to_hf(state, model.config), tmp / "model.safetensors"
            )
            (tmp / READY).write_text("")
    except OSError:
        return
    evict(keep=folder)
