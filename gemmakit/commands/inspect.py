"""`gemmakit inspect`: exact parameter counts, architecture and memory needs, from configs alone.

A target is a preset name, a config.json (or a model folder holding one) of a Gemma, Llama,
Mistral or Qwen2 model, a GGUF file, or nothing (the bundled Gemma 3 270M GGUF). No weights are
read: counts come from the config or the GGUF header (`gemmakit.planning`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gemmakit.config import FULL, PRESETS, preset
from gemmakit.errors import ConfigError, GemmakitError, ModelFileError
from gemmakit.formats.gguf import GGUFFile
from gemmakit.planning.architecture import Architecture, from_gemma_config, from_gguf, from_hf_dict
from gemmakit.planning.kv_cache import KV_BYTES
from gemmakit.planning.prose import fmt_bytes, fmt_params, notes, vocab_ratios
from gemmakit.planning.report import Options, Report, gguf_file_summary, make_report
from gemmakit.planning.training_memory import TRAINING_METHODS
from gemmakit.planning.weights import gguf_bytes

DESCRIPTION = """\
Exact parameter counts (total, embedding, non-embedding; for Gemma 3n/4 also the per-layer
embedding, effective and active-per-token counts), the architecture, and memory needs (weights
per precision, KV cache, fine-tuning) of one or more models, computed from their configs: no
weights are loaded. GB means 10^9 bytes.

TARGET is a preset name (%(presets)s), a config.json or a model folder of a Gemma
1/2/3/3n/4, Llama, Mistral or Qwen2 model, or a GGUF file. Without a target, the bundled
Gemma 3 270M GGUF.
"""

EPILOG = """\
rules behind the numbers:
  effective   Gemma 3n/4: the total without the per-layer embedding (PLE) table, whose rows are
              looked up per token and never multiplied: Google's "E" number (E2B, E4B).
  active      mixture of experts: the effective count with only top_k of the num_experts
              routed experts of each layer, those a token's router picks: Google's "A" number
              (26B-A4B).
  int8, nf4   bitsandbytes through transformers: block projections quantized; embeddings,
              lm_head and norms (and Gemma 3n/4's per-layer embedding table, gates and
              stacked expert weights) stay 16-bit. NF4 with double quantization costs
              4 + 8/64 + 32/(64*256) = 4.127 bits per quantized weight; int8 adds an fp32
              scale per output row.
  q8_0, q4_0  llama.cpp block formats (8.5 and 4.5 bits per weight); as llama-quantize does,
              the output matrix (or the tied embedding) is Q6_K in a Q4_0 file.
  q4_k_m      llama.cpp's mixture: Q4_K, with attn_v and ffn_down in Q6_K on the first and
              last eighth of the layers and every third layer between, the output/tied
              embedding in Q6_K, and fallbacks (Q4_K->Q5_0, Q6_K->Q8_0) for rows that are not a
              multiple of 256. Gemma 3n/4: the per-layer embedding table is a tied token
              embedding to llama-quantize (Q6_K); the router, AltUp, LAuReL and the per-layer
              projection stay 16/32-bit. For a GGUF target the file's real bytes per type are
              shown too.
  KV cache    2 * kv_heads * head_dim * bytes per token per layer that owns a cache, each layer
              at its own head dim and KV heads (Gemma 4 global layers); KV-shared layers
              (Gemma 3n/4) add nothing; sliding-window layers hold at most their window.
  training    weights + gradients + optimizer states + activations + logits. Full
              fine-tuning keeps weights and gradients in --train-dtype and two fp32 AdamW
              states (8-bit AdamW: ~2 bytes); LoRA/QLoRA train fp32 adapters on
              q/k/v/o/gate/up/down over a frozen 16-bit (LoRA) or NF4 (QLoRA) base.
              "ckpt+chunked" is with gradient checkpointing and a chunked cross-entropy.

