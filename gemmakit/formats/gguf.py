"""GGUF reading for Gemma: metadata, tensors, and the one rename table of the project.

The `gguf` package (llama.cpp's own) does the block dequantization. Its `GGUFReader` builds a
numpy view per vocabulary entry (measured: about 10 s for Gemma 3's 262k-token vocabulary), so
the header is parsed here directly, in one pass (`formats/gguf_metadata.py`: large arrays are
decoded only when read). Tensor data is memory-mapped and never copied until asked for.
"""

from __future__ import annotations

import math
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gemmakit.config import FULL, SLIDING, GemmaConfig
from gemmakit.errors import ConfigError, GemmakitError, ModelFileError
from gemmakit.formats.ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType
from gemmakit.formats.gguf_metadata import ARRAY, Cursor, GGUFMetadata
from gemmakit.hf_config import from_hf_config

if TYPE_CHECKING:  # torch is imported where tensors are made: reading a header needs none of it
    import torch

GGUF_MAGIC = b"GGUF"
# Types whose values are floats (read as they are), not blocks.
FLOAT_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16})
DEFAULT_ALIGNMENT = 32
# Values per dequantization chunk in GGUFFile.tensor: 16 MB in float32.
CHUNK_VALUES = 1 << 22


# GGUF architecture string -> HF architecture.
GGUF_ARCHITECTURES = {
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "gemma3n": "Gemma3nForCausalLM",
    "gemma4": "Gemma4ForCausalLM",
}

# The one HF <-> GGUF name table: llama.cpp tensor names (gguf-py constants.py TENSOR_NAMES,
# as convert_hf_to_gguf.py's Gemma*Model classes emit them) -> our (HF) names, whole names
# with their suffix, since llama.cpp adds `.weight` to some HF buffers and parameters
# (conversion/gemma.py filter_tensors: layer_scalar, the altup scale, the experts).
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    # Per-layer embeddings (Gemma 3n, Gemma 4 E2B/E4B).
    "inp_gate.weight": "per_layer_input_gate.weight",
    "proj.weight": "per_layer_projection.weight",
    "post_norm.weight": "post_per_layer_input_norm.weight",
    # Gemma 4: the block's output scale and the mixture of experts beside the dense MLP.
    "layer_output_scale.weight": "layer_scalar",
    "ffn_gate_inp.weight": "router.proj.weight",
    "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "ffn_gate_up_exps.weight": "experts.gate_up_proj",
    "ffn_down_exps.weight": "experts.down_proj",
    "pre_ffw_norm_2.weight": "pre_feedforward_layernorm_2.weight",
    "post_ffw_norm_1.weight": "post_feedforward_layernorm_1.weight",
    "post_ffw_norm_2.weight": "post_feedforward_layernorm_2.weight",
    # Gemma 3n: AltUp and LAuReL.
    "altup_correct_scale.weight": "altup.correct_output_scale",
    "altup_correct_coef.weight": "altup.correction_coefs.weight",
    "altup_predict_coef.weight": "altup.prediction_coefs.weight",
    "altup_router.weight": "altup.modality_router.weight",
    "altup_router_norm.weight": "altup.router_norm.weight",
    "laurel_l.weight": "laurel.linear_left.weight",
    "laurel_r.weight": "laurel.linear_right.weight",
    "laurel_post_norm.weight": "laurel.post_laurel_norm.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "per_layer_token_embd.weight": "model.embed_tokens_per_layer.weight",
    "per_layer_model_proj.weight": "model.per_layer_model_projection.weight",
    "per_layer_proj_norm.weight": "model.per_layer_projection_norm.weight",
}
# Gemma 3n's altup_num_inputs - 1 projections, stacked by llama.cpp into one 3-D tensor
# (conversion/gemma.py Gemma3NModel._stack_matrices): GGUF name -> HF name of entry k.
STACKED_NAMES = {
    "altup_proj.weight": "model.altup_projections.{}.weight",
    "altup_unembd_proj.weight": "model.altup_unembed_projections.{}.weight",
}
# K/V weights of a KV-shared layer: llama.cpp's gemma3n loader requires them on every layer
# (src/models/gemma3n.cpp, create_tensor_qkv) and Gemma 3n checkpoints from before transformers
# 5 carry them, but a shared layer never uses them and has none in transformers' model.
SHARED_LAYER_KV_TENSORS = ("attn_k.weight", "attn_v.weight", "attn_k_norm.weight")
# Gemma 4's proportional-RoPE frequency factors: derived from the config on reading, written
# from it on export (conversion/gemma.py Gemma4Model.generate_extra_tensors).
ROPE_FREQS = "rope_freqs.weight"
# What llama.cpp writes for the frequencies that do not rotate (a factor that sends them to 0).
UNROTATED_FREQ_FACTOR = 1e30


