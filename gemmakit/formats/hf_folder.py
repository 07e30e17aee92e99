"""Writing a Hugging Face model folder that transformers loads to the same logits.

The one writer of HF folders: `gemmakit export --to hf` and `gemmakit merge` (through
`gemmakit.export.export_hf`) and full fine-tuning's final model (`save_hf_folder`) all come here.

config.json comes from `hf_config.to_hf_config`, the weights from
`formats.safetensors.native_to_hf` as safetensors (sharded above `max_shard_bytes`, with an
index, as `save_pretrained` does), and the tokenizer either copied from a source folder or
rebuilt from gemmakit's tokenizer: `tokenizer.model` (the SentencePiece model proto a GGUF's
tokenizer was built from) or `tokenizer.json` (a `tokenizers` tokenizer), with
tokenizer_config.json beside it. A SentencePiece tokenizer also gets a `tokenizer.json` built
from its pieces (`sentencepiece_tokenizer_json`), as Google's repositories ship one: without
it, transformers can only read `tokenizer.model` through protobuf. The model's own chat template goes into chat_template.jinja, as
transformers' `save_pretrained` writes it; a model without one gets Gemma's format inside
tokenizer_config.json.

The folder is assembled under a temporary name next to the target. A new folder is then
renamed into place in one step; into an existing one the files move one by one, config.json
last, so an interrupted write never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from gemmakit.config import GemmaConfig
from gemmakit.errors import GemmakitError
from gemmakit.files import atomic_folder
from gemmakit.formats.safetensors import native_to_hf, save_safetensors
from gemmakit.hf_config import to_hf_config

HF_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Files describing the tokenizer that a source folder may hold; copied verbatim.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")  # fmt: skip
# Files a previous export may have left that must not survive a new one.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


# --- the tokenizer ----------------------------------------------------------------------------


def tokenizer_config(tokenizer, chat_template: str | None, max_length: int) -> dict:
    """tokenizer_config.json for gemmakit's tokenizer: Gemma's special tokens and, unless None
    (it is then written to chat_template.jinja), the chat template."""
    special = {
        "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
    }  # fmt: skip
    present = {k: v for k, v in special.items() if tokenizer.token_id(v) is not None}
    extra = [p for p in ("<start_of_turn>", "<end_of_turn>") if tokenizer.token_id(p) is not None]
    return {
        "tokenizer_class": "GemmaTokenizer",
        **present,
        "add_bos_token": True,
        "add_eos_token": False,
        "padding_side": "left",
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "extra_special_tokens": extra,
        **({} if chat_template is None else {"chat_template": chat_template}),
    }


def tokenizer_files(tokenizer, chat_template: str | None, max_length: int) -> dict[str, bytes]:
    """The tokenizer files rebuilt from gemmakit's `Tokenizer`: tokenizer.model (SentencePiece,
    e.g. from a GGUF) or tokenizer.json (a `tokenizers` tokenizer), with its configs."""
    backend = tokenizer.backend
    if hasattr(backend, "serialized_model_proto"):
        model_file = {"tokenizer.model": backend.serialized_model_proto()}
    elif hasattr(backend, "to_str"):
        model_file = {"tokenizer.json": backend.to_str().encode()}
    else:
        raise GemmakitError(
            "the tokenizer is neither SentencePiece nor a tokenizers.Tokenizer; cannot save it"
        )
    config = tokenizer_config(tokenizer, chat_template, max_length)
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in config}
    special_map = {**special, "additional_special_tokens": config["extra_special_tokens"]}
    return {
        **model_file,
        "tokenizer_config.json": _json(config),
        "special_tokens_map.json": _json(special_map),
    }


def write_tokenizer(
    folder: Path, tokenizer, source_folder: Path | None, chat_template: str | None, max_length: int
) -> list[str]:
    """Copies the source folder's tokenizer files, or rebuilds them from `tokenizer`; returns
    the names written. A copied tokenizer without a tokenizer_config.json gets one.

    `chat_template` (default: the tokenizer's own) is written to chat_template.jinja unless the
    copied files carry a template already; with neither, Gemma's format goes into a rebuilt
    tokenizer_config.json.
    """
    from gemmakit.formats.gguf_writer import GEMMA_CHAT_TEMPLATE

    copied = []
    if source_folder is not None:
        for name in TOKENIZER_FILES:
            if (source_folder / name).is_file():
                shutil.copyfile(source_folder / name, folder / name)
                copied.append(name)
    if tokenizer is None:
        return copied
    own = getattr(tokenizer, "chat_template", None)
    template = chat_template or (own.text if own is not None else None)
    files = {}
    if copied:
        if "tokenizer_config.json" not in copied:
            config = tokenizer_config(tokenizer, None if template else GEMMA_CHAT_TEMPLATE, max_length)
            files["tokenizer_config.json"] = _json(config)
    else:
        files = tokenizer_files(tokenizer, None if template else GEMMA_CHAT_TEMPLATE, max_length)
    if template and not _carries_template(folder, copied):
        files["chat_template.jinja"] = template.encode()
    if "tokenizer.json" not in copied and "tokenizer.json" not in files:
        if hasattr(tokenizer.backend, "serialized_model_proto"):
            files["tokenizer.json"] = sentencepiece_tokenizer_json(tokenizer)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return copied + list(files)


def sentencepiece_tokenizer_json(tokenizer) -> bytes:
    """tokenizer.json (the `tokenizers` library's format) encoding as gemmakit's SentencePiece
    BPE tokenizer does.

    SentencePiece BPE merges, at each step, the adjacent pair whose joined piece scores highest;
    a `tokenizers` BPE merges the pair of lowest rank. So every way of splitting a normal piece
    into two vocabulary pieces becomes a merge ranked by the joined piece's score. Spaces are
    normalized to "▁" with no pre-tokenizer (Gemma has no dummy prefix and splits nothing), bytes
    fall back to `<0xXX>` pieces, control pieces are special added tokens and user-defined
    pieces (whitespace runs) added tokens matched before BPE, as SentencePiece matches them.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    from gemmakit.formats.tokenizer import CONTROL, NORMAL, UNKNOWN, USER_DEFINED

    sp, pieces, types = tokenizer.backend, tokenizer.pieces, tokenizer.types
    vocab = {p: i for i, p in enumerate(pieces)}
    mergeable = {p for p, t in zip(pieces, types) if t == NORMAL}
    ranked = []
    for i, (piece, kind) in enumerate(zip(pieces, types)):
        if kind != NORMAL or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in mergeable and b in mergeable:
                ranked.append((-sp.get_score(i), i, vocab[a], vocab[b], a, b))
    ranked.sort()
    unk = next((p for p, t in zip(pieces, types) if t == UNKNOWN), None)
    bpe = BPE(
        vocab=vocab, merges=[(a, b) for *_, a, b in ranked], unk_token=unk, fuse_unk=True, byte_fallback=True
    )
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    special = [p for p, t in zip(pieces, types) if t in (CONTROL, UNKNOWN)]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in special])
    user = [p for p, t in zip(pieces, types) if t == USER_DEFINED]
    tok.add_tokens([AddedToken(p, special=False, normalized=True) for p in user])
    bos = tokenizer.pieces[tokenizer.bos_id]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokenizer.bos_id)]
    )
    return tok.to_str(pretty=True).encode()


