"""Drives the C model step (csrc/decode_batch.c): one sequence over the torch model's KVCache
(its prompt as the rows of C steps, then one row a step), or R rows over the serving
engine's slot cache (decoding rows and prompt chunks in one call).

`decoder(model, cache, batch)` returns a `CDecoder` when the C step can run this model as
the torch model (gemmakit/model/) does: one sequence on the CPU, every matrix float32,
bfloat16, int8 weight-only (gemmakit's int8 quantization), GPTQ / AWQ 4-bit (csrc/packed4.c)
or GGUF blocks of a type csrc/gguf_blocks.c runs (a GGUF loaded with its own types), no
adapters, no training. Else it returns None and the caller runs the torch model. Activations are float32 in the step; a
float32 model therefore decodes as the torch model does up to the order of additions
(tests/test_c_decode.py), while a bfloat16 model keeps bfloat16 weights and KV cache but is
not rounded to bfloat16 after every operation, as llama.cpp runs its 16-bit files. The C step
reads the model's own weight and KV-cache tensors (no copies; the sequence is slot 0 of a
one-row step) and the cache's bookkeeping stays the cache's (`KVCache.append_dense`), so a
generation can switch between the two paths at any step.

`batch_decoder(model, layer_kv)` returns a `BatchDecoder` for the serving engine's slot
cache under the same conditions: its `step(tokens, slots, positions, logit_rows)` runs R
rows, each at its own slot and position (the rows of one slot a run of consecutive
positions, of any length), reading every weight matrix once for all rows, the output head
for `logit_rows` only; a row's logits are the same, bit for bit, whatever else is in its
step (tests/test_c_batch.py, tests/test_c_step_rows.py). The
structs handed to C (Mat, Layer, Model, Batch) and the weight type codes are those
csrc/gemmakit_kernels.h declares (kernels/bindings.py).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from gemmakit.config import FULL
from gemmakit.inference import step_structs
from gemmakit.inference.step_structs import (  # noqa: F401 (the names callers read here)
    GROUPS,
    PREFILL_ROWS,
    STEP_ERRORS,
    W_BF16,
    W_F32,
    W_GGUF_BASE,
    W_INT8,
    W_PACKED4,
    unsupported_by_c_step,
)
from gemmakit.kernels import cpu as cpu_kernels
from gemmakit.model.cache import KVCache
from gemmakit.model.gemma import Gemma
from gemmakit.model.layers import RMSNorm
from gemmakit.quant.gguf_blocks import GGUFLinear
from gemmakit.quant.gptq_linear import GPTQLinear, StoredHalfLinear
from gemmakit.quant.linear import Int8Linear, QuantizedEmbedding

_Mat, _Layer, _Model, _Batch = step_structs.Mat, step_structs.Layer, step_structs.Model, step_structs.Batch
WEIGHT_TYPES = {torch.float32: W_F32, torch.bfloat16: W_BF16}


def _plain(t: torch.Tensor) -> bool:
    """A contiguous CPU tensor of a dtype the C step reads."""
    return t.dtype in WEIGHT_TYPES and t.device.type == "cpu" and t.is_contiguous()


def _matrix(weight_type: int, w: torch.Tensor, scale: torch.Tensor | None = None):
    """A Mat over the (n, k) weight `w` (and for int8 its row scales)."""
    n, k = w.shape
    return _Mat(type=weight_type, w=w.data_ptr(), s=None if scale is None else scale.data_ptr(), n=n, k=k)


def _mat(module: nn.Module, keep: list):
    """The C view of a linear layer's matrix, or None when the C step cannot read it."""
    if isinstance(module, GGUFLinear):  # the file's blocks as they are (csrc/gguf_blocks.c)
        w = module.weight
        if (
            w.device.type != "cpu"
            or not w.is_contiguous()
            or not cpu_kernels.gguf_row_bytes(module.ggml_type, module.in_features)
        ):
            return None
        return _Mat(
            type=W_GGUF_BASE + module.ggml_type,
            w=w.data_ptr(),
            s=None,
            n=module.out_features,
            k=module.in_features,
        )
    if isinstance(module, GPTQLinear):  # GPTQ / AWQ 4-bit, repacked once (csrc/packed4.c)
        tensors = module.c_tensors()
        if tensors is None or not cpu_kernels.packed4_supported(module.in_features, module.group_size):
            return None
        packed = cpu_kernels.packed4_struct(tensors, module.group_size)
        keep.append(packed)
        n, k = module.out_features, module.in_features
        return _Mat(type=W_PACKED4, w=ctypes.addressof(packed), s=None, n=n, k=k)
    if isinstance(module, StoredHalfLinear) and _plain(module.weight):  # a GPTQ/AWQ bf16 head
        return _matrix(WEIGHT_TYPES[module.weight.dtype], module.weight)
    if isinstance(module, Int8Linear):
        w, s = module.weight, module.weight_scale.float().contiguous()
        if w.device.type != "cpu" or not w.is_contiguous():
            return None
        keep.append(s)
        return _matrix(W_INT8, w, s)
    if type(module) is nn.Linear and module.bias is None and _plain(module.weight):
        return _matrix(WEIGHT_TYPES[module.weight.dtype], module.weight)
    return None


