"""GGUF reading for Gemma: metadata, tensors, and the one rename table of the project.

The `gguf` package (llama.cpp's own) does the block dequantization. Its `GGUFReader` builds a
numpy view per vocabulary entry (measured: about 10 s for Gemma 3's 262k-token vocabulary), so
the header is parsed here directly: one pass over the key/value section, string arrays
decoded in a loop, numeric arrays as numpy views. Tensor data is memory-mapped and never
copied until asked for.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from gemmakit.config import FULL, SLIDING, GemmaConfig
from gemmakit.errors import ModelFileError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# Values per dequantization chunk in GGUFFile.tensor: 16 MB in float32.
CHUNK_VALUES = 1 << 22

# GGUF value types (gguf-py constants.GGUFValueType).
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
_NUMPY_TYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
                6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}  # fmt: skip
_STRING, _ARRAY = 8, 9

# GGUF architecture string -> HF architecture.
GGUF_ARCHITECTURES = {
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}

# llama.cpp tensor names (gguf-py tensor_mapping.py) -> our (HF) names. `{i}` is the layer.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def gguf_to_hf_name(name: str) -> str | None:
    """Maps `blk.3.attn_q.weight` to `model.layers.3.self_attn.q_proj.weight`."""
    base, _, suffix = name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def hf_to_gguf_name(name: str) -> str | None:
    base, _, suffix = name.rpartition(".")
    for g, h in _GLOBAL_NAMES.items():
        if base == h:
            return f"{g}.{suffix}"
    if base.startswith("model.layers."):
        _, _, layer, rest = base.split(".", 3)
        for g, h in _LAYER_NAMES.items():
            if rest == h:
                return f"blk.{layer}.{g}.{suffix}"
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


class _Cursor:
    """Sequential little-endian reads over a bytes-like buffer."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int):
        if self.pos + n > len(self.buf):
            raise ModelFileError(f"{self.path}: truncated GGUF header (ends at byte {len(self.buf)})")

    def scalar(self, vtype: int):
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is None:
            raise ModelFileError(f"{self.path}: corrupt GGUF header (value type {vtype})")
        size = struct.calcsize(fmt)
        self.need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.scalar(10)
        self.need(n)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar(4), self.scalar(10)
            if etype == _STRING:
                return self.string_array(count)
            if etype in _NUMPY_TYPES:
                dtype = np.dtype(_NUMPY_TYPES[etype])
                self.need(count * dtype.itemsize)
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                return arr.copy()
            return [self.value(etype) for _ in range(count)]
        return self.scalar(vtype)

    def string_array(self, count: int) -> list[str]:
        buf, pos, out = self.buf, self.pos, []
        unpack, end = struct.Struct("<Q").unpack_from, len(buf)
        append = out.append
        for _ in range(count):
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > end:
                raise ModelFileError(f"{self.path}: truncated GGUF string array")
            append(str(buf[pos : pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        return out


class GGUFFile:
    """A GGUF file: `metadata` (dict), `tensors` (name -> TensorInfo), lazy tensor data."""

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
        cur = _Cursor(buf, self.path)
        cur.pos = 4
        self.version = cur.scalar(4)
        if self.version not in (2, 3):
            raise ModelFileError(f"{self.path}: unsupported GGUF version {self.version}")
        n_tensors, n_kv = cur.scalar(10), cur.scalar(10)
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar(4))
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
            count = int(np.prod(dims)) if dims else 1
            infos.append((name, tuple(reversed(dims)), ggml_type, cur.scalar(10), count // block * type_size))
        align = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        self.data_offset = (cur.pos + align - 1) // align * align
        self.tensors = {
            name: TensorInfo(name, shape, t, self.data_offset + off, nbytes)
            for name, shape, t, off, nbytes in infos
        }
        end = max((t.offset + t.nbytes for t in self.tensors.values()), default=self.data_offset)
        if end > len(self._data):
            raise ModelFileError(
                f"{self.path}: truncated: tensor data needs {end:,} bytes, file has {len(self._data):,}"
            )

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

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

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor dequantized to `dtype` (default float32; bfloat16 stays bfloat16).

        A 2-D or larger tensor is decoded a few million values at a time, each chunk cast to
        `dtype` as it comes: the 262k x 640 embedding of Gemma 3 then never exists in float32
        (671 MB) beside its bfloat16 copy, nor do the gguf package's temporaries (about twice
        its float32 output) for the whole tensor. Blocks never span rows, so the values are
        those of a whole-tensor dequantization.
        """
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
        ggml_type = self.tensors[name].ggml_type
        if ggml_type == GGMLQuantizationType.F32:
            return torch.from_numpy(np.array(raw))
        if ggml_type == GGMLQuantizationType.F16:
            return torch.from_numpy(raw.astype(np.float32))
        if ggml_type == GGMLQuantizationType.BF16:
            return torch.from_numpy(np.array(raw)).view(torch.bfloat16)
        try:
            return torch.from_numpy(gguf_quants.dequantize(np.ascontiguousarray(raw), ggml_type))
        except NotImplementedError:
            raise ModelFileError(
                f"{self.path}: tensor {name} uses {ggml_type.name}, which the gguf package cannot dequantize"
            ) from None


def config_from_gguf(g: GGUFFile) -> GemmaConfig:
    """Reads a GemmaConfig from GGUF metadata (llama.cpp's key names)."""
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

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    layers = int(get("block_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    vocab = len(md.get("tokenizer.ggml.tokens", [])) or g.tensors["token_embd.weight"].shape[0]
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


def state_dict_from_gguf(g: GGUFFile, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All tensors under HF names, dequantized to `dtype`, with llama.cpp's `norm + 1` undone.

    llama.cpp stores Gemma RMSNorm weights as w + 1 (convert_hf_to_gguf.py, Gemma*Model
    `data_torch + 1`; Gemma 3 `norm_shift`), because its RMSNorm multiplies by w alone. Each
    tensor is dequantized chunk by chunk straight into `dtype` (`GGUFFile.tensor`), so a
    bfloat16 load never holds a float32 copy of a big tensor.
    """
    out = {}
    for name in g.tensors:
        hf = gguf_to_hf_name(name)
        if hf is None:
            raise ModelFileError(f"{g.path}: unexpected tensor {name!r} for a Gemma model")
        if is_norm(hf):  # small vectors: subtract in float32, then cast
            out[hf] = (g.tensor(name, torch.float32) - 1.0).to(dtype)
        else:
            out[hf] = g.tensor(name, dtype)
    return out
