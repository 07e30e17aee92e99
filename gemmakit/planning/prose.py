"""The words around the numbers: notes under a report, vocabulary ratios, bytes and counts for
people. The estimates live in the other planning modules; the few figures worked out here
(shares, ratios, the gap to a reported total) exist only to be printed.

GB is 10**9 bytes, as printed.
"""

from __future__ import annotations

from gemmakit.planning.architecture import EXPERTS, Architecture
from gemmakit.planning.report import Report
from gemmakit.planning.weights import NF4_BITS_PER_WEIGHT

GB = 10**9


def notes(r: Report) -> list[str]:
    """Remarks printed under a model's numbers: where public figures differ, and why."""
    a, p, out = r.arch, r.params, []
    # Stored values: the parameters and the buffers a checkpoint keeps (Gemma 4's layer_scalar).
    stored = sum(t.numel for t in a.tensors())
    if r.gguf_file and r.gguf_file["params"] != stored:  # the header disagrees with its own tensors
        out.append(
            f"The GGUF tensors hold {r.gguf_file['params']:,} values, but its metadata describes "
            f"{stored:,}; the counts above follow the metadata."
        )
    if p.report_embedding:
        out.append(
            f"The Gemma technical reports count {p.report_embedding:,} embedding parameters: "
            f"a vocabulary padded to {a.report_vocab_size:,} rows ({a.report_vocab_size:,} x "
            f"{a.hidden_size:,}); config.json and the checkpoint hold {a.vocab_size:,} rows "
            f"({p.embedding:,}). Non-embedding counts agree exactly."
        )
    if p.vision and not p.audio:
        out.append(
            f"Multimodal checkpoint: {p.vision:,} vision parameters (SigLIP tower + projector) "
            f"are in the total; memory and training figures are for the {p.text:,}-parameter "
            "text model gemmakit runs."
        )
    elif p.audio:
        out.append(
            f"Multimodal checkpoint: {p.vision:,} vision and {p.audio:,} audio parameters "
            f"(towers + projectors) are in the total; memory and training figures are for the "
            f"{p.text:,}-parameter text model gemmakit runs."
        )
    if a.uncounted_towers:
        out.append(
            f"Multimodal checkpoint: the {a.uncounted_towers} towers are not counted (not "
            f"modelled here); the figures are for the {p.text:,}-parameter text model gemmakit runs."
        )
    nf4, bf16 = r.memory["nf4"], r.memory["bf16"]
    emb16 = 2 * p.embedding
    if _is_gemma_7b(a):
        out.append(_gemma_7b_nf4_note(r))
    elif emb16 > 0.25 * nf4:
        out.append(
            f"The embedding is {p.embedding / p.text:.0%} of the parameters and int8/NF4 leave it "
            f"in 16-bit ({emb16 / GB:.2f} GB), so NF4 weights are {nf4 / bf16:.0%} of bf16, not "
            f"the {NF4_BITS_PER_WEIGHT / 16:.0%} that {NF4_BITS_PER_WEIGHT:.3f} of 16 bits suggests."
        )
    out += _new_family_notes(r)
    if a.final_logit_softcapping or a.qk_norm:
        out.append("fp16 overflows Gemma 2 and later activations (trained in bf16): use bf16 or fp32.")
    full = r.training["full"]
    if full["logits"] > full["activations"] / 4 and a.vocab_size > 100_000:
        out.append(
            f"Training logits over the {a.vocab_size:,}-token vocabulary take "
            f"{full['logits'] / GB:.1f} GB at batch {r.train_batch} (float32 logits, log-softmax and "
            f"gradient); a chunked cross-entropy ({r.chunk_tokens} tokens at a time) keeps "
            f"{full['logits_chunked'] / GB:.2f} GB."
        )
    return out


