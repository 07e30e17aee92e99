"""One model's planning report: parameter counts, weight bytes, KV cache and fine-tuning memory.

`make_report` gathers the figures of the other planning modules for one `Architecture`;
`Report.to_json` is the object `gemmakit inspect --json` prints. Units are bytes throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gemmakit.config import FULL
from gemmakit.formats.gguf import GGUFFile
from gemmakit.planning.architecture import Architecture
from gemmakit.planning.kv_cache import KVCacheSize, kv_cache
from gemmakit.planning.params import ParamCounts, count_params
from gemmakit.planning.training_memory import TRAINING_METHODS, training_memory
from gemmakit.planning.weights import PRECISIONS, weight_bytes


@dataclass
class Options:
    """The settings `gemmakit inspect` takes from its flags."""

    context: int | None = None  # None: each model's max_position_embeddings
    batch: int | None = None  # None: 1 for the KV cache, 4 for training
    seq_len: int = 512
    kv_dtype: str = "bf16"
    train_dtype: str = "bf16"
    lora_rank: int = 16
    ce_chunk: int = 256

    @property
    def kv_batch(self) -> int:
        return self.batch or 1

    @property
    def train_batch(self) -> int:
        return self.batch or 4


@dataclass
class Report:
    arch: Architecture
    params: ParamCounts
    # Weight bytes per precision (`weights.PRECISIONS`), plus "gguf_file" for a GGUF target.
    memory: dict[str, int]
    kv: KVCacheSize
    # `training_memory` per method of TRAINING_METHODS.
    training: dict[str, dict[str, Any]]
    train_batch: int
    chunk_tokens: int = 256
    # `gguf_file_summary` of a GGUF target.
    gguf_file: dict[str, Any] | None = None
    # Sentences printed under the numbers (`gemmakit.planning.prose.notes`).
    notes: list[str] = field(default_factory=list)

    def to_json(self, options: Options) -> dict[str, Any]:
        a = self.arch
        out = {
            "name": a.name,
            "source": a.source,
            "architecture": a.architecture,
            "model_type": a.model_type,
            "total_params": self.params.total,
            "text_params": self.params.text,
            "embedding_params": self.params.embedding,
            "non_embedding_params": self.params.non_embedding,
            "vision_params": self.params.vision,
            "audio_params": self.params.audio,
            "report_embedding_params": self.params.report_embedding,
            "per_layer_embedding_params": self.params.per_layer_embedding,
            "effective_params": self.params.effective,
            "active_params": self.params.active,
            "uncounted_towers": a.uncounted_towers or None,
            "config": {
                "vocab_size": a.vocab_size,
                "hidden_size": a.hidden_size,
                "intermediate_size": a.intermediate_size,
                "num_layers": a.num_layers,
                "num_heads": a.num_heads,
                "num_kv_heads": a.num_kv_heads,
                "attention": a.attention_kind.split(" ")[0],
                "head_dim": a.head_dim,
                "max_position_embeddings": a.max_position_embeddings,
                "global_layers": a.num_global,
                "sliding_layers": a.num_sliding,
                "sliding_window": a.sliding_window,
                "rope_theta": a.rope_theta,
                "rope_local_base_freq": a.rope_local_base_freq,
                "rope_scaling": a.rope_scaling,
                "attn_logit_softcapping": a.attn_logit_softcapping,
                "final_logit_softcapping": a.final_logit_softcapping,
                "tie_word_embeddings": a.tie_word_embeddings,
                "norms_per_layer": a.norms_per_layer,
                "qk_norm": a.qk_norm,
                "qkv_bias": a.qkv_bias,
                "activation": a.activation,
                **_family_config(a),
            },
            "memory": dict(self.memory),
            "kv_cache": {
                "dtype": self.kv.dtype,
                "context": self.kv.context,
                "batch": self.kv.batch,
                "bytes_per_token": self.kv.bytes_per_token,
                "bytes": self.kv.total,
                "bytes_no_window": self.kv.total_no_window,
                "cached_layers": self.kv.cached_layers,
                "shared_layers": self.kv.shared_layers,
            },
            "training": {
                "batch": self.train_batch,
                "seq_len": options.seq_len,
                "dtype": options.train_dtype,
                "lora_rank": options.lora_rank,
                "ce_chunk_tokens": options.ce_chunk,
                "methods": self.training,
            },
            "notes": self.notes,
        }
        if self.gguf_file:
            out["gguf_file"] = self.gguf_file
        return out


def _family_config(a: Architecture) -> dict[str, Any]:
    """The Gemma 3n/4 shape keys of the JSON config: per-type head dims and KV heads, KV
    sharing, K = V, per-layer MLP widths, PLE, experts, AltUp, LAuReL."""
    full = a.type_shape(FULL)
    return {
        "global_head_dim": full.head_dim if full else None,
        "global_kv_heads": full.kv_heads if full else None,
        "kv_shared_layers": a.num_kv_shared_layers,
        "k_eq_v_layers": a.k_eq_v_layers,
        "layer_intermediate_sizes": [a.layer(i).intermediate_size for i in range(a.num_layers)],
        "per_layer_input_size": a.per_layer_input_size,
        "per_layer_vocab_size": a.per_layer_vocab_size,
        "num_experts": a.num_experts,
        "top_k_experts": a.top_k_experts,
        "moe_intermediate_size": a.moe_intermediate_size,
        "altup_num_inputs": a.altup_num_inputs,
        "laurel_rank": a.laurel_rank,
        "rope_partial_rotary_factor": a.rope_partial_rotary_factor,
        "v_norm": a.v_norm,
        "layer_scalar": a.layer_scalar,
    }


def make_report(arch: Architecture, options: Options | None = None, gguf_file: dict | None = None) -> Report:
    """Every figure for `arch`; `gguf_file` (`gguf_file_summary`) adds a GGUF file's real bytes.

    The report's `notes` are left empty: `gemmakit.planning.prose.notes` writes them.
    """
    o = options or Options()
    memory = {p: weight_bytes(arch, p) for p in PRECISIONS}
    if gguf_file:
        memory["gguf_file"] = gguf_file["tensor_bytes"]
    kv = kv_cache(arch, o.context or arch.max_position_embeddings, o.kv_batch, o.kv_dtype)
    training = {
        m: training_memory(arch, m, o.train_batch, o.seq_len, o.train_dtype, o.lora_rank, ce_chunk=o.ce_chunk)
        for m in TRAINING_METHODS
    }
    return Report(arch, count_params(arch), memory, kv, training, o.train_batch, o.ce_chunk, gguf_file)


# llama.cpp's per-dimension RoPE frequency factors: derived from the config (Gemma 4's
# proportional RoPE), not a model weight.
_ROPE_FREQS = "rope_freqs.weight"


def _unread_tensors(g: GGUFFile) -> set[str]:
    """Tensors a GGUF stores that no model weight corresponds to: llama.cpp's rope_freqs, and
    the K/V weights of Gemma 3n's KV-shared layers (llama.cpp's gemma3n loader requires them
    and never reads them; the model has none)."""
    unread = {_ROPE_FREQS}
    arch = g.metadata.get("general.architecture")
    layers = g.metadata.get(f"{arch}.block_count")
    shared = g.metadata.get(f"{arch}.attention.shared_kv_layers")
    if arch == "gemma3n" and layers and shared:
        for i in range(int(layers) - int(shared), int(layers)):
            unread |= {f"blk.{i}.attn_k.weight", f"blk.{i}.attn_v.weight", f"blk.{i}.attn_k_norm.weight"}
    return unread


def gguf_file_summary(g: GGUFFile) -> dict[str, Any]:
    """A GGUF file's real tensor bytes and tensor count per GGML type (largest first), and the
    values its model tensors hold from their shapes (without the tensors no weight corresponds
    to, `_unread_tensors`); read from the header alone."""
    by_type: dict[str, int] = {}
    counts: dict[str, int] = {}
    unread = _unread_tensors(g)
    for t in g.tensors.values():
        name = t.ggml_type.name
        by_type[name] = by_type.get(name, 0) + t.nbytes
        counts[name] = counts.get(name, 0) + 1
    return {
        "path": str(g.path),
        "file_bytes": g.path.stat().st_size,
        "tensor_bytes": sum(by_type.values()),
        "params": sum(math.prod(t.shape) for name, t in g.tensors.items() if name not in unread),
        "bytes_by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
        "tensors_by_type": counts,
        "file_type": g.metadata.get("general.file_type"),
    }
