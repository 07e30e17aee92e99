"""Bytes of activations: one inference forward, and what a training step keeps for backward.

Per-token, per-layer figures; `gemmakit.planning.training_memory` multiplies them out. Where
blocks differ (Gemma 3n/4), each block is estimated with its own shapes through
`Architecture.layer_view`.
"""

from __future__ import annotations

from gemmakit.planning.architecture import Architecture

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def inference_activation_bytes(arch: Architecture, batch: int, tokens: int, dtype: str = "fp32") -> int:
    """Peak transient memory of one no-grad forward over `tokens` new tokens (all logits kept).

    The largest live set is either the MLP (hidden state, its norm, and three intermediate-
    sized tensors: gelu(gate), up and their product) or the end (hidden state plus the logits
    over the whole vocabulary, which dominate for Gemma's 256k vocabulary).
    """
    if arch.varies_by_layer:
        return max(
            inference_activation_bytes(arch.layer_view(i), batch, tokens, dtype)
            for i in range(arch.num_layers)
        )
    a = DTYPE_BYTES[dtype]
    n = batch * tokens
    mlp = n * a * (3 * arch.hidden_size + 3 * arch.intermediate_size)
    # Attention with a boolean mask: q, k, v, output and one head's scores at a time.
    attn = (
        n * a * (3 * arch.hidden_size + 2 * arch.q_dim + 2 * arch.kv_dim)
        + batch * arch.num_heads * tokens * tokens * 4
    )
    logits = n * a * (2 * arch.hidden_size + arch.vocab_size * (2 if arch.final_logit_softcapping else 1))
    return max(mlp, attn, logits)