examples:
  gemmakit inspect
  gemmakit inspect gemma-7b --json
  gemmakit inspect --compare gemma-7b gemma-2b llama2/config.json mistral/ qwen/config.json
  gemmakit inspect --compare gemma-3-4b gemma-3n-e4b gemma-4-e4b
  gemmakit inspect model.gguf --context 32768 --batch 4 --kv-dtype q8_0
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION % {"presets": ", ".join(PRESETS)}
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "targets", nargs="*", metavar="TARGET",
        help="preset name, config.json, model folder or GGUF file (default: the bundled Gemma 3 270M GGUF)",
    )  # fmt: skip
    parser.add_argument(
        "--compare", action="store_true",
        help="print all targets side by side in one table, with vocabulary ratios to the first",
    )  # fmt: skip
    parser.add_argument(
        "--json", action="store_true",
        help="print a JSON list, one object per target (params, config, memory, kv_cache, training, notes)",
    )  # fmt: skip
    parser.add_argument(
        "--context", type=_positive, metavar="N",
        help="tokens held in the KV cache (default: each model's max_position_embeddings)",
    )  # fmt: skip
    parser.add_argument(
        "--batch", type=_positive, metavar="N",
        help="batch size for the KV cache and for training (default: 1 for the KV cache, "
        "4 for training, as in gemmakit finetune's default recipe)",
    )  # fmt: skip
    parser.add_argument(
        "--seq-len", type=_positive, default=512, metavar="N",
        help="training sequence length (default: 512, as in gemmakit finetune's default recipe)",
    )  # fmt: skip
    parser.add_argument(
        "--kv-dtype", choices=sorted(KV_BYTES), default="bf16",
        help="KV cache element type (default: bf16; q8_0/q4_0 are llama.cpp's quantized caches)",
    )  # fmt: skip
    parser.add_argument(
        "--train-dtype", choices=("bf16", "fp32"), default="bf16",
        help="dtype of trained weights, gradients and activations (default: bf16; fp32 on CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--lora-rank", type=_positive, default=16, metavar="R",
        help="LoRA/QLoRA rank (default: 16, as in gemmakit finetune's default recipe)",
    )  # fmt: skip
    parser.add_argument(
        "--ce-chunk", type=_positive, default=256, metavar="N",
        help="tokens per chunk of the chunked cross-entropy (default: 256)",
    )  # fmt: skip


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def run(args: argparse.Namespace) -> int:
    options = Options(
        context=args.context, batch=args.batch, seq_len=args.seq_len, kv_dtype=args.kv_dtype,
        train_dtype=args.train_dtype, lora_rank=args.lora_rank, ce_chunk=args.ce_chunk,
    )  # fmt: skip
    reports = [report_for(t, options) for t in (args.targets or [None])]
    if args.json:
        print(json.dumps([r.to_json(options) for r in reports], indent=2))
        return 0
    out = Output()
    if args.compare:
        render_compare(out, reports, options)
    else:
        for i, r in enumerate(reports):
            if i:
                out.line("")
            render_single(out, r, options)
    return 0


# --- Targets -------------------------------------------------------------------------------------


def resolve_target(target: str | None) -> tuple[str, Path | str]:
    """('preset', name) | ('config', path) | ('gguf', path) for what the user typed."""
    if target is None or target in ("default", "gemma-3-270m-gguf"):
        from gemmakit.loading import resolve

        return "gguf", resolve(None).path
    path = Path(target).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return "config", path / "config.json"
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise ModelFileError(f"{path}: no config.json and no single .gguf file in this folder")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF" or path.suffix == ".gguf":
            return "gguf", path
        return "config", path
    try:
        return "preset", preset(target).name  # "google/gemma-2-9b-it" -> "gemma-2-9b"
    except ConfigError:
        raise GemmakitError(
            f"{target}: not a preset, config.json, model folder or GGUF file (presets: {', '.join(PRESETS)})"
        ) from None


