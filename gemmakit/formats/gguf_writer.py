"""GGUF writing for Gemma: metadata llama.cpp reads, the SentencePiece vocabulary, block quants.

The layout follows llama.cpp's own converter (convert_hf_to_gguf.py, Gemma/Gemma2/Gemma3
models) so that llama.cpp loads the file, and gemmakit's reader (`gemmakit.formats.gguf`) reads it
back to the same model:
- architecture `gemma` / `gemma2` / `gemma3` and its hyper-parameter keys;
- RMSNorm weights stored as w + 1 (llama.cpp multiplies by the stored weight alone);
- no `output.weight` when the output is tied to `token_embd`;
- 1-D tensors (norms) in F32, 2-D tensors in the requested type, written by the `gguf`
  package's reference quantizers (`gguf.quants.quantize`); a tensor whose rows are not a
  whole number of blocks falls back to F16, as the converter does;
- the vocabulary as pieces, scores and SentencePiece types, with the special ids looked up by
  token string, add_bos True, add_eos False and add_space_prefix False (Gemma never prefixes a
  space), and a Gemma chat template.
Tensors are quantized and written one at a time, so memory stays near one tensor's size, and
the file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from gemmakit.config import FULL, SLIDING, GemmaConfig
from gemmakit.errors import GemmakitError
from gemmakit.files import atomic_write
from gemmakit.formats.gguf import (
    ROPE_FREQS,
    SHARED_LAYER_KV_TENSORS,
    UNROTATED_FREQ_FACTOR,
    gguf_tensors,
    is_norm,
)
from gemmakit.formats.gguf_mix import MIXES, MixPlan, ModelShape, plan_mix
from gemmakit.formats.gguf_quantize import check_importance, imatrix_for, quantize_tensor
from gemmakit.formats.tokenizer import BYTE, CONTROL, NORMAL, SPACE, UNUSED, USER_DEFINED

log = logging.getLogger(__name__)

# --type name -> tensor type for the 2-D weights, and the file type llama.cpp reports, for the
# float types; the quantized types are llama.cpp's mixes (formats/gguf_mix.py MIXES).
GGUF_TYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
# --embedding-type name -> the token embedding's type (llama-quantize --token-embedding-type)
EMBEDDING_TYPES = {
    "f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q6_k": Q.Q6_K, "q5_k": Q.Q5_K,
    "q5_1": Q.Q5_1, "q5_0": Q.Q5_0, "q4_k": Q.Q4_K, "q4_1": Q.Q4_1, "q4_0": Q.Q4_0, "q3_k": Q.Q3_K,
    "q2_k": Q.Q2_K, "iq4_xs": Q.IQ4_XS, "iq4_nl": Q.IQ4_NL,
}  # fmt: skip

ARCHITECTURES = {
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3n_text": "gemma3n",
    "gemma4_text": "gemma4",
}
# 2-D tensors llama.cpp's converter keeps in F32 whatever the output type (convert_hf_to_gguf.py
# conversion/base.py: the MoE router input, Gemma 3n's AltUp coefficients).
_F32_TENSORS = ("ffn_gate_inp.weight", "altup_correct_coef.weight", "altup_predict_coef.weight")

# Gemma's chat format, as Google's Gemma 3 chat template writes it: "assistant" is written
# "model", a system message is folded into the first user turn (Gemma 3's rule), one <bos> at
# the start. It renders the same text as `gemmakit.formats.tokenizer.render_chat` (tested).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] in ('assistant', 'model') else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + ((first_user_prefix if loop.first else '') + message['content']) | trim"
    " + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)


def tensor_type(
    hf_name: str, shape: tuple[int, ...], qtype: str, embedding_type: str | None, gguf_name: str = ""
) -> Q:
    """The GGUF type a tensor is written in for a float --type (f32, f16, bf16); the mixes
    choose theirs by llama.cpp's rules (formats/gguf_mix.py)."""
    if len(shape) < 2 or is_norm(hf_name) or gguf_name.endswith(("_norm.weight", *_F32_TENSORS)):
        return Q.F32
    t = GGUF_TYPES[qtype][0]
    if embedding_type is not None and hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
        t = EMBEDDING_TYPES[embedding_type]
    block = gguf.GGML_QUANT_SIZES[t][0]
    if shape[-1] % block:
        return Q.F16
    return t


