"""The Gemma 3n causal language model (text), under Hugging Face's state-dict names.

Read bottom-up: the pieces Gemma 1-4 lack (LAuReL, the MLP with Gaussian top-k activation
sparsity, AltUp), the block that wires them around the shared attention, then the model:
per-layer embeddings, the AltUp streams around the blocks, final norm and soft-capped head.
Numerics follow transformers `modeling_gemma3n.py`; each subtlety names the class it comes from.

Shape letters as in `gemmakit/model/layers.py`, plus N for the AltUp streams and L, P for the
per-layer inputs (layers, hidden_size_per_layer_input).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gemmakit import ops
from gemmakit.config import GemmaConfig
from gemmakit.errors import ConfigError
from gemmakit.model.cache import KVCache
from gemmakit.model.gemma import Gemma
from gemmakit.model.layers import Attention, config_norm, layer_type_inv_freqs

# --- the pieces --------------------------------------------------------------------------------


class Laurel(nn.Module):
    """Learned augmented residual: x + norm(right(left(x))), a rank-laurel_rank path beside
    attention (transformers Gemma3nTextLaurelBlock)."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.linear_left = nn.Linear(config.hidden_size, config.laurel_rank, bias=False)
        self.linear_right = nn.Linear(config.laurel_rank, config.hidden_size, bias=False)
        self.post_laurel_norm = config_norm(config, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


def gaussian_topk(gate: torch.Tensor, sparsity: float) -> torch.Tensor:
    """relu(gate - (mean + std * z)), z the standard normal's `sparsity` quantile: keeps about
    the top (1 - sparsity) of each row, assuming its values are Gaussian
    (transformers Gemma3nTextMLP._gaussian_topk)."""
    # The quantile is taken in float32 then rounded to the activation dtype, and the standard
    # deviation is the biased one, both as the reference does.
    target = torch.tensor(sparsity, dtype=torch.float32, device=gate.device)
    z = torch.distributions.normal.Normal(0, 1).icdf(target).to(gate.dtype)
    mean = gate.mean(dim=-1, keepdim=True)
    std = gate.std(dim=-1, keepdim=True, unbiased=False)
    return torch.relu(gate - (mean + std * z))


class SparseMLP(nn.Module):
    """down(gelu_tanh(sparsify(gate(x))) * up(x)) with the layer's own width; `sparsify` is
    Gaussian top-k on layers with an activation sparsity, the identity elsewhere."""

    def __init__(self, config: GemmaConfig, layer: int):
        super().__init__()
        width = config.layer_intermediate_size(layer)
        self.sparsity = config.layer_activation_sparsity(layer)
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        if self.sparsity > 0.0:
            gate = gaussian_topk(gate, self.sparsity)
        return self.down_proj(ops.geglu(gate, self.up_proj(x)))


class AltUp(nn.Module):
    """Alternating updates: N residual streams of which one (altup_active_idx) runs through
    the block; `predict` mixes the streams before it, `correct` spreads the block's change of
    the active stream over all of them (transformers Gemma3nTextAltUp)."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        n, c = config.altup_num_inputs, config.hidden_size
        self.num_streams, self.active = n, config.altup_active_idx
        self.coef_clip = config.altup_coef_clip
        self.correct_output_scale = nn.Parameter(torch.zeros(c))
        self.correction_coefs = nn.Linear(n, n, bias=False)
        self.prediction_coefs = nn.Linear(n, n * n, bias=False)
        self.modality_router = nn.Linear(c, n, bias=False)
        self.router_norm = config_norm(config, c)
        # A float32 scalar in the reference (router_input_scale buffer, not in checkpoints); an
        # explicit device keeps it real when the model is built under torch.device("meta").
        self.router_input_scale = float(torch.tensor(c**-1.0, dtype=torch.float32, device="cpu"))

    def router_modalities(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, N) routing weights in (-1, 1) from one stream (B, T, C); tanh in float32."""
        routed = self.modality_router(self.router_norm(x) * self.router_input_scale)
        return torch.tanh(routed.float()).type_as(x)

    def predict(self, streams: torch.Tensor) -> torch.Tensor:
        """streams (N, B, T, C) -> predictions (N, B, T, C): each stream plus a routed mix of all."""
        n = self.num_streams
        modalities = self.router_modalities(streams[self.active])  # (B, T, N)
        if self.training and self.coef_clip is not None:
            # The reference clamps the stored weight itself, in place and outside autograd, when
            # training: gradients then pass as if unclamped (transformers Gemma3nTextAltUp.predict).
            self.prediction_coefs.weight.data.clamp_(-self.coef_clip, self.coef_clip)
        # (B, T, N*N) -> (B, T, N, N), transposed so that row i of the product is stream i's mix.
        coefs = self.prediction_coefs(modalities).reshape(*modalities.shape[:-1], n, n).permute(0, 1, 3, 2)
        mixed = torch.matmul(streams.permute(1, 2, 3, 0), coefs)  # (B, T, C, N)
        return (mixed.permute(3, 0, 1, 2) + streams).type_as(streams)  # (N, B, T, C)

    def correct(self, predictions: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        """Adds the active stream's innovation (activated - its prediction), scaled per stream
        by routed coefficients plus one, to every prediction; (N, B, T, C)."""
        modalities = self.router_modalities(activated)  # (B, T, N)
        innovation = activated - predictions[self.active]  # (B, T, C)
        if self.training and self.coef_clip is not None:
            # Here the reference clamps a copy: no gradient beyond the clip.
            weight = self.correction_coefs.weight.clamp(-self.coef_clip, self.coef_clip)
            coefs = nn.functional.linear(modalities, weight) + 1.0  # (B, T, N)
        else:  # the module itself, so that a LoRA adapter on it applies (as under peft)
            coefs = self.correction_coefs(modalities) + 1.0
        coefs = coefs.permute(2, 0, 1).unsqueeze(-1)  # (N, B, T, 1)
        return (innovation * coefs + predictions).type_as(activated)

    def scale_corrected_output(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.correct_output_scale
        return (x.type_as(scale) * scale).type_as(x)


class Gemma3nBlock(nn.Module):
    """One Gemma 3n layer over the AltUp streams (transformers Gemma3nTextDecoderLayer):
    predict; attention and LAuReL on the normed active prediction, averaged with 1/sqrt(2);
    the MLP; correct; then the layer's per-layer input, gated by the corrected active stream,
    is added to every stream after the first."""

    def __init__(self, config: GemmaConfig, layer: int):
        super().__init__()
        c, p = config.hidden_size, config.hidden_size_per_layer_input
        self.layer_type = config.layer_types[layer]
        self.active = config.altup_active_idx
        self.correct_scale = config.altup_correct_scale
        self.altup = AltUp(config)
        self.input_layernorm = config_norm(config, c)
        self.laurel = Laurel(config)
        self.self_attn = Attention(config, self.layer_type, layer)
        self.post_attention_layernorm = config_norm(config, c)
        self.pre_feedforward_layernorm = config_norm(config, c)
        self.mlp = SparseMLP(config, layer)
        self.post_feedforward_layernorm = config_norm(config, c)
        self.per_layer_input_gate = nn.Linear(c, p, bias=False)
        self.per_layer_projection = nn.Linear(p, c, bias=False)
        self.post_per_layer_input_norm = config_norm(config, c)

    def forward(self, streams, rope, mask, per_layer_input, cache=None, shared_kv=None):
        """streams (N, B, T, C), per_layer_input (B, T, P) -> streams (N, B, T, C)."""
        predictions = self.altup.predict(streams)
        active = predictions[self.active]
        normed = self.input_layernorm(active)
        laurel = self.laurel(normed)
        attn = self.post_attention_layernorm(self.self_attn(normed, rope, mask, cache, shared_kv))
        h = (active + attn + laurel) / math.sqrt(2)
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        corrected = self.altup.correct(predictions, h)
        gate = corrected[self.active]
        if self.correct_scale:
            gate = self.altup.scale_corrected_output(gate)
        # Per-layer input: gelu_tanh(gate(x)) * input, projected back to C and normed.
        gated = ops.geglu(self.per_layer_input_gate(gate), per_layer_input)  # (B, T, P)
        added = self.post_per_layer_input_norm(self.per_layer_projection(gated))  # (B, T, C)
        # Added to every stream but the first, whichever is active, as the reference does.
        return torch.cat((corrected[:1], corrected[1:] + added))


# --- the model ---------------------------------------------------------------------------------


def _rounded(value: float, dtype: torch.dtype) -> float:
    """`value` made a float32 tensor, then rounded to `dtype`, as a Python float: multiplying
    by it equals multiplying by the reference's scalar buffers cast to the activation dtype."""
    return float(torch.tensor(value, dtype=torch.float32, device="cpu").to(dtype))


def _match_magnitude(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """x rescaled to the root-mean-square `target` (B, T, 1) per token; the magnitude is
    floored at sqrt(1e-5) (transformers Gemma3nTextModel.forward)."""
    magnitude = torch.sqrt(torch.mean(x**2, dim=-1, keepdim=True).clamp(min=1e-5))
    return x * target / magnitude


class Gemma3nModel(nn.Module):
    """Embeddings, per-layer inputs, AltUp projections, blocks and final norm: HF's `model.`."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        c, n = config.hidden_size, config.altup_num_inputs
        self.hidden_size, self.per_layer_width = c, config.hidden_size_per_layer_input
        per_layer = config.num_hidden_layers * config.hidden_size_per_layer_input
        self.embed_tokens = nn.Embedding(config.vocab_size, c, config.pad_token_id)
        self.embed_tokens_per_layer = nn.Embedding(
            config.vocab_size_per_layer_input, per_layer, config.pad_token_id
        )
        self.per_layer_model_projection = nn.Linear(c, per_layer, bias=False)
        self.per_layer_projection_norm = config_norm(config, config.hidden_size_per_layer_input)
        self.altup_projections = nn.ModuleList(nn.Linear(c, c, bias=False) for _ in range(1, n))
        self.altup_unembed_projections = nn.ModuleList(nn.Linear(c, c, bias=False) for _ in range(1, n))
        self.layers = nn.ModuleList(Gemma3nBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = config_norm(config, c)

    def per_layer_inputs(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """(B, T, L, P): each layer's slice of the per-layer embedding plus a normed projection
        of the token embedding, averaged with 1/sqrt(2) (Gemma3nTextModel.get_per_layer_inputs,
        project_per_layer_inputs)."""
        L, P = len(self.layers), self.per_layer_width
        dtype = embeds.dtype
        # Ids past the per-layer table (the multimodal tokens) read row 0.
        table = self.embed_tokens_per_layer
        in_table = (input_ids >= 0) & (input_ids < table.num_embeddings)
        rows = table(torch.where(in_table, input_ids, 0)).to(dtype) * _rounded(P**0.5, dtype)
        projected = self.per_layer_model_projection(embeds) * _rounded(self.hidden_size**-0.5, dtype)
        projected = self.per_layer_projection_norm(projected.reshape(*embeds.shape[:-1], L, P))
        inv_sqrt2 = float(torch.rsqrt(torch.tensor(2.0, device="cpu")).to(dtype))  # as the reference buffer
        return (projected + rows.reshape(*embeds.shape[:-1], L, P)) * inv_sqrt2

    def streams(self, h0: torch.Tensor) -> torch.Tensor:
        """(N, B, T, C): the embedding, then its AltUp projections at the embedding's magnitude."""
        target = torch.mean(h0**2, dim=-1, keepdim=True) ** 0.5
        return torch.stack([h0, *(_match_magnitude(proj(h0), target) for proj in self.altup_projections)])

    def merge_streams(self, streams: torch.Tensor) -> torch.Tensor:
        """(N, B, T, C) -> (B, T, C): stream 0 and the unembedded others at stream 0's
        magnitude, averaged."""
        target = torch.mean(streams[0] ** 2, dim=-1, keepdim=True) ** 0.5
        unembedded = (
            _match_magnitude(proj(s), target) for proj, s in zip(self.altup_unembed_projections, streams[1:])
        )
        return torch.mean(torch.stack([streams[0], *unembedded]), dim=0)


class Gemma3n(Gemma):
    """A Gemma 3n causal language model (`Gemma3nForCausalLM`, or the text tower of
    `Gemma3nForConditionalGeneration`), with Gemma's interface."""

    def __init__(self, config: GemmaConfig):
        nn.Module.__init__(self)
        if config.altup_num_inputs < 1:
            raise ConfigError("a Gemma 3n model needs altup_num_inputs >= 1")
        self.config = config
        self.model = Gemma3nModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.inv_freq = layer_type_inv_freqs(config)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states (B, T, C); the arguments are Gemma.hidden_states'."""
        positions, masks, layer_caches = self.attention_inputs(
            input_ids, attention_mask, positions, cache, segment_ids
        )
        m = self.model
        h0 = self.embed(m.embed_tokens, input_ids, self.config.embedding_scale)
        per_layer = m.per_layer_inputs(input_ids, h0)  # (B, T, L, P)
        ropes = self.ropes(positions, h0)
        streams = m.streams(h0)
        shared_kv = {}  # a KV-shared layer's source's keys and values, by source layer
        for i, (block, layer_cache) in enumerate(zip(m.layers, layer_caches)):
            t = block.layer_type
            streams = block(streams, ropes[t], masks[t], per_layer[:, :, i], layer_cache, shared_kv)
        return m.norm(m.merge_streams(streams))