def architecture_for(target: str | None) -> tuple[Architecture, dict | None]:
    """The target's Architecture, and for a GGUF file its actual tensor bytes."""
    kind, where = resolve_target(target)
    if kind == "preset":
        return from_gemma_config(PRESETS[where], name=where, source="preset"), None
    if kind == "config":
        path = Path(where)
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: not a config.json object")
        name = path.parent.name if path.name == "config.json" else path.stem
        return from_hf_dict(raw, name or path.stem), None
    g = GGUFFile(where)  # the header only: tensor data stays unread
    return from_gguf(g), gguf_file_summary(g)


def report_for(target: str | None, options: Options) -> Report:
    arch, gguf = architecture_for(target)
    report = make_report(arch, options, gguf)
    report.notes = notes(report)
    return report


# --- Rows shared by the single and comparison views -----------------------------------------------


def _attention_pattern(a: Architecture) -> str:
    if not a.num_sliding:
        return f"{a.num_global} global"
    if not a.num_global:
        return f"{a.num_sliding} sliding (window {a.sliding_window:,})"
    return f"{a.num_sliding} local (window {a.sliding_window:,}) + {a.num_global} global"


def _rope(a: Architecture) -> str:
    text = f"{a.rope_theta:,.0f}"
    if a.rope_local_base_freq is not None and a.rope_local_base_freq != a.rope_theta:
        text = f"{text} global, {a.rope_local_base_freq:,.0f} local"
    if a.rope_scaling:
        text += f"; {a.rope_scaling}"
    if a.rope_partial_rotary_factor != 1.0:
        text += f"; proportional, {a.rope_partial_rotary_factor:g} of global head dims rotate"
    return text


def _softcaps(a: Architecture) -> str:
    caps = []
    if a.attn_logit_softcapping:
        caps.append(f"attention {a.attn_logit_softcapping:g}")
    if a.final_logit_softcapping:
        caps.append(f"final {a.final_logit_softcapping:g}")
    return ", ".join(caps) or "none"


def _embedding(r: Report) -> str:
    p, a = r.params, r.arch
    how = "tied" if a.tie_word_embeddings else "untied: in + out"
    return f"{p.embedding:,} ({p.embedding / p.text:.1%}, {how})"


def _share(n: int, r: Report) -> str:
    return f"{n:,} ({fmt_params(n)}, {n / r.params.text:.1%})"


def _per_layer_embedding(r: Report) -> str:
    a = r.arch
    if not a.per_layer_input_size:
        return "-"
    return (
        f"{_share(r.params.per_layer_embedding, r)}: {a.per_layer_vocab_size:,} rows of "
        f"{a.num_layers} x {a.per_layer_input_size}, looked up per token, never multiplied"
    )


def _effective(r: Report) -> str:
    if not r.arch.per_layer_input_size:
        return "-"
    return f"{r.params.effective:,} ({fmt_params(r.params.effective)}): total without the PLE table (the E in E2B/E4B)"


def _active(r: Report) -> str:
    a = r.arch
    if not a.num_experts:
        return "-"
    return (
        f"{r.params.active:,} ({fmt_params(r.params.active)}): {a.top_k_experts} of the {a.num_experts} "
        "experts of each layer, as the router picks per token, and no PLE table (the A in 26B-A4B)"
    )


def _layers(a: Architecture) -> str:
    shared = a.num_kv_shared_layers
    return f"{a.num_layers}" + (f" (last {shared} reuse an earlier layer's K/V)" if shared else "")