def _quantize(t: torch.Tensor, qtype: Q, imatrix: np.ndarray | None = None) -> np.ndarray:
    """The tensor's data in `qtype` (formats/gguf_quantize.py)."""
    return quantize_tensor(t, qtype, imatrix)


def _mix_types(tensors, config: GemmaConfig, qtype: str, embedding_type: str | None, importance) -> MixPlan:
    """llama.cpp's type for each tensor under mix `qtype` (formats/gguf_mix.py)."""
    shape = ModelShape(
        n_layer=config.num_hidden_layers,
        n_gqa=config.num_attention_heads // max(1, config.layer_kv_heads(0)),
        n_expert=config.num_experts or 0,
    )
    embedding = EMBEDDING_TYPES[embedding_type] if embedding_type is not None else None
    shapes = {g_name: tuple(t.shape) for g_name, _, t in tensors}
    return plan_mix(shapes, qtype, shape, has_imatrix=bool(importance), embedding_type=embedding)


def _vocab_arrays(tokenizer, vocab_size: int, source_metadata: dict | None):
    """(pieces, scores, types) in llama.cpp's conventions, padded to the embedding rows."""
    md = source_metadata or {}
    if "tokenizer.ggml.tokens" in md and "tokenizer.ggml.scores" in md:
        pieces = list(md["tokenizer.ggml.tokens"])
        scores = [float(s) for s in md["tokenizer.ggml.scores"]]
        types = [int(t) for t in md["tokenizer.ggml.token_type"]]
    else:
        backend = tokenizer.backend
        if hasattr(backend, "serialized_model_proto"):  # SentencePiece: the model's own data
            from sentencepiece import sentencepiece_model_pb2 as pb

            proto = pb.ModelProto.FromString(backend.serialized_model_proto())
            pieces = [p.piece for p in proto.pieces]
            scores = [float(p.score) for p in proto.pieces]
            types = [int(p.type) for p in proto.pieces]
        else:
            pieces, scores, types = _scores_from_order(list(tokenizer.pieces), list(tokenizer.types))
        # llama.cpp stores user-defined pieces (runs of spaces, tabs, newlines) with real
        # spaces (convert_hf_to_gguf.py, _create_vocab_sentencepiece).
        pieces = [p.replace(SPACE, " ") if t == USER_DEFINED else p for p, t in zip(pieces, types)]
    if len(pieces) > vocab_size:
        raise GemmakitError(f"the tokenizer has {len(pieces)} tokens but the model only {vocab_size} rows")
    # Pad to the embedding rows as llama.cpp's converter does (Gemma 3 4B+: 262208 rows).
    for i in range(len(pieces), vocab_size):
        pieces.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(UNUSED)
    return pieces, scores, types


def _scores_from_order(pieces, types):
    """Scores for a tokenizer.json-only source, where SentencePiece scores are lost.

    Gemma's tokenizer.model scores its normal pieces 0, -1, -2, ... in id order, byte pieces
    0 and everything else -1000 (read from the bundled GGUF); byte pieces `<0xNN>` are typed
    BYTE and runs of spaces USER_DEFINED again (tokenizer.json does not keep the types). On
    the bundled model's vocabulary this rebuilds pieces and types exactly, and scores in the
    same order (a constant offset after the single characters), which is all SentencePiece's
    BPE uses to rank merges (tested).
    """
    out_types, scores, rank = [], [], 0
    for p, t in zip(pieces, types):
        if t == NORMAL and len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
            t = BYTE
        elif t == NORMAL and len(p) > 1 and set(p) == {SPACE}:
            t = USER_DEFINED  # Gemma defines runs of 2-31 spaces as user-defined pieces
        out_types.append(t)
        if t == NORMAL:
            scores.append(-float(rank))
            rank += 1
        else:
            scores.append(0.0 if t == BYTE else -1000.0)
    return list(pieces), scores, out_types


def _layer_pattern(config: GemmaConfig, arch: str) -> int | None:
    """The sliding-window pattern to write for gemma3 (None: llama.cpp's default of 6).

    llama.cpp derives the layer kinds from the architecture alone: every layer global for
    gemma, even layers sliding for gemma2, every 6th layer global for gemma3. A model whose
    layer_types differ can only be written if gemma3's pattern key can describe it.
    """
    types = config.layer_types
    n = len(types)
    if arch == "gemma":
        expected = (FULL,) * n
        if types == expected:
            return None
    elif arch == "gemma2":
        if types == tuple(SLIDING if i % 2 == 0 else FULL for i in range(n)):
            return None
    else:
        for p in [6] + list(range(1, n + 2)):
            if types == tuple(FULL if (i + 1) % p == 0 else SLIDING for i in range(n)):
                return None if p == 6 else p
    raise GemmakitError(
        f"this model's layer types ({', '.join(t.split('_')[0] for t in types)}) cannot be "
        f"described in a GGUF file for {arch}"
    )