def _gain(norm: nn.Module, keep: list) -> int | None:
    """Pointer to a norm's 1 + w in float32; 0 for an identity (absent) norm; None if unusable."""
    if isinstance(norm, nn.Identity):
        return 0
    if type(norm) is not RMSNorm:
        return None
    gain = norm.gain().contiguous()
    keep.append(gain)
    return gain.data_ptr()


class CDecoder:
    """Runs decode steps of one sequence in C against `model` and `cache`: one-row calls of
    the batched step (csrc/decode_batch.c), the cache's batch row 0 as slot 0."""

    def __init__(self, lib, model: Gemma, cache: KVCache, spec: _Model, keep: list):
        # The model, cache and `keep` (derived tensors, the layer array) own the memory `spec`
        # points into: they live as long as the decoder.
        self.lib, self.model, self.cache, self.spec, self._keep = lib, model, cache, spec, keep
        self.logits = torch.empty((1, model.config.vocab_size), dtype=torch.float32)
        # token, slot (0), position: a ctypes array, set without a torch op (a forked child's
        # torch thread pool is gone; the C step starts its own)
        self._row = (ctypes.c_int64 * 3)()
        address, size = ctypes.addressof(self._row), ctypes.sizeof(ctypes.c_int64)
        self._batch = _Batch(
            rows=1,
            tokens=address,
            slots=address + size,
            positions=address + 2 * size,
            logits=self.logits.data_ptr(),
        )
        self._dense: bool | None = None
        self.block_weights = block_weights(spec)

    def prefill(self, tokens: list[int]) -> torch.Tensor | None:
        """Feeds a whole prompt into the empty cache as rows of the C step; the logits (1, V)
        of the token after it (the buffer `step` reuses), or None when the cache already
        holds tokens (the caller runs the torch model). Every row's keys and values are those
        the one-token steps would store, so decoding goes on as after them."""
        cache = self.cache
        if cache.length or not tokens or len(tokens) > cache.max_length:
            return None
        prefill_rows(self.lib, self.spec, tokens, 0, 0, self.logits)
        for _ in tokens:  # the cache's bookkeeping, as the one-token steps keep it
            cache.append_dense()
        self._dense = True
        return self.logits

    def step(self, token: int) -> torch.Tensor | None:
        """Feeds one token; the logits (1, V) of the next one (a buffer reused each step), or
        None when the C step does not apply to this cache (the caller runs the torch model)."""
        cache = self.cache
        col = cache.length
        if col >= cache.max_length:
            return None
        if self._dense is None:  # after the prefill: does every column so far hold a token?
            self._dense = bool(cache.valid[0, :col].all())
        if not self._dense:  # a left-padded row: the torch step builds the masks
            return None
        # Dense: column c is position c, kept at c % capacity of each group (a sliding group's
        # ring), where the batched step stores and finds it; the cache keeps its bookkeeping.
        cache.append_dense()
        self._row[0], self._row[2] = token, col
        if self.lib.decode_batch(ctypes.byref(self.spec), ctypes.byref(self._batch), torch.get_num_threads()):
            raise MemoryError("the C decode step could not allocate its buffers")
        return self.logits