def _mlp(a: Architecture) -> str:
    owning = {a.layer(i).intermediate_size for i in range(a.num_layers) if a.layer(i).owns_kv}
    shared = {a.layer(i).intermediate_size for i in range(a.num_layers) if not a.layer(i).owns_kv}
    widths = sorted(owning | shared)
    if len(widths) == 1:
        text = f"{widths[0]:,}"
    elif len(owning) == len(shared) == 1:  # Gemma 4's double-wide MLPs on the KV-shared layers
        text = f"{min(owning):,} ({min(shared):,} on the {a.num_kv_shared_layers} KV-shared layers)"
    else:
        text = f"{widths[0]:,} to {widths[-1]:,} by layer"
    text += f", {a.activation}"
    if a.num_experts:
        text += f"; + {a.num_experts} experts of {a.moe_intermediate_size:,}, top {a.top_k_experts} per token"
    return text


def _heads(a: Architecture) -> str:
    text = f"{a.num_heads} / {a.num_kv_heads}, {a.attention_kind}"
    full = a.type_shape(FULL)
    if full and full.kv_heads != a.num_kv_heads:
        text += f"; global layers: {a.num_heads} / {full.kv_heads}"
    return text


def _head_dim(a: Architecture) -> str:
    full = a.type_shape(FULL)
    if full and full.head_dim != a.head_dim:
        return f"{a.head_dim} (global layers {full.head_dim})"
    return f"{a.head_dim}"


def _extras(a: Architecture) -> str:
    """The Gemma 3n/4 modules a block carries besides attention and the MLP."""
    parts = []
    if a.per_layer_input_size:
        parts.append(f"per-layer embeddings ({a.per_layer_input_size} per layer)")
    if a.k_eq_v_layers:
        parts.append(f"K = V on global layers ({a.k_eq_v_layers} with no v_proj)")
    if a.altup_num_inputs:
        parts.append(f"AltUp ({a.altup_num_inputs} streams)")
    if a.laurel_rank:
        parts.append(f"LAuReL (rank {a.laurel_rank})")
    if a.v_norm:
        parts.append("v_norm")
    if a.layer_scalar:
        parts.append("layer scalars")
    return ", ".join(parts) or "none"


def _kv_layers(r: Report) -> str:
    if not r.kv.shared_layers:
        return f"all {r.kv.cached_layers}"
    return f"{r.kv.cached_layers} of {r.arch.num_layers} ({r.kv.shared_layers} read an earlier layer's)"


def _kv_total(r: Report) -> str:
    return f"{fmt_bytes(r.kv.total)} @ {r.kv.context:,}"


def _training(key: str):
    def cell(r: Report) -> str:
        t = r.training[key]
        return f"{fmt_bytes(t['total'])} / {fmt_bytes(t['total_checkpointed_chunked'])}"

    return cell