def _llama_cpp_qpas(config: GemmaConfig) -> float:
    # llama.cpp (llama-model.cpp) scales queries by head_dim**-0.5, except for the 27B models
    # (46 layers for Gemma 2, 62 for Gemma 3), where it uses (hidden/heads)**-0.5.
    if config.num_hidden_layers in (46, 62):
        return config.hidden_size // config.num_attention_heads
    return config.head_dim


def _add_architecture(w: gguf.GGUFWriter, config: GemmaConfig, arch: str) -> list[str]:
    """Hyper-parameter keys; returns notes on what llama.cpp will not honour."""
    notes = []
    c = config
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    if arch == "gemma3" and c.rope_local_base_freq is not None:
        w.add_rope_freq_base_swa(c.rope_local_base_freq)
        if c.rope_local_base_freq != 10000.0:
            notes.append(f"llama.cpp uses 10000 as gemma3's local RoPE base, not {c.rope_local_base_freq:g}")
    if SLIDING in c.layer_types:
        w.add_sliding_window(c.sliding_window)
    pattern = _layer_pattern(c, arch)
    if pattern is not None:
        w.add_sliding_window_pattern(pattern)
        notes.append(f"llama.cpp assumes every 6th gemma3 layer is global; this model's pattern is {pattern}")
    if c.attn_logit_softcapping is not None:
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
    if c.final_logit_softcapping is not None:
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    if c.rope_scaling_factor != 1.0:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_scaling_factor)
    qpas = c.query_pre_attn_scalar or c.head_dim
    if arch != "gemma" and qpas != _llama_cpp_qpas(c):
        # gemmakit's reader honours this key; llama.cpp ignores it for Gemma.
        w.add_attention_scale(qpas**-0.5)
        notes.append(f"llama.cpp ignores query_pre_attn_scalar={qpas:g} (it uses {_llama_cpp_qpas(c)})")
    return notes


def _add_per_layer_family(w: gguf.GGUFWriter, config: GemmaConfig, arch: str) -> list[str]:
    """Gemma 3n / Gemma 4 hyper-parameter keys, as convert_hf_to_gguf.py writes them
    (conversion/gemma.py Gemma3NModel / Gemma4Model set_gguf_parameters); returns notes."""
    c, n, notes = config, config.num_hidden_layers, []
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(n)
    w.add_head_count(c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_freq_base_swa(c.rope_local_base_freq if c.rope_local_base_freq is not None else c.rope_theta)
    if c.rope_scaling_factor != 1.0:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_scaling_factor)
    if c.final_logit_softcapping is not None:
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    w.add_sliding_window(c.sliding_window or c.max_position_embeddings)
    w.add_sliding_window_pattern([t == SLIDING for t in c.layer_types])
    w.add_shared_kv_layers(c.num_kv_shared_layers)
    w.add_embedding_length_per_layer_input(c.hidden_size_per_layer_input)
    if arch == "gemma3n":
        # Transformers keeps per-layer widths as a list, which the converter writes as is.
        w.add_feed_forward_length([c.layer_intermediate_size(i) for i in range(n)])
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_altup_active_idx(c.altup_active_idx)
        w.add_altup_num_inputs(c.altup_num_inputs)
        # The quantile of each layer's sparsity, computed as the converter does (float32).
        normal = torch.distributions.normal.Normal(0, 1)
        w.add_activation_sparsity_scale(
            [normal.icdf(torch.tensor(c.layer_activation_sparsity(i))).item() for i in range(n)]
        )
        # llama.cpp's gemma3n fixes what gemma3n's keys cannot say (src/models/gemma3n.cpp,
        # models.h): 20 KV layers, LAuReL rank 64, 256-wide PLE, sparsity 0.95 on 10 layers.
        expected = (n - c.num_kv_shared_layers, c.laurel_rank, c.hidden_size_per_layer_input)
        if expected != (20, 64, 256) or list(c.activation_sparsity_pattern or ()) != [0.95] * 10 + [0.0] * (
            n - 10
        ):
            notes.append("llama.cpp's gemma3n assumes the E2B/E4B shapes; this model's differ")
        return notes
    widths = [c.layer_intermediate_size(i) for i in range(n)]
    w.add_feed_forward_length(widths if c.use_double_wide_mlp else c.intermediate_size)
    kv = [c.layer_kv_heads(i) for i in range(n)]
    w.add_head_count_kv(kv if c.num_global_key_value_heads is not None else c.num_key_value_heads)
    global_dim = c.global_head_dim or c.head_dim
    w.add_key_length(global_dim)
    w.add_value_length(global_dim)
    w.add_key_length_swa(c.head_dim)
    w.add_value_length_swa(c.head_dim)
    # Full layers rotate through rope_freqs (see rope_freqs below), so all of their dims count.
    w.add_rope_dimension_count(global_dim)
    w.add_rope_dimension_count_swa(c.head_dim)
    if c.num_experts:
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.top_k_experts)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    return notes