def _layer(block: nn.Module, k: torch.Tensor, v: torch.Tensor, keep: list):
    """The C view of one decoder block and its keys and values (capacity: dimension 2), or
    None when the C step cannot run it."""
    attn, mlp = block.self_attn, block.mlp
    projections = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj}
    projections |= {"gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}
    mats = {name: _mat(module, keep) for name, module in projections.items()}
    norms = {
        "input_norm": _gain(block.input_layernorm, keep),
        "post_attention_norm": _gain(block.post_attention_layernorm, keep),
        "pre_feedforward_norm": _gain(block.pre_feedforward_layernorm, keep),
        "post_feedforward_norm": _gain(block.post_feedforward_layernorm, keep),
        "q_norm": _gain(attn.q_norm, keep),
        "k_norm": _gain(attn.k_norm, keep),
    }
    if None in mats.values() or None in norms.values() or not (_plain(k) and _plain(v)):
        return None
    if not norms["input_norm"] or not norms["pre_feedforward_norm"]:  # the step always applies these
        return None
    return _Layer(
        **mats,
        **norms,
        k_cache=k.data_ptr(),
        v_cache=v.data_ptr(),
        capacity=k.shape[2],
        group=GROUPS.index(block.layer_type),
    )


def _embedding(model: Gemma, keep: list):
    """The C view of the token embedding matrix, or None when the C step cannot read it."""
    embed = model.model.embed_tokens
    if isinstance(embed, QuantizedEmbedding):
        return _mat(embed.source, keep)
    if type(embed) is nn.Embedding and _plain(embed.weight):
        return _matrix(WEIGHT_TYPES[embed.weight.dtype], embed.weight)
    return None


def block_weights(spec: _Model) -> bool:
    """Whether every layer's matrices are GGUF blocks: only then is a prompt faster as rows
    of the C step than through torch, whose float matmuls beat the C step's products over
    plain weights (a 512-token prompt, bfloat16, quiet machine: 1,110 tok/s through torch,
    407 as rows of the C step)."""
    return all(spec.layers[i].q.type >= W_GGUF_BASE for i in range(spec.n_layers))


def _runnable(model: Gemma) -> bool:
    """Whether a C step may run `model`: inference on the CPU in a dtype it reads, a config
    it computes, and the kernels' library built."""
    if model.training or torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        return False
    if model.device.type != "cpu" or model.dtype not in WEIGHT_TYPES:
        return False
    return unsupported_by_c_step(model.config) is None and cpu_kernels.library() is not None


def _model_spec(model: Gemma, kv: list[tuple[torch.Tensor, torch.Tensor]], max_visible: int, keep: list):
    """The C view of `model` over per-layer (keys, values), or None when a step cannot run it."""
    config = model.config
    layers = [_layer(block, k, v, keep) for block, (k, v) in zip(model.model.layers, kv, strict=True)]
    embed, head = _embedding(model, keep), _mat(model.lm_head, keep)
    final_norm = _gain(model.model.norm, keep)
    if None in layers or embed is None or head is None or not final_norm:
        return None
    freqs = [model.inv_freq.get(kind) for kind in GROUPS]  # contiguous, owned by the model
    return step_structs.model_struct(
        config, layers, embed, head, final_norm, [f.data_ptr() if f is not None else None for f in freqs],
        embed_scale=model.rounded_embedding_scale(model.dtype),  # rounded as the reference rounds it
        max_visible=max_visible, cache_bf16=model.dtype == torch.bfloat16, keep=keep,
    )  # fmt: skip


def decoder(model: Gemma, cache: KVCache, batch: int) -> CDecoder | None:
    """A C decoder for `model` and `cache`, or None when the C step does not apply."""
    if batch != 1 or cache.dtype != model.dtype or not _runnable(model):
        return None
    keep: list = []
    kv = [(layer_cache.k, layer_cache.v) for layer_cache in cache.for_layer]
    spec = _model_spec(model, kv, max(cache.groups[kind].capacity for kind in cache.groups), keep)
    if spec is None:
        return None
    return CDecoder(cpu_kernels.library(), model, cache, spec, keep)


class BatchDecoder:
    """Runs batched decode steps in C (csrc/decode_batch.c) against `model` and a slot cache."""

    def __init__(self, lib, model: Gemma, spec: _Model, keep: list, slots: int, max_position: int | None):
        # The model, the slot cache's tensors (in `keep`) and the derived tensors own the memory
        # `spec` points into: they live as long as the decoder.
        self.lib, self.model, self.spec, self._keep = lib, model, spec, keep
        self.slots, self.max_position = slots, max_position
        self._logits = torch.empty((0, model.config.vocab_size), dtype=torch.float32)
        self.block_weights = block_weights(spec)

    def _check(self, tokens: list[int], slots: list[int], positions: list[int]) -> None:
        """Raises ValueError for rows the model or the cache cannot take."""
        if not tokens or not slots or not positions:
            raise ValueError("a step needs at least one row")
        vocab = self.model.config.vocab_size
        if min(tokens) < 0 or max(tokens) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab})")
        if min(slots) < 0 or max(slots) >= self.slots:
            raise ValueError(f"slots must be in [0, {self.slots})")
        if min(positions) < 0 or self.max_position is not None and max(positions) > self.max_position:
            raise ValueError(f"positions must be in [0, {self.max_position}]")

    def step(
        self, tokens: list[int], slots: list[int], positions: list[int], logit_rows: list[int] | None = None
    ) -> torch.Tensor:
        """Feeds `tokens[r]` at `positions[r]` of slot `slots[r]` for every row r; the logits
        (len(logit_rows), vocab) float32 of the next token after each row of `logit_rows`
        (ascending; None: every row), a buffer the next step reuses.

        The rows of one slot must be consecutive rows at consecutive positions (a prompt
        chunk, a row and its proposals): they see each other causally. A row at position p
        sees positions [0, p] (full layers) or [p - window + 1, p] (sliding layers) of its own
        slot, each key computed as it would be in a step of its own, so a row's logits do not
        depend on what else is in the step. Only the rows of `logit_rows` go through the last
        block's MLP and the output head. Raises ValueError for rows the cache cannot hold.
        """
        if len(slots) != len(tokens) or len(positions) != len(tokens):
            raise ValueError(
                f"a step needs one slot and position per token ({len(tokens)}, {len(slots)}, {len(positions)})"
            )
        self._check(tokens, slots, positions)
        rows, vocab = len(tokens), self.model.config.vocab_size
        wanted = rows if logit_rows is None else len(logit_rows)
        if self._logits.shape[0] < wanted:
            self._logits = torch.empty((wanted, vocab), dtype=torch.float32)
        logits = self._logits[:wanted]
        ids = torch.tensor([tokens, slots, positions], dtype=torch.int64)  # (3, rows)
        # a ctypes array, never NULL for an empty list (NULL asks for every row)
        chosen = None if logit_rows is None else (ctypes.c_int64 * max(1, wanted))(*logit_rows)
        batch = _Batch(
            rows=rows,
            tokens=ids[0].data_ptr(),
            slots=ids[1].data_ptr(),
            positions=ids[2].data_ptr(),
            logit_rows=None if chosen is None else ctypes.addressof(chosen),
            n_logit_rows=wanted,
            logits=logits.data_ptr(),
        )
        step_structs.run_step(self.lib, self.spec, batch, torch.get_num_threads())
        return logits

    def prefill(self, tokens: list[int], slot: int, start: int = 0) -> torch.Tensor:
        """Runs a prompt (or its rest) at positions start... of `slot` (`prefill_rows`); the
        logits (1, V) after its last token, a buffer the next step reuses."""
        self._check(tokens, [slot], [start, start + len(tokens) - 1])
        if self._logits.shape[0] < 1:
            self._logits = torch.empty((1, self.model.config.vocab_size), dtype=torch.float32)
        prefill_rows(self.lib, self.spec, tokens, slot, start, self._logits)
        return self._logits[:1]