def metric_rows(reports: list[Report], options: Options) -> list[tuple[str, list[str]] | str]:
    """(label, one cell per report) rows, with section titles as plain strings."""
    first = reports[0].arch
    rows: list = [
        "Parameters",
        ("source", lambda r: f"{r.arch.source}, {r.arch.architecture or r.arch.model_type}"),
        ("total", lambda r: f"{r.params.total:,} ({fmt_params(r.params.total)})"),
        ("embedding", _embedding),
    ]
    if any(r.params.per_layer_embedding for r in reports):
        rows.append(("per-layer embedding (PLE)", _per_layer_embedding))
    rows.append(
        ("non-embedding", lambda r: f"{r.params.non_embedding:,} ({fmt_params(r.params.non_embedding)})")
    )
    if any(r.params.per_layer_embedding for r in reports):
        rows.append(("effective", _effective))
    if any(r.arch.num_experts for r in reports):
        rows.append(("active per token", _active))
    if any(r.params.vision for r in reports):
        rows.append(("vision (tower + projector)", lambda r: f"{r.params.vision:,}"))
    if any(r.params.audio for r in reports):
        rows.append(("audio (tower + projector)", lambda r: f"{r.params.audio:,}"))
    if any(r.arch.uncounted_towers for r in reports):
        rows.append(
            (
                "not counted",
                lambda r: f"the {r.arch.uncounted_towers} towers" if r.arch.uncounted_towers else "-",
            )
        )
    rows += [
        "Architecture",
        ("layers", lambda r: _layers(r.arch)),
        ("hidden size", lambda r: f"{r.arch.hidden_size:,}"),
        ("MLP", lambda r: _mlp(r.arch)),
        ("heads / KV heads", lambda r: _heads(r.arch)),
        ("head dim", lambda r: _head_dim(r.arch)),
        ("vocabulary", lambda r: f"{r.arch.vocab_size:,}"),
    ]
    if len(reports) > 1:
        rows.append((f"vocabulary / {first.name}", lambda r: f"{r.arch.vocab_size / first.vocab_size:.2f}x"))
    rows += [
        ("context", lambda r: f"{r.arch.max_position_embeddings:,}"),
        ("attention layers", lambda r: _attention_pattern(r.arch)),
        ("RoPE base", lambda r: _rope(r.arch)),
        ("soft-caps", lambda r: _softcaps(r.arch)),
        ("tied embeddings", lambda r: "yes" + (", x sqrt(hidden)" if r.arch.embedding_scaled else "")
         if r.arch.tie_word_embeddings else "no"),
        ("norms per layer", lambda r: f"{r.arch.norms_per_layer}" + (" + QK-norm" if r.arch.qk_norm else "")),
        ("q/k/v bias", lambda r: "yes" if r.arch.qkv_bias else "no"),
        *([("Gemma 3n/4 modules", lambda r: _extras(r.arch))] if any(_extras(r.arch) != "none" for r in reports) else []),
        "Weights",
        ("fp32", lambda r: fmt_bytes(r.memory["fp32"])),
        ("bf16 / fp16", lambda r: fmt_bytes(r.memory["bf16"])),
        ("int8 (bitsandbytes)", lambda r: fmt_bytes(r.memory["int8"])),
        ("NF4 + double quant", lambda r: fmt_bytes(r.memory["nf4"])),
        ("GGUF Q8_0", lambda r: fmt_bytes(r.memory["q8_0"])),
        ("GGUF Q4_0", lambda r: fmt_bytes(r.memory["q4_0"])),
        ("GGUF Q4_K_M (llama.cpp rules)", lambda r: fmt_bytes(r.memory["q4_k_m"])),
    ]  # fmt: skip
    if any(r.gguf_file for r in reports):
        rows.append(
            (
                "this GGUF file (tensors)",
                lambda r: fmt_bytes(r.gguf_file["tensor_bytes"]) if r.gguf_file else "-",
            )
        )
    rows += [
        f"KV cache ({options.kv_dtype}, batch {options.kv_batch})",
        ("per token", lambda r: f"{r.kv.bytes_per_token:,.0f} B"),
        ("at context", _kv_total),
    ]
    if any(r.kv.shared_layers for r in reports):
        rows.append(("layers with a cache", _kv_layers))
    if any(r.kv.total_no_window != r.kv.total for r in reports):
        rows.append(("same, no window caps", lambda r: fmt_bytes(r.kv.total_no_window)))
    rows.append(f"Fine-tuning ({options.train_batch} x {options.seq_len}, {options.train_dtype})")
    for m, (label, *_rest) in TRAINING_METHODS.items():
        if m in ("lora", "qlora"):
            label = label.replace("LoRA", f"LoRA r{options.lora_rank}", 1)
        rows.append((label, _training(m)))
    return [row if isinstance(row, str) else (row[0], [row[1](r) for r in reports]) for row in rows]


# --- Rendering -----------------------------------------------------------------------------------


