"""The C model step's structs (csrc/gemmakit_kernels.h: Mat, Layer, Model, Batch), filled
without torch: what the torch model's driver (`inference/c_decode.py`) and the torch-free
generation path over a GGUF file (`inference/gguf_step.py`) share.

The struct classes and weight-type codes come from the header (`kernels/bindings.py`);
`unsupported_by_c_step` says which configs the step computes; `model_struct` fills a `Model`
from a config and the pointers of its tensors; `prompt_rows` runs a prompt as rows of C steps
over ctypes arrays.
"""

from __future__ import annotations

import ctypes
import os

from gemmakit.config import FULL, SLIDING, GemmaConfig
from gemmakit.kernels import bindings

GROUPS = (FULL, SLIDING)  # Layer.group and Model.inv_freq's index of each attention kind
_DECLARED = bindings.declarations()
Mat, Layer, Model, Batch = (_DECLARED.structs[name] for name in ("Mat", "Layer", "Model", "Batch"))
W_F32, W_INT8, W_BF16, W_GGUF_BASE, W_PACKED4 = (
    _DECLARED.constants[name] for name in ("W_F32", "W_INT8", "W_BF16", "W_GGUF_BASE", "W_PACKED4")
)
INV_FREQ = dict(Model._fields_)["inv_freq"]  # one RoPE frequency pointer per group

# Prompt rows per C step: the step's buffers grow with its rows (~70 kB a row for Gemma 3
# 270M), and from a few hundred rows on each weight read is shared enough.
PREFILL_ROWS = 512

# what a failed step's code means (csrc/gemmakit_kernels.h, decode_batch)
STEP_ERRORS = {
    -2: ValueError("the rows of one slot must be consecutive rows at consecutive positions"),
    -3: ValueError("logit_rows must be ascending row indices of the step"),
}


def step_threads() -> int:
    """Threads a C step runs on, as torch picks its own: OMP_NUM_THREADS when set, else one
    per physical core this process may run on (SMT siblings share one; from the kernel's
    CPU topology, or every allowed CPU where that is not readable)."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(topology + "physical_package_id") as package, open(topology + "core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus) or os.cpu_count() or 1


def unsupported_by_c_step(config: GemmaConfig) -> str | None:
    """What in `config` the C step cannot compute, or None when it can run the model.

    The step is Gemma 1-3's block: one head dim and KV-head count for every layer, every
    layer's own K/V, (1 + w) norm gains, full RoPE, a GeGLU MLP of one width, nothing added
    to the residual stream. Gemma 3n/4 decode with the torch step.
    """
    c = config
    per_layer_shapes = any(
        (c.layer_head_dim(i), c.layer_kv_heads(i), c.layer_intermediate_size(i))
        != (c.head_dim, c.num_key_value_heads, c.intermediate_size)
        for i in range(c.num_hidden_layers)
    )
    reasons = {
        "odd head_dim": c.head_dim % 2,
        "per-layer head dims, KV heads or MLP widths": per_layer_shapes,
        "norm gains without the unit offset": not c.norm_unit_offset,
        "v_norm": c.use_v_norm,
        "per-layer embeddings": c.hidden_size_per_layer_input,
        "KV sharing": c.num_kv_shared_layers,
        "K = V": c.attention_k_eq_v,
        "partial RoPE": c.rope_partial_rotary_factor != 1.0,
        "layer scalars": c.use_layer_scalar,
        "mixture of experts": c.num_experts,
        "activation sparsity": any(c.layer_activation_sparsity(i) for i in range(c.num_hidden_layers)),
        "AltUp": c.altup_num_inputs,
        "LAuReL": c.laurel_rank,
    }
    return next((reason for reason, applies in reasons.items() if applies), None)


def model_struct(
    config: GemmaConfig,
    layers: list,
    embed,
    head,
    final_norm: int,
    inv_freq: list[int | None],
    embed_scale: float,
    max_visible: int,
    cache_bf16: bool,
    keep: list,
):
    """A `Model` over `layers` (Layer structs), the embedding and head `Mat`s, the final
    norm's gain pointer and one RoPE frequency pointer per group (GROUPS' order; None for a
    group no layer has). `embed_scale` is sqrt(hidden) rounded to the model's dtype, as the
    reference rounds it. The layer array is appended to `keep`, which the caller holds as
    long as the struct."""
    layer_array = (Layer * len(layers))(*layers)
    keep.append(layer_array)
    return Model(
        n_layers=len(layers),
        hidden=config.hidden_size,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        intermediate=config.intermediate_size,
        vocab=config.vocab_size,
        eps=config.rms_norm_eps,
        attn_scale=config.attention_scale,
        attn_softcap=config.attn_logit_softcapping or 0.0,
        final_softcap=config.final_logit_softcapping or 0.0,
        embed_scale=embed_scale,
        inv_freq=INV_FREQ(*inv_freq),
        embed=embed,
        lm_head=head,
        final_norm=final_norm,
        layers=layer_array,
        max_visible=max_visible,
        cache_bf16=cache_bf16,
        window=config.sliding_window or 0,
    )


def run_step(lib, spec, batch, threads: int) -> None:
    """One `decode_batch` call; its failure codes as exceptions."""
    failed = lib.decode_batch(ctypes.byref(spec), ctypes.byref(batch), threads)
    if failed:
        raise STEP_ERRORS.get(failed, MemoryError("the C decode step could not allocate its buffers"))


def prompt_rows(
    lib,
    spec,
    tokens: list[int],
    slot: int,
    start: int,
    logits_address: int,
    threads: int,
    step_rows: int = PREFILL_ROWS,
) -> None:
    """Runs `tokens` at positions start... of `slot` as rows of C steps of `step_rows` rows
    (a prompt; the same keys and values, and the same last logits, however it is cut), and
    writes the logits (V,) after the last token at `logits_address`."""
    rows = len(tokens)
    word = ctypes.sizeof(ctypes.c_int64)
    ids = (ctypes.c_int64 * rows)(*tokens)
    slots = (ctypes.c_int64 * rows)(*([slot] * rows))
    positions = (ctypes.c_int64 * rows)(*range(start, start + rows))
    last = (ctypes.c_int64 * 1)()
    for at in range(0, rows, step_rows):
        n = min(step_rows, rows - at)
        last[0] = n - 1
        batch = Batch(
            rows=n,
            tokens=ctypes.addressof(ids) + at * word,
            slots=ctypes.addressof(slots) + at * word,
            positions=ctypes.addressof(positions) + at * word,
            logit_rows=ctypes.addressof(last),
            n_logit_rows=1,
            logits=logits_address,
        )
        run_step(lib, spec, batch, threads)