def prefill_rows(lib, spec, tokens: list[int], slot: int, start: int, logits: torch.Tensor) -> None:
    """Runs `tokens` at positions start... of `slot` as rows of C steps of PREFILL_ROWS rows
    (`step_structs.prompt_rows`), and writes the logits (V,) after the last token into
    logits[0]."""
    step_structs.prompt_rows(lib, spec, tokens, slot, start, logits.data_ptr(), torch.get_num_threads())


def batch_decoder(
    model: Gemma, layer_kv: list[tuple[torch.Tensor, torch.Tensor] | None]
) -> BatchDecoder | None:
    """A batched C decoder over a slot cache, or None when the batched C step does not apply.

    `layer_kv[i]` is layer i's (keys, values), each (slots, kv_heads, capacity, head_dim),
    contiguous, in the model's dtype, or None for a layer that owns no K/V (the C step then
    declines). Full-attention layers hold position p at index p, sliding layers a ring of
    their own capacity (position p at p % capacity; a capacity over the window leaves slack
    for several rows of one slot in a step). The step reads the model's weights and these
    tensors in place, no copies. None also where the single-row step declines (not the CPU,
    adapters, training, a family or weight type it does not compute).
    """
    if not _runnable(model) or len(layer_kv) != model.config.num_hidden_layers or None in layer_kv:
        return None
    c = model.config
    slots = layer_kv[0][0].shape[0]
    for k, v in layer_kv:
        if k.dtype != model.dtype or k.shape != v.shape or k.dim() != 4 or k.shape[0] != slots:
            return None
        if (k.shape[1], k.shape[3]) != (c.num_key_value_heads, c.head_dim):
            return None
    # the last position every layer can hold: a full layer's capacity, or a sliding ring's
    # where the ring is shorter than the window (the whole sequence then fits in it)
    limits = [
        k.shape[2] - 1
        for (k, _), kind in zip(layer_kv, c.layer_types)
        if kind == FULL or k.shape[2] < (c.sliding_window or 0)
    ]
    keep: list = [layer_kv]
    spec = _model_spec(model, layer_kv, max(k.shape[2] for k, _ in layer_kv), keep)
    if spec is None:
        return None
    return BatchDecoder(cpu_kernels.library(), model, spec, keep, slots, min(limits) if limits else None)