def shared_layer_kv_placeholders(config: GemmaConfig) -> list[tuple[str, str, torch.Tensor]]:
    """Zero K/V weights for the KV-shared layers, which llama.cpp's gemma3n loader requires and
    never reads (see `SHARED_LAYER_KV_TENSORS`); gemmakit's reader drops them again."""
    out = []
    for i in range(config.num_hidden_layers):
        if config.layer_owns_kv(i):
            continue
        kv_dim, hidden = config.layer_kv_heads(i) * config.layer_head_dim(i), config.hidden_size
        for name in SHARED_LAYER_KV_TENSORS:
            shape = (config.layer_head_dim(i),) if "norm" in name else (kv_dim, hidden)
            out.append((f"blk.{i}.{name}", "", torch.zeros(shape)))
    return out


def rope_freqs(config: GemmaConfig) -> torch.Tensor:
    """Gemma 4's RoPE frequency factors of the full-attention layers: 1 for the rotated pairs,
    1e30 (a frequency of 0: no rotation) for the rest, llama.cpp's way of expressing
    proportional RoPE (conversion/gemma.py Gemma4Model.generate_extra_tensors)."""
    half = (config.global_head_dim or config.head_dim) // 2
    rotated = int(half * config.rope_partial_rotary_factor)
    return torch.tensor([1.0] * rotated + [UNROTATED_FREQ_FACTOR] * (half - rotated), dtype=torch.float32)


def _add_tokenizer(w, tokenizer, config: GemmaConfig, source_metadata, chat_template):
    bpe_merges = _gemma4_merges(tokenizer, config, source_metadata or {})
    if bpe_merges is not None and "tokenizer.ggml.tokens" not in (source_metadata or {}):
        pieces, scores, types = _gemma4_vocab_arrays(tokenizer, config.vocab_size)
    else:
        pieces, scores, types = _vocab_arrays(tokenizer, config.vocab_size, source_metadata)
    if bpe_merges is not None:
        w.add_tokenizer_model("gemma4")
    else:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    if bpe_merges is not None:
        w.add_token_merges([str(m) for m in bpe_merges])
    ids = {p: i for i, p in enumerate(pieces)}
    # Looked up by string: some GGUFs in the wild carry wrong ids here.
    for piece, add in (("<bos>", w.add_bos_token_id), ("<eos>", w.add_eos_token_id),
                       ("<unk>", w.add_unk_token_id), ("<pad>", w.add_pad_token_id),
                       ("<end_of_turn>", w.add_eot_token_id)):  # fmt: skip
        if piece in ids:
            add(ids[piece])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    own = getattr(tokenizer, "chat_template", None)
    w.add_chat_template(chat_template or (own.text if own is not None else GEMMA_CHAT_TEMPLATE))
    if types and CONTROL not in types:
        log.warning("the vocabulary has no control tokens; is this a Gemma tokenizer?")


