"""Writing a Hugging Face model folder that transformers loads to the same logits.

config.json comes from `GemmaConfig.to_hf_config()`, the weights from
`checkpoint.native_to_hf` as safetensors (sharded above `max_shard_bytes`, with an index, as
`save_pretrained` does), and the tokenizer either copied from a source folder or, for a GGUF
source, rebuilt: `tokenizer.model` is the SentencePiece model proto the tokenizer was built
from, with tokenizer_config.json, special_tokens_map.json and a chat template beside it.

The folder is assembled under a temporary name next to the target and moved into place at the
end, config.json last, so an interrupted export never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from gemmakit.config import GemmaConfig
from gemmakit.errors import GemmakitError
from gemmakit.formats.safetensors import native_to_hf, save_safetensors

HF_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Files describing the tokenizer that a source folder may hold; copied verbatim.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")  # fmt: skip
# Files a previous export may have left that must not survive a new one.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def tokenizer_files(tokenizer, chat_template: str, max_length: int) -> dict[str, bytes]:
    """tokenizer.model + configs for a SentencePiece-backed `Tokenizer` (e.g. from a GGUF)."""
    backend = tokenizer._backend
    if not hasattr(backend, "serialized_model_proto"):
        raise GemmakitError("the tokenizer is not SentencePiece-based; cannot write tokenizer.model")
    special = {
        "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
    }  # fmt: skip
    present = {k: v for k, v in special.items() if tokenizer.token_id(v) is not None}
    extra = [p for p in ("<start_of_turn>", "<end_of_turn>") if tokenizer.token_id(p) is not None]
    config = {
        "tokenizer_class": "GemmaTokenizer",
        **present,
        "add_bos_token": True,
        "add_eos_token": False,
        "padding_side": "left",
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "extra_special_tokens": extra,
        "chat_template": chat_template,
    }
    special_map = {**present, "additional_special_tokens": extra}
    return {
        "tokenizer.model": backend.serialized_model_proto(),
        "tokenizer_config.json": _json(config),
        "special_tokens_map.json": _json(special_map),
    }


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


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
) -> dict:
    """Writes config.json, safetensors weights, tokenizer and generation_config.json.

    Args:
        folder: the output folder; must not exist or be empty unless `force`.
        state: the float state dict under gemmakit's names.
        config: the model's config.
        tokenizer: a gemmakit Tokenizer (used when `source_folder` holds no tokenizer files).
        dtype: weight dtype in the safetensors files.
        source_folder: an HF folder whose tokenizer files are copied verbatim.
        chat_template: written into tokenizer_config.json when the tokenizer is rebuilt.
        stop_ids: generation_config's eos_token_id list (default: the config's).
        max_shard_bytes: shard size limit of the safetensors files.
        force: replace the files of an existing, non-empty folder.
    """
    from tqdm import tqdm

    from gemmakit.formats.gguf_writer import GEMMA_CHAT_TEMPLATE

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise GemmakitError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise GemmakitError(f"{folder} is not empty; pass --force to overwrite its files")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise GemmakitError(f"cannot write {folder}: {e.strerror or e}") from None

    try:
        tensors = {k: v.detach().to(dtype).contiguous() for k, v in native_to_hf(state, config).items()}
        shards = _shards(tensors, max_shard_bytes)
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        weight_map = {}
        for shard, fname in tqdm(list(zip(shards, names)), desc="writing safetensors", disable=not progress):
            save_safetensors(shard, tmp / fname)
            weight_map.update({k: fname for k in shard})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_bytes(_json(index))

        copied = []
        if source_folder is not None:
            for fname in TOKENIZER_FILES:
                if (source_folder / fname).is_file():
                    shutil.copyfile(source_folder / fname, tmp / fname)
                    copied.append(fname)
        if not copied and tokenizer is not None:
            files = tokenizer_files(
                tokenizer, chat_template or GEMMA_CHAT_TEMPLATE, config.max_position_embeddings
            )
            for fname, data in files.items():
                (tmp / fname).write_bytes(data)

        eos = list(stop_ids or config.eos_token_ids)
        generation = {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": config.pad_token_id,
        }
        (tmp / "generation_config.json").write_bytes(_json(generation))
        hf_config = config.to_hf_config()
        hf_config["dtype"] = _DTYPE_NAMES[dtype]
        qpas = hf_config.get("query_pre_attn_scalar")
        if isinstance(qpas, float) and abs(qpas - round(qpas)) < 1e-3:
            # A GGUF stores it as a float32 attention scale (24 reads back as 23.999998);
            # every published value is an integer and transformers requires one.
            hf_config["query_pre_attn_scalar"] = round(qpas)
        (tmp / "config.json").write_bytes(_json(hf_config))

        # Move into place; config.json last, so a partial folder never looks loadable.
        folder.mkdir(exist_ok=True)
        written = sorted(p.name for p in tmp.iterdir())
        stale = [folder / "config.json", *folder.glob("model-*-of-*.safetensors")]
        stale += [folder / n for n in _WEIGHT_FILES if n not in written]
        for f in stale:
            f.unlink(missing_ok=True)
        for fname in [n for n in written if n != "config.json"] + ["config.json"]:
            os.replace(tmp / fname, folder / fname)
    except OSError as e:
        raise GemmakitError(f"cannot write {folder}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum((folder / n).stat().st_size for n in written)
    return {"path": str(folder), "bytes": size, "files": written}
