"""The C model step (csrc/decode_batch.c) over a GGUF file's own blocks, without torch.

`GGUFStep.open(gguf, config, capacity)` hands the memory-mapped file's matrices to the step
as `Mat`s of their block types (no copy: pointers into the mapping), with the norms' gains,
the RoPE frequencies and the embedding scale computed as the torch model computes them
(`loading.load_native_gguf` + `inference/c_decode.py`), so its logits equal the torch path's
bit for bit. It returns None where the torch path must run the file instead: a config the
step does not compute, a matrix in a type (or of a width) the C products do not run, or
norms and shapes other than the config's.

The keys and values live in one anonymous mapping sized for `capacity` positions (full
layers) or the sliding window (sliding layers, a ring), whose pages the kernel zeroes on
first touch: a short generation maps only what it writes.
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

from gemmakit.config import FULL, GemmaConfig
from gemmakit.formats.ggml_types import GGMLQuantizationType
from gemmakit.inference import step_structs as structs
from gemmakit.rope_frequencies import rope_frequencies

# llama.cpp's names of a block's seven matrices, by the Layer field that holds each
_MATRICES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
             "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}  # fmt: skip
# llama.cpp's names of a block's norms, by Layer field, and the config flag that asks for each
_NORMS = {
    "input_norm": ("attn_norm", None),
    "post_attention_norm": ("post_attention_norm", "use_post_norms"),
    "pre_feedforward_norm": ("ffn_norm", None),
    "post_feedforward_norm": ("post_ffw_norm", "use_post_norms"),
    "q_norm": ("attn_q_norm", "use_qk_norm"),
    "k_norm": ("attn_k_norm", "use_qk_norm"),
}
_FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
# Prompt rows per C step here: a step's buffers take ~45 kB a row for Gemma 3 270M (23 MiB of
# the peak at 512 rows, measured), and 256-row steps prefill as fast as 512-row ones (one
# thread, CPU time, loaded machine: 1,019-1,146 ms against 1,105-1,165 for 512 tokens), so the
# lean path, whose target is peak RSS, takes half the torch path's PREFILL_ROWS.
PROMPT_STEP_ROWS = 256


def _floats(g, name: str) -> np.ndarray:
    """A float tensor of the file as float32 values (a copy: the norms are small)."""
    raw, t = g.raw(name), g.tensors[name].ggml_type
    if t == GGMLQuantizationType.BF16:  # bfloat16 is float32's upper half
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


class GGUFStep:
    """One sequence through the C step over a GGUF file: `prefill(tokens)` runs a prompt from
    position 0 (rows of C steps), `step(token)` one token after it; each returns the logits
    (V,) of the next token, a float32 buffer the next call reuses."""

    def __init__(self, lib, g, config: GemmaConfig, capacity: int):
        self.lib, self.gguf, self.config, self.capacity = lib, g, config, capacity
        self.threads = structs.step_threads()
        self.position = 0
        self._keep: list = []
        self.logits = np.empty(config.vocab_size, dtype=np.float32)
        self._row = (ctypes.c_int64 * 3)()  # token, slot (0), position of a one-row step
        address, word = ctypes.addressof(self._row), ctypes.sizeof(ctypes.c_int64)
        self._batch = structs.Batch(
            rows=1, tokens=address, slots=address + word, positions=address + 2 * word,
            logits=self.logits.ctypes.data,
        )  # fmt: skip
        self.spec = None

    @classmethod
    def open(cls, lib, g, config: GemmaConfig, capacity: int) -> GGUFStep | None:
        """The step over `g` (a `formats.gguf.GGUFFile`) for sequences of up to `capacity`
        positions, or None where the file needs the torch path (see the module docstring)."""
        if lib is None or structs.unsupported_by_c_step(config) is not None:
            return None
        step = cls(lib, g, config, capacity)
        return step if step._build() else None

    # --- the structs -----------------------------------------------------------------------

    def _mat(self, name: str, shape: tuple[int, int]):
        """The Mat of the file's matrix `name` of `shape` (n, k), or None."""
        info = self.gguf.tensors.get(name)
        if info is None or info.shape != shape or info.ggml_type in _FLOAT_TYPES:
            return None
        if self.lib.gguf_row_bytes(int(info.ggml_type), shape[1]) < 0:
            return None
        raw = self.gguf.raw(name)  # a view of the mapping: the blocks as the file stores them
        return structs.Mat(
            type=structs.W_GGUF_BASE + int(info.ggml_type), w=raw.ctypes.data, s=None, n=shape[0], k=shape[1]
        )

    def _gain(self, name: str, size: int) -> int | None:
        """Pointer to the float32 gain 1 + w of the norm `name`, or None. llama.cpp stores
        Gemma 1-3 norms as w + 1 (formats/gguf.py state_dict_from_gguf); the torch model
        subtracts 1 in float32 and its RMSNorm adds it back (model/layers.py RMSNorm.gain), so
        the same two roundings are made here."""
        info = self.gguf.tensors.get(name)
        if info is None or info.shape != (size,) or info.ggml_type not in _FLOAT_TYPES:
            return None
        one = np.float32(1.0)
        gain = np.ascontiguousarray(one + (_floats(self.gguf, name) - one), dtype=np.float32)
        self._keep.append(gain)
        return gain.ctypes.data

    def _layer(self, i: int, kv_at: int, capacity: int):
        c = self.config
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        C, inter = c.hidden_size, c.intermediate_size
        shapes = {"q": (q, C), "k": (kv, C), "v": (kv, C), "o": (C, q),
                  "gate": (inter, C), "up": (inter, C), "down": (C, inter)}  # fmt: skip
        mats = {
            field: self._mat(f"blk.{i}.{_MATRICES[field]}.weight", shape) for field, shape in shapes.items()
        }
        norms = {}
        for field, (name, flag) in _NORMS.items():
            wanted = flag is None or getattr(c, flag)
            present = f"blk.{i}.{name}.weight" in self.gguf.tensors
            if wanted != present:  # the torch loader refuses such a file: let it say why
                return None
            size = c.head_dim if field in ("q_norm", "k_norm") else C
            norms[field] = self._gain(f"blk.{i}.{name}.weight", size) if wanted else 0
        if None in mats.values() or None in norms.values():
            return None
        kv_bytes = c.num_key_value_heads * capacity * c.head_dim * 4
        return structs.Layer(
            **mats, **norms, k_cache=kv_at, v_cache=kv_at + kv_bytes, capacity=capacity,
            group=structs.GROUPS.index(c.layer_types[i]),
        )  # fmt: skip

    def _capacities(self) -> list[int]:
        """Positions each layer's cache holds: the whole sequence (full layers) or the window
        (sliding layers: a ring, position p at p % window; the step stages a chunk's own keys,
        so a chunk may be longer than the ring)."""
        c, n = self.config, self.capacity
        return [n if kind == FULL else min(n, c.sliding_window or n) for kind in c.layer_types]

    def _build(self) -> bool:
        c = self.config
        capacities = self._capacities()
        per_position = 2 * c.num_key_value_heads * c.head_dim * 4  # keys and values, float32
        # anonymous memory: pages are zeroed by the kernel when first written, not here
        self._kv = mmap.mmap(-1, max(1, per_position * sum(capacities)))
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._kv))
        layers, at = [], base
        for i, capacity in enumerate(capacities):
            layer = self._layer(i, at, capacity)
            if layer is None:
                return False
            layers.append(layer)
            at += per_position * capacity
        embed = self._mat("token_embd.weight", (c.vocab_size, c.hidden_size))
        head_name = "token_embd.weight" if c.tie_word_embeddings else "output.weight"
        head = self._mat(head_name, (c.vocab_size, c.hidden_size))
        final_norm = self._gain("output_norm.weight", c.hidden_size)
        if embed is None or head is None or not final_norm:
            return False
        freqs = []
        for kind in structs.GROUPS:
            if kind not in c.layer_types:
                freqs.append(None)
                continue
            values = np.asarray(
                rope_frequencies(c.head_dim, c.rope_base(kind), c.rope_scale(kind)), dtype=np.float32
            )
            self._keep.append(values)
            freqs.append(values.ctypes.data)
        self.spec = structs.model_struct(
            c, layers, embed, head, final_norm, freqs,
            embed_scale=float(np.float32(c.embedding_scale)),  # the float32 model's rounding
            max_visible=max(capacities), cache_bf16=False, keep=self._keep,
        )  # fmt: skip
        return True

    # --- running ---------------------------------------------------------------------------

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Runs a prompt from position 0 (whatever the cache held: a new sequence); the
        logits after its last token."""
        if not tokens or len(tokens) > self.capacity:
            raise ValueError(f"a prompt of 1 to {self.capacity} tokens fits this step, not {len(tokens)}")
        address = self.logits.ctypes.data
        structs.prompt_rows(self.lib, self.spec, tokens, 0, 0, address, self.threads, PROMPT_STEP_ROWS)
        self.position = len(tokens)
        return self.logits

    def step(self, token: int) -> np.ndarray:
        """Feeds one token at the next position; the logits of the token after it."""
        if self.position >= self.capacity:
            raise ValueError(f"the sequence is full ({self.capacity} positions)")
        self._row[0], self._row[2] = token, self.position
        structs.run_step(self.lib, self.spec, self._batch, self.threads)
        self.position += 1
        return self.logits