def _gemma4_merges(tokenizer, config: GemmaConfig, md: dict) -> list[str] | None:
    """The merges to write a "gemma4" vocabulary with (BPE by merge rank, as llama.cpp's
    converter writes Gemma 4: conversion/gemma.py, Gemma4Model.set_vocab), or None for a
    SentencePiece one. A gemma4 GGUF source keeps its own; a Gemma 4 model whose tokenizer is
    a tokenizer.json BPE writes that BPE's merges. Rebuilt as SentencePiece from scores
    instead, such a vocabulary would tokenize differently (two spaces, say)."""
    if md.get("tokenizer.ggml.model") == "gemma4":
        return [str(m) for m in md.get("tokenizer.ggml.merges", [])] or None
    if md.get("tokenizer.ggml.model") or config.model_type != "gemma4_text":
        return None
    backend = getattr(tokenizer, "backend", None)
    if not hasattr(backend, "to_str"):  # SentencePiece (tokenizer.model): scores, no merges
        return None
    model = json.loads(backend.to_str()).get("model", {})
    if model.get("type") != "BPE" or not model.get("merges"):
        return None
    return [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


# Control pieces llama.cpp's Gemma 4 converter types USER_DEFINED so that they are always
# rendered, for its chat parser (conversion/gemma.py, Gemma4Model.set_vocab).
_GEMMA4_VISIBLE = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                   "<tool_response|>", '<|"|>'}  # fmt: skip


def _gemma4_vocab_arrays(tokenizer, vocab_size: int):
    """(pieces, scores, types) of a tokenizer.json BPE as llama.cpp's converter writes a Gemma 4
    vocabulary (gguf-py LlamaHfVocab): pieces as spelled in tokenizer.json, every score -1000,
    `<0xNN>` pieces BYTE, the added tokens CONTROL (the visible ones USER_DEFINED), the rest
    NORMAL."""
    backend = tokenizer.backend
    added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
    n = backend.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise GemmakitError(f"the tokenizer has {n} tokens but the model only {vocab_size} rows")
    pieces, types = [], []
    for i in range(n):
        piece = backend.id_to_token(i)
        pieces.append(piece)
        if i in added:
            types.append(USER_DEFINED if piece in _GEMMA4_VISIBLE else CONTROL)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    pieces += [f"[PAD{i}]" for i in range(n, vocab_size)]
    types += [UNUSED] * (vocab_size - n)
    return pieces, [-1000.0] * vocab_size, types