def activation_bytes_per_token_layer(
    arch: Architecture, a: int, full: bool, lora: dict | None, cpu_kernels: bool = False
) -> float:
    """Bytes autograd keeps per token per block for the backward pass (fused attention).

    PyTorch saves a linear layer's input only when its weight is trained, so the items are:
      * each RMSNorm keeps its float32 input (4 B per channel), and its float32 normalized
        output too when the norm weight is trained (full fine-tuning); QK-norm likewise over
        q and k;
      * fused attention (SDPA) keeps q, k, v and its output (a each), no T x T matrix; eager
        soft-capped attention is `eager_attention_bytes_per_token_layer`;
      * the GeGLU/SwiGLU MLP keeps gate, act(gate) and up (a each);
      * full fine-tuning adds the inputs of the trained projections: q/k/v (shared), o,
        gate/up (shared) and down (a each);
      * LoRA: gemmakit's LoRALinear casts the adapters to the activations' dtype (PEFT casts
        the input to float32 instead), so what they keep is in the compute dtype (a). With
        dropout, each adapted projection keeps its dropped-out input and the dropout mask:
        PyTorch's CPU dropout multiplies by a noise tensor of the input's dtype (a; CUDA's
        fused kernel keeps a 1 B bool mask, so a is an upper bound there). Without dropout
        they keep the inputs themselves, shared as above. Plus the rank-r intermediate (a).
        Not per token, so left out: below float32, the adapters' copies in the compute
        dtype (a B per adapter parameter per forward; 7.6 MB for the 270M at r=16).
    Checked against the tensors autograd saves on Gemma 3 270M (LoRA r=16, dropout 0.05,
    batch 2 x 128, float32 and bfloat16): within 0.2% per token and layer.
    `cpu_kernels`: gemmakit's LoRA trainer on the CPU, where a frozen norm keeps its input in
    the compute dtype (its backward is one C pass), GeGLU keeps gate and up only (its
    backward recomputes the activation in C), and an adapter keeps no dropped-out copy or
    mask (the mask is rebuilt from a seed): the shared inputs and the rank-r output only.

    Args:
        a: bytes per value of the compute dtype.
        full: every weight is trained (full fine-tuning).
        lora: {"rank", "dropout", "targets"} of the adapters, or None.
    """
    hidden, inter, q, kv = arch.hidden_size, arch.intermediate_size, arch.q_dim, arch.kv_dim
    norm_bytes = 8 if full else (a if cpu_kernels else 4)
    total = arch.norms_per_layer * hidden * norm_bytes
    if arch.qk_norm:
        total += (q + kv) * norm_bytes
    total += a * (2 * q + 2 * kv)  # SDPA: q, k, v, output
    total += a * (2 if cpu_kernels else 3) * inter  # MLP: gate, act(gate) (not in C), up
    linear_inputs = a * (hidden + q + hidden + inter)
    if full:
        total += linear_inputs
    if lora:
        dropout = lora["dropout"] > 0 and not cpu_kernels
        if not dropout:  # the inputs as they are, shared by q/k/v and gate/up
            total += linear_inputs
        adapted = [t for t in arch.tensors() if t.kind in lora["targets"] and t.is_linear]
        adapted = adapted[: len(adapted) // arch.num_layers]  # one block's
        for t in adapted:
            # dropout output + its mask, both (B, T, in) in the compute dtype; A's output.
            total += (2 * a * t.shape[1] if dropout else 0) + a * lora["rank"]
    return total


def eager_attention_bytes_per_token_layer(arch: Architecture, a: int, seq_len: int) -> float:
    """Soft-capped (Gemma 2) attention runs eagerly: repeated K/V and the T x S score maps."""
    if arch.attn_logit_softcapping is None:
        return 0.0
    groups_kv = 2 * a * arch.q_dim if arch.num_kv_heads != arch.num_heads else 0
    # tanh output (a), float32 softmax output (4), probabilities in the compute dtype (a).
    return groups_kv + arch.num_heads * seq_len * (2 * a + 4)


def logits_bytes_per_token(arch: Architecture, a: int) -> int:
    """Cross-entropy over the vocabulary, per token: logits in the compute dtype, their float32
    copy (skipped when computing in fp32), the soft-capped float32 logits (Gemma 2), the
    float32 log-softmax kept for backward, and the float32 gradient made during backward."""
    per_logit = a + (4 if a < 4 else 0) + (4 if arch.final_logit_softcapping else 0) + 4 + 4
    return arch.vocab_size * per_logit


def family_extra_bytes_per_token_layer(arch: Architecture, a: int, norm_bytes: int, full: bool) -> float:
    """What autograd keeps per token per block for the Gemma 3n/4 modules beside attention and
    the dense MLP (an estimate by the same rules as `activation_bytes_per_token_layer`; each
    extra RMSNorm keeps its input at `norm_bytes` per channel):
      * per-layer input (PLE): the gate's output, its activation and the per-layer slice it
        multiplies (a each, P wide), the post norm; full fine-tuning adds the gate's and the
        projection's inputs;
      * mixture of experts: the router's scaled input (a * H) and the three extra feed-forward
        norms' inputs, and per routed expert (top_k of them) its gathered input and its output
        before the routing weight (2 * a * H), gate and up (2 * a * I), act(gate) and the
        product down_proj reads (2 * a * I);
      * AltUp: per stream, the stacked input of the prediction, the prediction, the
        correction's innovation product and the corrected stream (4 * a * H); for the active
        stream four more (its prediction, innovation, scaled output and the block's input to
        it); and the router norm;
      * LAuReL: the rank-r intermediate (a * r) and its post norm.
    Checked against the activations autograd saves in transformers' Gemma 3n and Gemma 4
    (float32, full fine-tuning, tiny models, weights left out): within 1% on both, each
    module's term growing with its width as measured (Gemma 3 on the same check: 3%;
    2026-12-03).
    """
    H, P, r, n = arch.hidden_size, arch.per_layer_input_size, arch.laurel_rank, arch.altup_num_inputs
    total = 0.0
    if P:
        total += 3 * a * P + norm_bytes * H + (a * (H + P) if full else 0)
    if arch.num_experts:
        total += (
            3 * norm_bytes * H + a * H + arch.top_k_experts * a * (2 * H + 4 * arch.moe_intermediate_size)
        )
    if n:
        total += 4 * (n + 1) * a * H + norm_bytes * H
    if r:
        total += a * r + norm_bytes * H
    return total