def gguf_to_hf_name(name: str) -> str | None:
    """Maps `blk.3.attn_q.weight` to `model.layers.3.self_attn.q_proj.weight`."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


_HF_GLOBAL = {h: g for g, h in _GLOBAL_NAMES.items()}
_HF_LAYER = {h: g for g, h in _LAYER_NAMES.items()}


def hf_to_gguf_name(name: str) -> str | None:
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _HF_LAYER:
        return f"blk.{parts[2]}.{_HF_LAYER[parts[3]]}"
    return None


def is_norm(hf_name: str) -> bool:
    return hf_name.endswith(("norm.weight", "layernorm.weight"))


@dataclass(frozen=True)
class TensorInfo:
    name: str
    # Shape in PyTorch order (the GGUF header stores it fastest-dimension first).
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int
    nbytes: int


class GGUFFile:
    """A GGUF file: `metadata` (a `GGUFMetadata` mapping), `tensors` (name -> TensorInfo), lazy
    tensor data."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._data = np.memmap(self.path, mode="r", dtype=np.uint8)
        except FileNotFoundError:
            raise ModelFileError(f"{self.path}: no such file") from None
        except (OSError, ValueError) as e:
            raise ModelFileError(f"{self.path}: cannot read ({e})") from None
        buf = memoryview(self._data)
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise ModelFileError(f"{self.path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
        try:
            self._read_header(buf)
        except (struct.error, ValueError, OverflowError, TypeError, KeyError, MemoryError) as e:
            # A damaged header can hold any value in a count or size field; whatever the
            # parser trips on, the user gets one line naming the file.
            raise ModelFileError(f"{self.path}: corrupt GGUF header ({type(e).__name__}: {e})") from None

    def _read_header(self, buf: memoryview):
        cur = Cursor(buf, self.path)
        cur.pos = 4
        self.version = cur.scalar(4)
        if self.version not in (2, 3):
            raise ModelFileError(f"{self.path}: unsupported GGUF version {self.version}")
        n_tensors, n_kv = cur.scalar(10), cur.scalar(10)
        self.metadata = GGUFMetadata(buf, self.path)
        for _ in range(n_kv):
            key = cur.string()
            start = cur.pos
            vtype = cur.scalar(4)
            value = cur.array_or_span() if vtype == ARRAY else cur.value(vtype)
            self.metadata._add(key, value, start, cur.pos)
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar(10) for _ in range(cur.scalar(4))]
            raw_type = cur.scalar(4)
            try:
                ggml_type = GGMLQuantizationType(raw_type)
            except ValueError:
                raise ModelFileError(f"{self.path}: tensor {name} has unknown type {raw_type}") from None
            block, type_size = GGML_QUANT_SIZES[ggml_type]
            # Rows are whole blocks (llama.cpp's gguf.cpp checks the same); a dimension of 0
            # holds nothing a Gemma model needs. Python ints: a hostile size cannot wrap.
            if any(d == 0 for d in dims) or (dims and dims[0] % block):
                raise ModelFileError(
                    f"{self.path}: tensor {name} has an impossible shape {dims} for {ggml_type.name}"
                )
            count = math.prod(dims)
            infos.append((name, tuple(reversed(dims)), ggml_type, cur.scalar(10), count // block * type_size))
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, (int, np.integer)) or isinstance(align, bool) or align <= 0:
            raise ModelFileError(f"{self.path}: general.alignment must be a positive integer, not {align!r}")
        align = int(align)
        self.data_offset = (cur.pos + align - 1) // align * align
        self.tensors = {
            name: TensorInfo(name, shape, t, self.data_offset + off, nbytes)
            for name, shape, t, off, nbytes in infos
        }
        if len(self.tensors) != len(infos):
            twice = next(n for i, (n, *_) in enumerate(infos) if any(n == m for m, *_ in infos[:i]))
            raise ModelFileError(f"{self.path}: corrupt GGUF header (tensor {twice} is listed twice)")
        for t in self.tensors.values():
            if t.nbytes < 0 or any(d < 0 for d in t.shape):
                raise ModelFileError(f"{self.path}: tensor {t.name} has an impossible shape {t.shape}")
        self._check_data_ranges()

    def _check_data_ranges(self):
        """Each tensor's bytes lie inside the file and belong to it alone (llama.cpp's gguf.cpp
        is stricter still: each tensor must start where the previous one ends, padded)."""
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        last = max(spans, key=lambda s: s[1], default=None)
        if last is not None and last[1] > len(self._data):
            raise ModelFileError(
                f"{self.path}: truncated: tensor {last[2]} needs bytes up to {last[1]:,}, "
                f"the file has {len(self._data):,}"
            )
        for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
            if start < end:
                raise ModelFileError(
                    f"{self.path}: corrupt GGUF header (the data of tensors {first} and {second} overlap)"
                )

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def map_in(self) -> None:
        """Maps every page of the file into this process now, so the first pass over the
        weights (a prompt's first step reads all of them) takes no page faults: Linux's
        MADV_POPULATE_READ (5.14+; 22 in <linux/mman.h>, which Python's mmap module does not
        name). A no-op elsewhere or where the kernel refuses; the pages are the page cache's,
        which the first step would map anyway, so peak RSS does not change."""
        if sys.platform != "linux":
            return
        try:
            self._data._mmap.madvise(22)
        except (AttributeError, OSError, ValueError):
            pass

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes (quantized types) or values (float types), zero-copy."""
        info = self.tensors[name]
        data = self._data[info.offset : info.offset + info.nbytes]
        if info.ggml_type == GGMLQuantizationType.F32:
            return data.view(np.float32).reshape(info.shape)
        if info.ggml_type == GGMLQuantizationType.F16:
            return data.view(np.float16).reshape(info.shape)
        if info.ggml_type == GGMLQuantizationType.BF16:
            return data.view(np.uint16).reshape(info.shape)
        return data.reshape(*info.shape[:-1], -1)

    def blocks(self, name: str) -> torch.Tensor:
        """A quantized 2-D tensor's bytes as uint8 (rows, bytes per row), a zero-copy view of
        the memory-mapped file (read-only: nothing may write to it)."""
        import torch

        raw = self.raw(name)
        with warnings.catch_warnings():  # torch warns that the mapping is not writable
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(raw.reshape(-1, raw.shape[-1]))

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor dequantized to `dtype` (default float32; bfloat16 stays bfloat16).

        A 2-D or larger tensor is decoded a few million values at a time, each chunk cast to
        `dtype` as it comes: the 262k x 640 embedding of Gemma 3 then never exists in float32
        (671 MB) beside its bfloat16 copy, nor do the gguf package's temporaries (about twice
        its float32 output) for the whole tensor. Blocks never span rows, so the values are
        those of a whole-tensor dequantization.
        """
        import torch

        info = self.tensors[name]
        if dtype is None:
            dtype = torch.bfloat16 if info.ggml_type == GGMLQuantizationType.BF16 else torch.float32
        raw = self.raw(name)
        if len(info.shape) < 2:
            return self._decode(name, raw).reshape(info.shape).to(dtype)
        cols = info.shape[-1]
        rows = raw.reshape(-1, raw.shape[-1])  # (rows, values or bytes per row)
        out = torch.empty(info.shape, dtype=dtype)
        flat = out.view(-1, cols)  # (rows, cols)
        step = max(1, CHUNK_VALUES // cols)
        for i in range(0, rows.shape[0], step):
            flat[i : i + step] = self._decode(name, rows[i : i + step]).reshape(-1, cols)
        return out

    def _decode(self, name: str, raw: np.ndarray) -> torch.Tensor:
        """Rows of raw data as float32 values (bfloat16 for a BF16 tensor)."""
        import torch

        ggml_type = self.tensors[name].ggml_type
        if ggml_type == GGMLQuantizationType.F32:
            return torch.from_numpy(np.array(raw))
        if ggml_type == GGMLQuantizationType.F16:
            return torch.from_numpy(raw.astype(np.float32))
        if ggml_type == GGMLQuantizationType.BF16:
            return torch.from_numpy(np.array(raw)).view(torch.bfloat16)
        from gguf import quants as gguf_quants

        try:
            return torch.from_numpy(gguf_quants.dequantize(np.ascontiguousarray(raw), ggml_type))
        except NotImplementedError:
            raise ModelFileError(
                f"{self.path}: tensor {name} uses {ggml_type.name}, which the gguf package cannot dequantize"
            ) from None


def config_from_gguf(g: GGUFFile) -> GemmaConfig:
    """Reads a GemmaConfig from GGUF metadata (llama.cpp's key names).

    A metadata value of the wrong kind (a string for a count, zero heads) or an invalid
    combination becomes one ModelFileError naming the file.
    """
    if "token_embd.weight" not in g.tensors:
        raise ModelFileError(f"{g.path}: no token_embd.weight tensor (not a complete Gemma model)")
    try:
        return _config_from_gguf(g)
    except ConfigError as e:
        raise ModelFileError(f"{g.path}: invalid model configuration: {e}") from None
    except (ValueError, TypeError, ZeroDivisionError, OverflowError, KeyError, IndexError) as e:
        raise ModelFileError(f"{g.path}: invalid GGUF metadata ({type(e).__name__}: {e})") from None


def _config_from_gguf(g: GGUFFile) -> GemmaConfig:
    arch = g.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise ModelFileError(
            f"{g.path}: architecture {arch or 'missing'!r} is not a Gemma text model "
            f"(expected one of {', '.join(GGUF_ARCHITECTURES)})"
        )
    md = g.metadata

    def get(key, default=None):
        value = md.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelFileError(f"{g.path}: metadata key {arch}.{key} is missing")
        return value

    if arch in ("gemma3n", "gemma4"):
        return from_hf_config(_per_layer_family_hf_config(g, get), name=g.path.name)
    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    if heads <= 0:
        raise ModelFileError(f"{g.path}: {arch}.attention.head_count must be positive, not {heads}")
    layers = int(get("block_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    tokens = "tokenizer.ggml.tokens"
    vocab = (md.array_length(tokens) if tokens in md else 0) or g.tensors["token_embd.weight"].shape[0]
    window = md.get(f"{arch}.attention.sliding_window")
    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
        max_position_embeddings=int(get("context_length", 8192)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in g.tensors,
        architecture=GGUF_ARCHITECTURES[arch], name=g.path.name,
    )  # fmt: skip
    # llama.cpp does not store query_pre_attn_scalar: it uses head_dim except for the 27B
    # models, where it uses hidden/heads (llama-model.cpp, LLM_TYPE_27B). Mirror that.
    qpas = md.get(f"{arch}.attention.scale")
    # Rounded: the scale is a float32 1/sqrt(q), so q comes back as 143.99999 for 144 (Gemma 2 27B).
    qpas = round(float(qpas) ** -2, 3) if qpas else None
    if arch == "gemma":
        return GemmaConfig(layer_types=(FULL,) * layers, model_type="gemma", **common)
    if arch == "gemma2":
        if qpas is None:
            qpas = hidden // heads if layers == 46 else head_dim
        return GemmaConfig(
            layer_types=tuple(SLIDING if i % 2 == 0 else FULL for i in range(layers)),
            sliding_window=int(window or 4096), query_pre_attn_scalar=qpas,
            attn_logit_softcapping=float(get("attn_logit_softcapping", 50.0)),
            final_logit_softcapping=float(get("final_logit_softcapping", 30.0)),
            use_post_norms=True, model_type="gemma2", **common,
        )  # fmt: skip
    if qpas is None:
        qpas = hidden // heads if layers == 62 else head_dim
    pattern = int(md.get(f"{arch}.attention.sliding_window_pattern", 6))
    scaling = md.get(f"{arch}.rope.scaling.type")
    factor = float(md.get(f"{arch}.rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0
    return GemmaConfig(
        layer_types=tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(layers)),
        sliding_window=int(window or 512), query_pre_attn_scalar=qpas,
        # llama.cpp hard-codes the local base of Gemma 3 (llama-model.cpp: 10000).
        rope_local_base_freq=10000.0, rope_scaling_factor=factor,
        use_qk_norm=True, use_post_norms=True, eos_token_ids=(1, 106), model_type="gemma3_text",
        **common,
    )  # fmt: skip


def _per_layer_family_hf_config(g: GGUFFile, get) -> dict[str, Any]:
    """The config.json keys of a gemma3n / gemma4 GGUF, for `from_hf_config` to read.

    The keys are those convert_hf_to_gguf.py writes (conversion/gemma.py Gemma3NModel and
    Gemma4Model set_gguf_parameters); what it does not write is read from the tensors
    (LAuReL rank, K = V, the PLE vocabulary, Gemma 4's rotary fraction) or left to
    transformers' defaults for the family (Gemma 3n's AltUp clip and output scaling).
    """
    arch, md, tensors = g.architecture, g.metadata, g.tensors
    layers = int(get("block_count"))
    sliding = [bool(x) for x in np.atleast_1d(get("attention.sliding_window_pattern"))]
    if len(sliding) != layers:
        raise ModelFileError(f"{g.path}: {arch}.attention.sliding_window_pattern must list every layer")
    types = [SLIDING if s else FULL for s in sliding]
    ff = np.atleast_1d(get("feed_forward_length")).tolist()
    rope_full: dict[str, Any] = {"rope_type": "default", "rope_theta": float(get("rope.freq_base"))}
    if md.get(f"{arch}.rope.scaling.type") == "linear":
        rope_full["factor"] = float(get("rope.scaling.factor"))
    raw: dict[str, Any] = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "hidden_size": int(get("embedding_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": int(get("attention.head_count")),
        "max_position_embeddings": int(get("context_length", 8192)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "sliding_window": int(get("attention.sliding_window")),
        "layer_types": types,
        "final_logit_softcapping": md.get(f"{arch}.final_logit_softcapping"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "num_kv_shared_layers": int(get("attention.shared_kv_layers", 0)),
        "hidden_size_per_layer_input": int(get("embedding_length_per_layer_input", 0)),
        "bos_token_id": int(md.get("tokenizer.ggml.bos_token_id", 2)),
        "eos_token_id": int(md.get("tokenizer.ggml.eos_token_id", 1)),
        "pad_token_id": int(md.get("tokenizer.ggml.padding_token_id", 0)),
    }
    if "per_layer_token_embd.weight" in tensors:  # else unused: the family's default stays
        raw["vocab_size_per_layer_input"] = tensors["per_layer_token_embd.weight"].shape[0]
    if arch == "gemma3n":
        raw["head_dim"] = int(get("attention.key_length"))
        raw["num_key_value_heads"] = int(get("attention.head_count_kv"))
        raw["intermediate_size"] = ff if len(ff) > 1 else ff[0]
        raw["activation_sparsity_pattern"] = [
            _normal_cdf(x) for x in np.atleast_1d(get("activation_sparsity_scale")).tolist()
        ]
        raw["altup_num_inputs"] = int(get("altup.num_inputs"))
        raw["altup_active_idx"] = int(get("altup.active_idx"))
        raw["laurel_rank"] = tensors["blk.0.laurel_l.weight"].shape[0]
        raw["rope_parameters"] = {
            SLIDING: {"rope_type": "default", "rope_theta": float(get("rope.freq_base_swa", 10000.0))},
            FULL: rope_full,
        }
        return raw
    raw.update(_gemma4_attention_keys(g, get, types, ff, rope_full))
    if md.get(f"{arch}.expert_count"):
        raw.update(
            enable_moe_block=True, num_experts=int(get("expert_count")),
            top_k_experts=int(get("expert_used_count")),
            moe_intermediate_size=int(get("expert_feed_forward_length")),
        )  # fmt: skip
    return raw


def _gemma4_attention_keys(g: GGUFFile, get, types, ff, rope_full) -> dict[str, Any]:
    """Gemma 4's per-type head dims and KV heads, K = V, MLP widths and proportional RoPE."""
    n = len(types)
    shared = int(get("attention.shared_kv_layers", 0))
    full = [i for i, t in enumerate(types) if t == FULL]
    global_dim = int(get("attention.key_length"))
    out: dict[str, Any] = {"head_dim": int(get("attention.key_length_swa")), "global_head_dim": global_dim}
    kv = np.atleast_1d(get("attention.head_count_kv")).tolist()
    sliding_kv = next((kv[i] for i, t in enumerate(types) if t == SLIDING), kv[0]) if len(kv) > 1 else kv[0]
    out["num_key_value_heads"] = int(sliding_kv)
    if len(kv) > 1 and full:  # per-type KV heads: what transformers' per_layer_config says
        out["per_layer_config"] = {
            str(i): {"head_dim": global_dim, "num_key_value_heads": int(kv[i])} for i in full
        }
    # K = V is not a key: llama.cpp uses the keys as values where a layer has no attn_v
    # (src/models/gemma4.cpp, "v_proj is optional").
    producing_full = [i for i in full if i < n - shared]
    out["attention_k_eq_v"] = bool(producing_full) and all(
        f"blk.{i}.attn_v.weight" not in g.tensors for i in producing_full
    )
    out["intermediate_size"] = int(ff[0])
    # An array of widths is how the converter writes the double-wide MLP of the shared layers.
    out["use_double_wide_mlp"] = len(ff) > 1 and shared > 0 and int(ff[-1]) == 2 * int(ff[0])
    partial = 1.0
    if ROPE_FREQS in g.tensors:
        factors = g.tensor(ROPE_FREQS).numpy()
        partial = 2 * int(np.sum(factors < UNROTATED_FREQ_FACTOR)) / global_dim
    out["rope_parameters"] = {
        SLIDING: {"rope_type": "default", "rope_theta": float(get("rope.freq_base_swa", 10000.0))},
        FULL: {**rope_full, "rope_type": "proportional", "partial_rotary_factor": partial},
    }
    return out


def _normal_cdf(x: float) -> float:
    """The sparsity a Gemma 3n layer was given, from the standard-normal quantile llama.cpp
    stores (conversion/gemma.py: Normal(0, 1).icdf(p) in float32); rounded to 6 decimals,
    which undoes the float32 rounding of the quantile (0.95 comes back as 0.9500000xx)."""
    if x == float("-inf"):
        return 0.0
    return round(0.5 * math.erfc(-x / math.sqrt(2.0)), 6)


def state_dict_from_gguf(
    g: GGUFFile, dtype: torch.dtype | None = None, config: GemmaConfig | None = None, skip=frozenset()
) -> dict[str, torch.Tensor]:
    """All tensors under HF names, dequantized to `dtype`, converted back from llama.cpp's forms.

    llama.cpp stores Gemma 1-3 RMSNorm weights as w + 1 (convert_hf_to_gguf.py, Gemma*Model
    `data_torch + 1`; Gemma 3 `norm_shift`), because its RMSNorm multiplies by w alone; Gemma
    3n and 4 already multiply by w (`config.norm_unit_offset` False) and are stored as they
    are. Gemma 3n's stacked AltUp projections are split back into one tensor each, and
    Gemma 4's `rope_freqs` (RoPE factors the config already implies) is dropped. Each tensor
    is dequantized chunk by chunk straight into `dtype` (`GGUFFile.tensor`), so a bfloat16
    load never holds a float32 copy of a big tensor. GGUF names in `skip` are left out (the
    loader keeps those in their blocks).
    """
    import torch

    dtype = dtype or torch.float32
    config = config or config_from_gguf(g)
    out = {}
    for name in g.tensors:
        if name == ROPE_FREQS or name in skip or _unused_shared_kv(name, config):
            continue
        if name in STACKED_NAMES:
            for k, part in enumerate(g.tensor(name, dtype).unbind(0)):  # (n - 1, D, D) -> n - 1 x (D, D)
                out[STACKED_NAMES[name].format(k)] = part.clone()
            continue
        hf = gguf_to_hf_name(name)
        if hf is None:
            raise ModelFileError(f"{g.path}: unexpected tensor {name!r} for a Gemma model")
        if is_norm(hf) and config.norm_unit_offset:  # small vectors: subtract in float32, then cast
            out[hf] = (g.tensor(name, torch.float32) - 1.0).to(dtype)
        else:
            out[hf] = g.tensor(name, dtype)
    return out


def _unused_shared_kv(name: str, config: GemmaConfig) -> bool:
    parts = name.split(".", 2)
    return (
        len(parts) == 3
        and parts[0] == "blk"
        and parts[2] in SHARED_LAYER_KV_TENSORS
        and not config.layer_owns_kv(int(parts[1]))
    )


def gguf_tensors(state: dict[str, torch.Tensor]) -> list[tuple[str, list[str], torch.Tensor]]:
    """The GGUF tensors of an HF state dict: (GGUF name, the HF names it holds, tensor).

    The inverse of `state_dict_from_gguf` for the names: stacked tensors (Gemma 3n AltUp) are
    stacked here; values are left as they are (the writer shifts norms and casts).
    """
    import torch

    out, stacked = [], set()
    for g_name, pattern in STACKED_NAMES.items():
        names = []
        while pattern.format(len(names)) in state:
            names.append(pattern.format(len(names)))
        if names:
            out.append((g_name, names, torch.stack([state[n] for n in names])))  # (n - 1, D, D)
            stacked.update(names)
    for hf_name, t in state.items():
        if hf_name in stacked:
            continue
        g_name = hf_to_gguf_name(hf_name)
        if g_name is None:
            raise GemmakitError(f"no GGUF name for tensor {hf_name!r}")
        out.append((g_name, [hf_name], t))
    return out