class Output:
    """Tables and lines through rich, never truncated: as wide as the terminal, or unbounded
    (no wrapping, no styling) when stdout is not a terminal."""

    def __init__(self):
        tty = sys.stdout.isatty()
        width = shutil.get_terminal_size((120, 24)).columns if tty else 1000
        self.console = Console(width=width, highlight=False, soft_wrap=not tty)

    def line(self, text: str = "") -> None:
        self.console.print(text, markup=False)

    def table(self, title: str | None, header: list[str], rows: list[list[str] | str]) -> None:
        """Rows are cell lists; a plain string row is a section heading."""
        t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", show_edge=False)
        for i, h in enumerate(header):
            t.add_column(h, no_wrap=i == 0, overflow="fold", justify="left")
        for row in rows:
            if isinstance(row, str):
                t.add_section()
                t.add_row(f"[bold]{escape(row)}[/bold]", *[""] * (len(header) - 1))
            else:
                t.add_row(*[escape(c) for c in row])
        self.console.print(t)


def render_single(out: Output, r: Report, options: Options) -> None:
    rows = metric_rows([r], options)
    body = [row if isinstance(row, str) else [row[0], row[1][0]] for row in rows]
    out.table(f"{r.arch.name}", ["", "value"], body)
    out.line(_training_legend(r, options))
    t_rows = []
    for t in r.training.values():
        t_rows.append([
            t["label"], fmt_params(t["trainable_params"]), fmt_bytes(t["weights"]), fmt_bytes(t["gradients"]),
            fmt_bytes(t["optimizer_states"]),
            f"{fmt_bytes(t['activations'])} / {fmt_bytes(t['activations_checkpointed'])}",
            f"{fmt_bytes(t['logits'])} / {fmt_bytes(t['logits_chunked'])}",
            fmt_bytes(t["total"]), fmt_bytes(t["total_checkpointed_chunked"]),
        ])  # fmt: skip
    out.table(
        f"Fine-tuning memory, batch {r.train_batch} x {options.seq_len} tokens, {options.train_dtype}"
        f" (activations and logits: plain / with checkpointing and a {options.ce_chunk}-token chunked CE)",
        ["method", "trainable", "weights", "grads", "optimizer", "activations", "logits", "total",
         "ckpt+chunked"],
        t_rows,
    )  # fmt: skip
    if r.gguf_file:
        g = r.gguf_file
        est = gguf_bytes(r.arch, "q4_k_m")
        rows = [
            [name, str(g["tensors_by_type"][name]), f"{n:,}", f"{est.get(name, 0):,}"]
            for name, n in g["bytes_by_type"].items()
        ]
        rows.append(["all tensors", str(sum(g["tensors_by_type"].values())), f"{g['tensor_bytes']:,}",
                     f"{sum(est.values()):,}"])  # fmt: skip
        out.table(
            f"{Path(g['path']).name}: {g['file_bytes']:,} bytes on disk "
            f"({g['file_bytes'] - g['tensor_bytes']:,} of header, vocabulary and padding)",
            ["GGML type", "tensors", "bytes in file", "Q4_K_M rule estimate"],
            rows,
        )
    _notes(out, r.notes)


def render_compare(out: Output, reports: list[Report], options: Options) -> None:
    rows = metric_rows(reports, options)
    body = [row if isinstance(row, str) else [row[0], *row[1]] for row in rows]
    out.table(None, ["", *[r.arch.name for r in reports]], body)
    out.line(_training_legend(reports[0], options))
    ratio = vocab_ratios([r.arch for r in reports])
    if ratio:
        out.line(ratio)
    for r in reports:
        if r.notes:
            out.line("")
            out.line(f"{r.arch.name}:")
            for n in r.notes:
                out.line(f"  - {n}")


def _training_legend(r: Report, options: Options) -> str:
    return (
        f"Fine-tuning cells: batch {r.train_batch} x {options.seq_len} tokens, {options.train_dtype}; "
        f"plain / with gradient checkpointing and a {options.ce_chunk}-token chunked cross-entropy."
    )


def _notes(out: Output, notes: list[str]) -> None:
    if notes:
        out.line("Notes:")
        for n in notes:
            out.line(f"  - {n}")


__all__ = ["add_arguments", "run", "report_for", "resolve_target"]
