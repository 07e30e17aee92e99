"""Parameters of the multimodal towers beside a Gemma text model, from their config.json halves.

gemmakit runs the text model only; these counts let `inspect` put a multimodal checkpoint's
total beside the published one. Parameters only, as transformers' numel counts them (Gemma 4's
clipping bounds and standardization vectors are buffers). Keys a config omits take the
defaults of transformers' config classes (configuration_gemma3.py SiglipVisionConfig,
configuration_gemma4.py Gemma4VisionConfig / Gemma4AudioConfig).
"""

from __future__ import annotations

from typing import Any


def siglip_params(vision: dict[str, Any], text_hidden: int) -> int:
    """SigLIP vision tower (no pooling head) plus Gemma 3's projection into the text width.

    transformers SiglipVisionModel: a patch conv with bias, a position embedding per patch,
    per layer two LayerNorms (weight + bias), q/k/v/o and fc1/fc2 with biases, a final
    LayerNorm; Gemma3MultiModalProjector: a (vision, text) matrix and an RMSNorm.
    """
    if not vision:
        return 0
    d, inter = int(vision.get("hidden_size", 1152)), int(vision.get("intermediate_size", 4304))
    layers, patch = int(vision.get("num_hidden_layers", 27)), int(vision.get("patch_size", 14))
    image, channels = int(vision.get("image_size", 896)), int(vision.get("num_channels", 3))
    per_layer = 2 * 2 * d + 4 * (d * d + d) + (d * inter + inter) + (inter * d + d)
    embed = channels * patch * patch * d + d + (image // patch) ** 2 * d
    head = (
        0
        if not vision.get("vision_use_head", False)
        else d * d * 4 + 4 * d + d * inter * 2 + inter + d + 3 * d
    )
    projector = d * text_hidden + d
    return embed + layers * per_layer + 2 * d + head + projector


def gemma4_vision_params(vision: dict[str, Any], text_hidden: int) -> int:
    """Gemma 4's vision encoder and its embedder into the text width.

    transformers Gemma4VisionModel: a bias-free patch projection (3 * patch^2 -> d), a
    (2, position_embedding_size, d) position table; per layer q/k/v/o without biases (KV heads
    of their own), q_norm and k_norm over head_dim (v_norm has no weight), a gated MLP and four
    RMSNorms; the pooler has no parameters. Gemma4MultimodalEmbedder: a (text, d) projection
    after a weightless norm.
    """
    d, inter = int(vision.get("hidden_size", 768)), int(vision.get("intermediate_size", 3072))
    heads, head_dim = int(vision.get("num_attention_heads", 12)), int(vision.get("head_dim", 64))
    kv = int(vision.get("num_key_value_heads", heads))
    patch, positions = (
        int(vision.get("patch_size", 16)),
        int(vision.get("position_embedding_size", 10 * 1024)),
    )
    attention = 2 * d * heads * head_dim + 2 * d * kv * head_dim + 2 * head_dim
    per_layer = attention + 3 * d * inter + 4 * d
    embed = 3 * patch * patch * d + 2 * positions * d
    return embed + int(vision.get("num_hidden_layers", 16)) * per_layer + d * text_hidden


def gemma4_audio_params(audio: dict[str, Any], text_hidden: int) -> int:
    """Gemma 4's conformer audio encoder and its embedder into the text width.

    transformers Gemma4AudioModel: two bias-free 3x3 subsampling convolutions, each with a
    bias-free LayerNorm, and a projection of (channels[0] / 4) * channels[1] features to d;
    per layer two feed-forward blocks (d -> 4d -> d, two RMSNorms each), attention with q/k/v,
    its output ("post") and a relative-position key projection (d x d each) and a per-dim
    scale, a light convolution (d -> 2d GLU, a depthwise kernel, d -> d, two RMSNorms) and
    three more RMSNorms; an output projection with bias. Gemma4MultimodalEmbedder: a
    (text, output_proj_dims) projection after a weightless norm.
    """
    d, layers = int(audio.get("hidden_size", 1024)), int(audio.get("num_hidden_layers", 12))
    head_dim = d // int(audio.get("num_attention_heads", 8))
    c0, c1 = (int(c) for c in audio.get("subsampling_conv_channels", (128, 32)))
    out, kernel = int(audio.get("output_proj_dims", 1536)), int(audio.get("conv_kernel_size", 5))
    subsample = 9 * c0 + c0 + 9 * c0 * c1 + c1 + (c0 // 4) * c1 * d
    feed_forward = 2 * (8 * d * d + 2 * d)
    attention = 5 * d * d + head_dim
    light_conv = 3 * d * d + d * kernel + 2 * d
    per_layer = feed_forward + attention + light_conv + 3 * d
    return subsample + layers * per_layer + out * d + out + out * text_hidden