def write_gguf(
    path: str | Path,
    state: dict[str, torch.Tensor],
    config: GemmaConfig,
    tokenizer=None,
    qtype: str = "f16",
    embedding_type: str | None = None,
    source_metadata: dict | None = None,
    chat_template: str | None = None,
    name: str | None = None,
    progress: bool = True,
    imatrix: dict[str, np.ndarray] | None = None,
) -> dict:
    """Writes a complete GGUF file that llama.cpp and gemmakit load.

    Args:
        path: the output file; written under a temporary name, then renamed.
        state: the model's float state dict under gemmakit's (HF) names.
        config: the model's config.
        tokenizer: a `gemmakit.formats.tokenizer.Tokenizer`; None writes no vocabulary (gemmakit can
            still load the weights, llama.cpp cannot run the file).
        qtype: f32, f16 or bf16 for the 2-D weights, or one of llama.cpp's mixes (q4_k_m,
            q6_k, q8_0, q4_0, ...: formats/gguf_mix.py MIXES), whose types and bytes are the
            ones llama-quantize writes from a float32 file.
        embedding_type: type of token_embd (and output), as llama-quantize's
            --token-embedding-type; default: the mix's choice, or qtype for the float types.
        source_metadata: the source GGUF's metadata, whose vocabulary arrays are copied as is.
        chat_template: a jinja chat template; default: the tokenizer's own, else Gemma's.
        name: general.name.
        imatrix: GGUF tensor name -> per-column importance (formats/imatrix.read_imatrix),
            used by the mixes as llama.cpp's quantizer uses it.

    Returns:
        A summary: path, bytes, tensor count per type, notes on what llama.cpp ignores.
    """
    if qtype not in GGUF_TYPES and qtype not in MIXES:
        raise GemmakitError(f"unknown GGUF type {qtype!r}; choose one of {', '.join([*GGUF_TYPES, *MIXES])}")
    if embedding_type is not None and embedding_type not in EMBEDDING_TYPES:
        raise GemmakitError(
            f"unknown embedding type {embedding_type!r}; choose one of {', '.join(EMBEDDING_TYPES)}"
        )
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise GemmakitError(f"no GGUF architecture for model type {config.model_type!r}")
    if imatrix:
        check_importance(imatrix)
    path = Path(path)
    w = gguf.GGUFWriter(path=None, arch=arch)
    w.add_type("model")
    w.add_name(name or config.name or arch)
    md = source_metadata or {}
    for key in ("general.basename", "general.size_label", "general.license"):
        if isinstance(md.get(key), str):
            w.add_string(key, md[key])
    if arch in ("gemma3n", "gemma4"):
        notes = _add_per_layer_family(w, config, arch)
    else:
        notes = _add_architecture(w, config, arch)
    w.add_file_type(MIXES[qtype][0] if qtype in MIXES else GGUF_TYPES[qtype][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer is not None:
        _add_tokenizer(w, tokenizer, config, source_metadata, chat_template)
    else:
        notes.append("no tokenizer written: llama.cpp cannot run this file")

    tensors = _gguf_tensor_list(state, config, arch)
    plan = _tensor_plan(tensors, config, qtype, embedding_type, imatrix, notes)
    if imatrix and qtype in MIXES:
        w.add_uint32("quantize.imatrix.entries_count", len(imatrix))
    for g_name, _, t, t_type, _ in plan:
        block, size = gguf.GGML_QUANT_SIZES[t_type]
        w.add_tensor_info(g_name, tuple(t.shape), np.float32, t.numel() // block * size, raw_dtype=t_type)

    def write(tmp: Path):
        from tqdm import tqdm

        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, _, t, t_type, im in tqdm(
            plan, desc=f"writing {path.name}", unit="tensor", disable=not progress
        ):
            w.write_tensor_data(_quantize(t, t_type) if im is None else _quantize(t, t_type, im))
        w.close()

    try:
        atomic_write(path, write)
    except OSError as e:
        raise GemmakitError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        w.close()
    counts: dict[str, int] = {}
    for _, _, _, t_type, _ in plan:
        counts[t_type.name] = counts.get(t_type.name, 0) + 1
    return {"path": str(path), "bytes": path.stat().st_size, "tensor_types": counts, "notes": notes}


def _gguf_tensor_list(state: dict[str, torch.Tensor], config: GemmaConfig, arch: str):
    """(GGUF name, first HF name, tensor) of every tensor the file holds, norms as llama.cpp
    stores them."""
    tensors = []
    for g_name, hf_names, t in gguf_tensors(state):
        if config.tie_word_embeddings and hf_names == ["lm_head.weight"]:
            continue  # tied: llama.cpp reuses token_embd as the output
        if config.norm_unit_offset and is_norm(hf_names[0]):
            # Gemma 1-3's RMSNorm multiplies by 1 + w; llama.cpp's by the stored weight.
            t = t.detach().float() + 1.0
        tensors.append((g_name, hf_names[0], t))
    if arch == "gemma4":
        tensors.insert(0, (ROPE_FREQS, "", rope_freqs(config)))
    if arch == "gemma3n":
        tensors += shared_layer_kv_placeholders(config)
    return tensors


def _tensor_plan(tensors, config: GemmaConfig, qtype: str, embedding_type, imatrix, notes: list[str]):
    """(GGUF name, HF name, tensor, type, importance or None) per tensor; adds notes."""
    if qtype not in MIXES:
        if imatrix:
            notes.append(f"the importance matrix is not used by {qtype}")
        return [
            (g, h, t, tensor_type(h, tuple(t.shape), qtype, embedding_type, g), None) for g, h, t in tensors
        ]
    mix = _mix_types(tensors, config, qtype, embedding_type, imatrix)
    if mix.notes:
        notes.append(
            f"{len(mix.notes)} tensors fell back to a type their rows fit, as llama.cpp does ({mix.notes[0]})"
        )
    plan = []
    for g_name, hf_name, t in tensors:
        t_type = mix.types[g_name]
        quantized = t_type not in (Q.F32, Q.F16, Q.BF16)
        im = imatrix_for(g_name, tuple(t.shape), imatrix) if quantized else None
        if im is None and g_name in mix.requires_imatrix:
            raise GemmakitError(f"{qtype} needs an importance matrix (--imatrix) with an entry for {g_name}")
        plan.append((g_name, hf_name, t, t_type, im))
    if imatrix:
        missing = [p[0] for p in plan if p[4] is None and p[3] not in (Q.F32, Q.F16, Q.BF16)]
        if missing:
            examples = ", ".join(missing[:2]) + (", ..." if len(missing) > 2 else "")
            notes.append(
                f"the importance matrix has no entry for {_count(len(missing), 'tensor')} ({examples})"
            )
    return plan


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