def _carries_template(folder: Path, copied: list[str]) -> bool:
    """Whether the copied files give transformers' tokenizer a chat template."""
    if "chat_template.jinja" in copied:
        return True
    if "tokenizer_config.json" in copied:
        try:
            return json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template") is not None
        except (json.JSONDecodeError, AttributeError):
            return False
    return False


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


# --- weights and configs ----------------------------------------------------------------------


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += n
    if current:
        shards.append(current)
    return shards


def write_weights(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int, progress: bool):
    """model.safetensors, or model-0000i-of-0000n.safetensors shards with their index."""
    from tqdm import tqdm

    shards = _shards(tensors, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for shard, fname in tqdm(list(zip(shards, names)), desc="writing safetensors", disable=not progress):
        save_safetensors(shard, folder / fname)
        weight_map.update({k: fname for k in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_bytes(_json(index))


def generation_config(config: GemmaConfig, stop_ids: tuple[int, ...] | None) -> dict:
    return {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(stop_ids or config.eos_token_ids),
        "pad_token_id": config.pad_token_id,
    }


def model_config(config: GemmaConfig, dtype: torch.dtype) -> dict:
    """config.json: the HF config of `config`, with the weights' dtype."""
    hf_config = to_hf_config(config)
    hf_config["dtype"] = _DTYPE_NAMES[dtype]
    qpas = hf_config.get("query_pre_attn_scalar")
    if isinstance(qpas, float) and abs(qpas - round(qpas)) < 1e-3:
        # A GGUF stores it as a float32 attention scale (24 reads back as 23.999998);
        # every published value is an integer and transformers requires one.
        hf_config["query_pre_attn_scalar"] = round(qpas)
    return hf_config


# --- the folder -------------------------------------------------------------------------------


def _check_target(folder: Path, force: bool):
    if folder.exists() and not folder.is_dir():
        raise GemmakitError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise GemmakitError(f"{folder} is not empty; pass --force to overwrite its files")


def _move_files(tmp: Path, folder: Path, names: list[str]):
    """Moves the files into an existing folder, config.json last, removing what they replace."""
    stale = [folder / "config.json", *folder.glob("model-*-of-*.safetensors")]
    stale += [folder / n for n in _WEIGHT_FILES if n not in names]
    for f in stale:
        f.unlink(missing_ok=True)
    for name in [n for n in names if n != "config.json"] + ["config.json"]:
        os.replace(tmp / name, folder / name)


def write_hf(
    folder: str | Path,
    state: dict[str, torch.Tensor],
    config: GemmaConfig,
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
    source_folder: Path | None = None,
    chat_template: str | None = None,
    stop_ids: tuple[int, ...] | None = None,
    max_shard_bytes: int = 5 * 2**30,
    force: bool = False,
    progress: bool = True,
    quantization_config: dict | None = None,
) -> dict:
    """Writes config.json, safetensors weights, tokenizer and generation_config.json.

    Args:
        folder: the output folder; must not exist or be empty unless `force`.
        state: the float state dict under gemmakit's names.
        config: the model's config.
        tokenizer: a gemmakit Tokenizer (used when `source_folder` holds no tokenizer files).
        dtype: weight dtype in the safetensors files.
        source_folder: an HF folder whose tokenizer files are copied verbatim.
        chat_template: written to chat_template.jinja (default: the tokenizer's own; with
            neither, Gemma's format goes into a rebuilt tokenizer_config.json).
        stop_ids: generation_config's eos_token_id list (default: the config's).
        max_shard_bytes: shard size limit of the safetensors files.
        force: replace the files of an existing, non-empty folder.
        quantization_config: a packed-4-bit model's config.json entry (`formats.gptq_folder`):
            its integer tensors and fp16 `scales` keep their own dtype.

    Returns:
        {"path", "bytes", "files"} of the written folder.
    """
    folder = Path(folder)
    _check_target(folder, force)

    def stored(name: str, t: torch.Tensor) -> torch.Tensor:
        keep = quantization_config is not None and (not t.is_floating_point() or name.endswith(".scales"))
        return t.detach().contiguous() if keep else t.detach().to(dtype).contiguous()

    tensors = {k: stored(k, v) for k, v in native_to_hf(state, config).items()}
    hf_config = model_config(config, dtype) | (
        {"quantization_config": quantization_config} if quantization_config else {}
    )
    try:
        with atomic_folder(folder) as tmp:
            write_weights(tmp, tensors, max_shard_bytes, progress)
            write_tokenizer(tmp, tokenizer, source_folder, chat_template, config.max_position_embeddings)
            (tmp / "generation_config.json").write_bytes(_json(generation_config(config, stop_ids)))
            (tmp / "config.json").write_bytes(_json(hf_config))
            written = sorted(p.name for p in tmp.iterdir())
            if folder.exists():  # empty, or replaced file by file under `force`
                _move_files(tmp, folder, written)
    except OSError as e:
        raise GemmakitError(f"cannot write {folder}: {e.strerror or e}") from None
    size = sum((folder / n).stat().st_size for n in written)
    return {"path": str(folder), "bytes": size, "files": written}


def save_hf_folder(model, tokenizer, folder: str | Path, source_folder: Path | None = None) -> dict:
    """Writes a gemmakit model (adapters merged) as an HF folder, in the model's dtype,
    replacing the files of an existing folder; tokenizer files come from `source_folder` when
    it has them. A tied model saves the embedding once."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if any(".lora_" in k for k in state):
        raise GemmakitError("merge the adapters before saving the model")
    dtype = next(model.parameters()).dtype
    return write_hf(
        folder, state, model.config, tokenizer, dtype=dtype, source_folder=source_folder, force=True,
        progress=False,
    )  # fmt: skip
