"""Scaled dot-product attention with grouped KV heads: which kernel runs for which call.

Shape letters: B batch, T queries, S key/value slots, H query heads, K key/value heads,
D head_dim, G = H / K query heads per KV head.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Chunks of at most this many tokens use the grouped matmul attention, longer ones SDPA.
SMALL_CHUNK = 16
# SDPA backends allowed on CUDA: all but cuDNN's. cuDNN builds an execution plan for every new
# (batch, length) shape, and fine-tuning batches and prompts change length all the time:
# measured on an H200 (torch 2.11, Gemma 3 270M + LoRA, batch 4, lengths 97-222), a step
# at a new length took up to 2.7 s with cuDNN and 90-210 ms without it; at repeated lengths
# cuDNN's steps still took 75-300 ms against 90-130 ms.
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """softmax(softcap(q k^T * scale) + mask) v, per query head, with grouped KV heads.

    Args:
        q: (B, H, T, D).
        k, v: (B, K, S, D); query head h reads KV head h // G, as transformers' repeat_kv.
        mask: additive, (B, 1, T, S).
        scale: multiplies the scores.
        softcap: scores -> softcap * tanh(scores / softcap) before the mask (Gemma 2), or None.

    Returns:
        (B, H, T, D).
    """
    B, H, T, D = q.shape
    K = k.shape[1]
    if softcap is not None or T <= SMALL_CHUNK:
        return _grouped_attention(q, k, v, mask, scale, softcap)
    G = H // K
    if G > 1 and q.requires_grad and q.device.type == "cpu":
        # Training on the CPU: each KV head's G query heads stacked as one head of G*T rows
        # (queries are independent rows; the mask repeats per head). torch's CPU GQA path is
        # ~20% slower forward + backward (Gemma 3 270M, 4 x 128 tokens).
        folded = F.scaled_dot_product_attention(
            q.reshape(B, K, G * T, D), k, v, attn_mask=mask.repeat(1, 1, G, 1), scale=scale
        )  # (B, K, G*T, D)
        return folded.view(B, H, T, D)
    with sdpa_kernel(CUDA_SDPA_BACKENDS) if q.is_cuda else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=G > 1)


def _grouped_attention(q, k, v, mask, scale, softcap):
    """Attention with the query heads of each KV head stacked as rows: no K/V copies.

    Used for decode steps (SDPA's CPU kernel costs ~3x more there in bfloat16) and for
    Gemma 2's soft-capping, which SDPA cannot express: scores -> cap * tanh(scores / cap)
    before the mask (transformers modeling_gemma2.py eager_attention_forward).
    """
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K  # query heads per KV head, consecutive as in transformers' repeat_kv
    # One sequence with one KV head (Gemma 2B/270M/1B decoding a single prompt): plain 2-D
    # products, which torch's CPU backend runs 3-4x faster than batched ones in bfloat16.
    flat = B * K == 1
    if flat:
        scores = F.linear(q.reshape(G * T, D), k.reshape(S, D)).view(B, K, G * T, S)
    else:
        scores = torch.matmul(q.reshape(B, K, G * T, D), k.transpose(2, 3))  # (B, K, G*T, S)
    scores = scores * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(B, K, G, T, S) + mask[:, :, None]  # mask (B, 1, T, S)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if flat:
        return torch.mm(probs.view(G * T, S), v.reshape(S, D)).view(B, H, T, D)
    return torch.matmul(probs.view(B, K, G * T, S), v).view(B, H, T, D)  # (B, K, G*T, D)