def _new_family_notes(r: Report) -> list[str]:
    """What the per-layer embedding table and the routed experts mean for the figures."""
    a, p, out = r.arch, r.params, []
    if p.per_layer_embedding:
        out.append(
            f"The per-layer embedding (PLE) table is {p.per_layer_embedding / p.text:.0%} of the "
            f"parameters ({2 * p.per_layer_embedding / GB:.2f} GB in bf16) but only "
            f"{a.num_layers} x {a.per_layer_input_size} of its values are read per token, by lookup: "
            f"Google counts the model by its effective {fmt_params(p.effective)} and its runtimes can "
            "keep the table off the accelerator; the weight figures here hold it in memory, "
            "unquantized by int8/NF4 as an embedding."
        )
    if a.num_experts:
        experts = sum(t.numel for t in a.tensors() if t.kind == EXPERTS)
        out.append(
            f"The routed experts are {experts / p.text:.0%} of the parameters; a token runs through "
            f"{a.top_k_experts} of {a.num_experts} per layer ({fmt_params(p.active)} active), but all "
            "must be in memory. int8/NF4 here quantize the q/k/v/o/gate/up/down projections only "
            "(as gemmakit --quantize does), so the experts' stacked weights stay 16-bit; LoRA does "
            "not adapt them."
        )
    return out


def _is_gemma_7b(a: Architecture) -> bool:
    return (a.vocab_size, a.hidden_size, a.num_layers, a.num_heads, a.model_type) == (
        256000,
        3072,
        28,
        16,
        "gemma",
    )


def _gemma_7b_nf4_note(r: Report) -> str:
    """Where the 7.1 GB of GPU memory reported for Gemma 7B in NF4 goes, beyond the weights."""
    a, nf4 = r.arch, r.memory["nf4"]
    largest = max(t.numel for t in a.tensors() if t.is_linear)
    gap = 7.1 * GB - nf4
    return (
        f"Gemma 7B in NF4 (bitsandbytes, double quantization) has been reported to need 7.1 GB "
        f"of GPU memory: the NF4+DQ weights are "
        f"{nf4 / GB:.2f} GB, of which {2 * r.params.embedding / GB:.2f} GB is the 256k x 3072 "
        f"embedding that bitsandbytes leaves in 16-bit (it is an nn.Embedding, and tied to "
        f"lm_head). The other ~{gap / GB:.1f} GB is not weights: the CUDA context (0.3-0.5 GB, "
        f"seen by nvidia-smi but not by torch), the caching allocator's reserved-but-free blocks, "
        f"the 16-bit copy bitsandbytes dequantizes each matmul's weight into (up to "
        f"{2 * largest / 1e6:.0f} MB), and generation's activations and logits "
        f"({4 * a.vocab_size / 1e6:.1f} MB per token in fp32 over the 256k vocabulary)."
    )


def vocab_ratios(archs: list[Architecture]) -> str | None:
    """'gemma-7b's 256,000-token vocabulary is 8.0x llama-2-7b (32,000), ...' for a comparison."""
    if len(archs) < 2:
        return None
    first, rest = archs[0], [x for x in archs[1:] if x.vocab_size != archs[0].vocab_size]
    if not rest:
        return f"All vocabularies have {first.vocab_size:,} tokens."
    parts = [f"{first.vocab_size / x.vocab_size:.1f}x {x.name} ({x.vocab_size:,})" for x in rest]
    return f"{first.name}'s {first.vocab_size:,}-token vocabulary is " + ", ".join(parts) + "."


def fmt_bytes(n: float) -> str:
    if n >= GB:
        return f"{n / GB:.2f} GB"
    if n >= 10**6:
        return f"{n / 10**6:.0f} MB"
    if n >= 10**3:
        return f"{n / 10**3:.0f} kB"
    return f"{n:.0f} B"


def fmt_params(n: int) -> str:
    if n >= 10**9:
        return f"{n / 10**9:.2f}B"
    if n >= 10**6:
        return f"{n / 10**6:.0f}M"
    return f"{n:,}"
