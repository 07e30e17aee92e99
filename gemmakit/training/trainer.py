"""The fine-tuning loop: a `Trainer` whose methods are its named steps, and `train(cfg)`.

    trainer = Trainer(cfg)          # model, optimizer, data; restored from a checkpoint on resume
    result = trainer.fit()          # step() until max_steps, with evaluate() and checkpoint()

The loop:
- computes the loss from `model.hidden_states` with a fused linear + cross-entropy over
  chunks of positions, so the (tokens x 262k) logits never exist at once, in the forward or
  the backward (`training.loss.linear_cross_entropy`);
- normalizes by the number of target tokens of the whole optimizer step (all micro-batches
  of gradient accumulation, all data-parallel ranks), so 2 processes x batch b take the same
  step as 1 process x batch 2b;
- writes atomic checkpoints (adapter or weights, optimizer, scheduler, RNG states, data
  position) that `resume=True` continues bit-exactly, and saves one on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gemmakit import lora
from gemmakit.errors import ConfigError, GemmakitError
from gemmakit.files import atomic_folder, atomic_write, remove_stale_temporaries
from gemmakit.training import data as sft_data
from gemmakit.training import setup
from gemmakit.training.checkpoints import (
    checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gemmakit.training.config import TrainConfig, validate
from gemmakit.training.distributed import Dist
from gemmakit.training.loss import batch_loss_sum
from gemmakit.training.metrics import Metrics, plot_losses
from gemmakit.training.order import RowOrder


@dataclass
class TrainResult:
    output: Path
    step: int
    interrupted: bool = False
    checkpoint: Path | None = None
    adapter: Path | None = None
    first_eval_loss: float | None = None
    last_eval_loss: float | None = None
    last_loss: float | None = None
    optimizer: str = ""
    notes: dict = field(default_factory=dict)
    seconds: float = 0.0
    tokens_per_second: float = 0.0


class StopRequest:
    """The first SIGINT asks the loop to stop at the next step boundary (after a checkpoint);
    a second one interrupts at once, as Python does by default."""

    def __init__(self, log):
        self.requested, self.log, self._old = False, log, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        self.log("\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)")
        signal.signal(signal.SIGINT, self._old or signal.default_int_handler)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _err(msg):
    print(msg, file=sys.stderr, flush=True)


class Trainer:
    """One fine-tuning run. Construction sets everything up (and restores a checkpoint when
    `resume`); `fit` runs the loop; `step`, `evaluate` and `checkpoint` are its parts.

    Loop state: `global_step` (optimizer steps taken) and `consumed` (training rows taken, over
    all processes), both saved in every checkpoint.
    """

    def __init__(
        self, cfg: TrainConfig, resume: bool = False, loaded=None, log: Callable[[str], None] = _err
    ):
        validate(cfg)
        if not cfg.data:
            raise ConfigError("no training data: pass --data FILE")
        if not cfg.output:
            raise ConfigError("no output folder: pass --output DIR")
        self.start_time = time.perf_counter()
        setup.limit_heap_fragmentation()
        self.cfg, self.output = cfg, Path(cfg.output)
        self.device = setup.resolve_device(cfg)
        self.dist = Dist(self.device)
        self.log = log if self.dist.main else (lambda *_: None)
        self.metrics = Metrics(self.output / "metrics.jsonl", self.dist.main)
        saved = self._check_output(resume)
        self.dtype = setup.resolve_dtype(cfg, self.device)
        self.autocast = setup.use_autocast(cfg, self.dtype)
        self._build(loaded)
        self.global_step, self.consumed = 0, 0
        if saved and resume:
            self._restore(saved[-1])
        self._write_run_config()
        self._describe()
        self.order = RowOrder(len(self.train_examples), cfg.seed)
        self.rows_per_step = cfg.batch_size * cfg.grad_accum * self.dist.world
        self.tokens_seen, self.train_seconds = 0, 0.0

    # --- set-up ---------------------------------------------------------------------------------

    def _check_output(self, resume: bool) -> list[Path]:
        """The output folder's checkpoints; raises unless `resume` matches what the folder holds.

        A run stopped before its first checkpoint (SIGKILL, the OOM killer, a second Ctrl-C)
        leaves config.json and metrics.jsonl but nothing to continue from: it starts over, with
        or without `resume`, and says so. Every finished or interrupted run has a checkpoint
        (`fit` saves one on Ctrl-C and at the last step), so nothing of value is discarded.
        """
        saved = checkpoints(self.output)
        if not resume and saved:
            raise GemmakitError(
                f"{self.output} already holds a run; pass --resume to continue it or choose another --output"
            )
        started = self.metrics.path.exists() or self._holds_run_config()
        if resume and not saved and not started:  # most likely a mistyped --output
            raise GemmakitError(f"{self.output}: no run and no checkpoint to resume from")
        if not saved and started:
            self.log(
                f"note: the run in {self.output} stopped before its first checkpoint; starting it over from step 0"
            )
            if self.dist.main:
                self._discard_unsaved_run()
        return saved

    def _holds_run_config(self) -> bool:
        """Whether OUTPUT/config.json is a run's (written by `_write_run_config`).

        Any other config.json (a model folder given as --output) is refused rather than
        overwritten."""
        path = self.output / "config.json"
        if not path.exists():
            return False
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        if not isinstance(saved, dict) or "effective" not in saved:
            raise GemmakitError(
                f"{path} is not a fine-tuning run's settings (a model folder?); choose another --output"
            )
        return True

    def _discard_unsaved_run(self):
        """Removes what a run that never saved a checkpoint left: its records and temporaries."""
        for name in ("metrics.jsonl", "loss.png"):
            (self.output / name).unlink(missing_ok=True)
        root = self.output / "checkpoints"
        if root.is_dir():  # temporaries of the killed run's checkpoint saves; never a live one's
            remove_stale_temporaries(root)

    def _build(self, loaded):
        """Model, optimizer, schedule and data, in the order that fixes what the seed draws."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same LoRA init on every rank
        random.seed(cfg.seed)
        weights_dtype = torch.float32 if self.autocast else self.dtype
        if loaded is None:
            loaded = setup.load_for_training(cfg, self.device, weights_dtype)
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        self.base_name = str(loaded.source.path) if loaded.source else (cfg.model or "")
        self.notes = setup.prepare_model(self.model, cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.optimizer_name = setup.make_optimizer(self.params, cfg, self.device)
        self.scheduler = setup.make_scheduler(self.optimizer, cfg)
        self.train_examples, self.eval_examples, data_notes = setup.load_data(cfg, self.tokenizer)
        self.notes.update(data_notes)
        if self.dist.world > 1:  # different dropout masks per rank from here on
            torch.manual_seed(cfg.seed + 1_000_003 * self.dist.rank)
        self.notes.update(
            optimizer=self.optimizer_name, device=self.device, dtype=str(self.dtype).replace("torch.", ""),
            autocast=self.autocast, world_size=self.dist.world, model_source=self.base_name,
            packing="block-diagonal attention, positions per example" if cfg.packing else None,
        )  # fmt: skip

    def _restore(self, path: Path):
        """Weights, optimizer, schedule, loop state and this process's RNG states from `path`."""
        state = load_checkpoint(path, self.model, self.cfg)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.global_step, self.consumed = state["step"], state["consumed"]
        rngs, rank, world = state["rng"], self.dist.rank, self.dist.world
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0], self.device)
        if len(rngs) != world:
            self.log(f"note: checkpoint from {len(rngs)} process(es), resuming on {world}: not bit-exact")
        self.metrics.truncate_after(self.global_step)
        self.log(f"resuming from {path} (step {self.global_step})")

    def _write_run_config(self):
        """OUTPUT/config.json: the settings, plus what the run resolved them to (`effective`)."""
        if not self.dist.main:
            return
        self.output.mkdir(parents=True, exist_ok=True)
        saved = {**self.cfg.to_dict(), "effective": self.notes}
        text = json.dumps(saved, indent=2) + "\n"
        atomic_write(self.output / "config.json", lambda tmp: Path(tmp).write_text(text))

    def _describe(self):
        cfg, notes = self.cfg, self.notes
        self.log(
            f"{cfg.method} on {self.base_name} [{notes['dtype']}{' autocast' if self.autocast else ''}, "
            f"{self.device}, {self.dist.world} process(es)]: {notes['trainable_parameters']:,} trainable of "
            f"{notes['total_parameters']:,} parameters; {notes['train_rows']} train / {notes['eval_rows']} "
            f"eval rows; optimizer {self.optimizer_name}"
        )
        if notes.get("dropped_rows"):
            self.log(
                f"note: skipped {notes['dropped_rows']} row(s) with nothing to learn from (empty text, no "
                "assistant turn with content, or no response token within max_length)"
            )

    # --- the parts of the loop ------------------------------------------------------------------

    def _amp(self):
        # A fresh context each time: autocast objects keep state between enter and exit.
        if self.autocast:
            return torch.autocast(self.device.split(":")[0], dtype=self.dtype)
        return contextlib.nullcontext()

    def _batch(self, examples: list) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in sft_data.collate(examples, self.tokenizer.pad_id).items()}

    def micro_batches(self) -> list[dict[str, torch.Tensor]]:
        """This process's micro-batches of the next optimizer step.

        The step takes the next `rows_per_step` rows of the global order; micro-batch a of rank
        r is its slice number a * world + r, so the rows do not depend on how many processes
        share them.
        """
        rows = self.order.take(self.consumed, self.rows_per_step)
        b, world, rank = self.cfg.batch_size, self.dist.world, self.dist.rank
        slices = [
            rows[(a * world + rank) * b : (a * world + rank + 1) * b] for a in range(self.cfg.grad_accum)
        ]
        return [self._batch([self.train_examples[i] for i in s]) for s in slices]

    def step(self) -> dict:
        """One optimizer step over all micro-batches and processes; returns its event."""
        t0 = time.perf_counter()
        batches = self.micro_batches()
        counts = torch.tensor(
            [sum(sft_data.target_count(bt["labels"]) for bt in batches),
             sum(int(bt["attention_mask"].sum()) for bt in batches)],
            dtype=torch.float64,
        )  # fmt: skip
        self.dist.sum(counts)
        n_targets = max(float(counts[0]), 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for bt in batches:
            with self._amp():
                s = batch_loss_sum(self.model, bt, self.cfg.ce_chunk)
            (s / n_targets).backward()
            loss_sum += float(s.detach())
        self.dist.sum_grads(self.params)
        loss_sum = self.dist.sum(loss_sum.reshape(1))[0]
        grad_norm = None
        if self.cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.consumed += self.rows_per_step
        dt = time.perf_counter() - t0
        tokens = int(counts[1])
        self.tokens_seen += tokens
        self.train_seconds += dt
        return {
            "step": self.global_step, "loss": float(loss_sum) / n_targets, "lr": lr, "grad_norm": grad_norm,
            "tokens": tokens, "tokens_per_s": tokens / dt, "epoch": self.consumed / len(self.train_examples),
        }  # fmt: skip

    def evaluate(self) -> float | None:
        """Mean loss per target token over the eval examples (all processes); None without any."""
        if not self.eval_examples:
            return None
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        size = self.cfg.batch_size
        with torch.no_grad():
            mine = self.eval_examples[self.dist.rank :: self.dist.world]
            for i in range(0, len(mine), size):
                batch = self._batch(mine[i : i + size])
                with self._amp():
                    s = batch_loss_sum(self.model, batch, self.cfg.ce_chunk)
                total += torch.tensor([float(s), sft_data.target_count(batch["labels"])], dtype=torch.float64)
        self.model.train()
        self.dist.sum(total)
        return float(total[0] / max(total[1], 1))

    def checkpoint(self) -> Path | None:
        """Saves checkpoints/step-N (rank 0 writes; every rank's RNG state is in it)."""
        state = {
            "step": self.global_step, "consumed": self.consumed, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": self.dist.gather(rng_state(self.device)),
            "world_size": self.dist.world,
        }  # fmt: skip
        path = None
        if self.dist.main:
            path = save_checkpoint(self.output, self.global_step, self.model, state, self.cfg, self.base_name)
        self.dist.barrier()
        return path

    def plot(self):
        plot_losses(self.metrics.read(), self.output / "loss.png", f"{self.cfg.recipe}: {self.base_name}")

    def save_final(self) -> Path:
        """OUTPUT/adapter (PEFT) for LoRA runs; OUTPUT/model (an HF folder) for full runs."""
        return save_final(
            self.model, self.tokenizer, self.cfg, self.output, self.base_name, self.loaded.source
        )

    # --- the loop -------------------------------------------------------------------------------

    def _first_evaluation(self, result: TrainResult):
        """The eval loss before training (a fresh run), or the losses recorded so far (a resume)."""
        evals = [r["eval_loss"] for r in (self.metrics.read() if self.dist.main else []) if "eval_loss" in r]
        result.first_eval_loss = evals[0] if evals else None
        if self.global_step == 0:
            loss0 = self.evaluate()
            if loss0 is not None:
                self.metrics.write({"step": 0, "eval_loss": loss0})
                result.first_eval_loss = result.last_eval_loss = loss0
                self.log(f"step 0: eval loss {loss0:.4f}")
        elif evals:
            result.last_eval_loss = evals[-1]

    def _record(self, event: dict, result: TrainResult, bar):
        result.last_loss = event["loss"]
        if self.global_step % self.cfg.log_every == 0 or self.global_step == self.cfg.max_steps:
            self.metrics.write({k: (round(v, 6) if isinstance(v, float) else v) for k, v in event.items()})
        if bar is not None:
            bar.set_postfix(
                loss=f"{event['loss']:.4f}", lr=f"{event['lr']:.2e}", tok_s=f"{event['tokens_per_s']:.0f}"
            )
            bar.update(1)

    def _evaluate_if_due(self, result: TrainResult, bar):
        if self.global_step % self.cfg.eval_every and self.global_step != self.cfg.max_steps:
            return
        loss = self.evaluate()
        if loss is None:
            return
        self.metrics.write({"step": self.global_step, "eval_loss": loss})
        result.last_eval_loss = loss
        if result.first_eval_loss is None:
            result.first_eval_loss = loss
        if bar is not None:
            bar.write(f"step {self.global_step}: eval loss {loss:.4f}", file=sys.stderr)

    def fit(
        self, callbacks: list[Callable[[dict], None]] | None = None, progress: bool = True
    ) -> TrainResult:
        """Steps until `max_steps` or a stop request; evaluates, checkpoints, saves the result."""
        cfg = self.cfg
        result = TrainResult(self.output, self.global_step, optimizer=self.optimizer_name, notes=self.notes)
        self._first_evaluation(result)
        bar = None
        if progress and self.dist.main:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=cfg.max_steps,
                initial=self.global_step,
                desc="finetune",
                unit="step",
                dynamic_ncols=True,
            )
        self.model.train()
        with StopRequest(self.log) as stop:
            while self.global_step < cfg.max_steps:
                event = self.step()
                self._record(event, result, bar)
                interrupted = False
                try:
                    for cb in callbacks or ():
                        cb(event)
                except KeyboardInterrupt:
                    interrupted = True
                self._evaluate_if_due(result, bar)
                stop_now = self.dist.any(interrupted or stop.requested)
                last = self.global_step == cfg.max_steps
                if self.global_step % cfg.save_every == 0 or stop_now or last:
                    result.checkpoint = self.checkpoint()
                    if self.dist.main and not last:  # the curve so far, with each checkpoint
                        self.plot()
                if stop_now:
                    result.interrupted = True
                    break
        if bar is not None:
            bar.close()
        return self._finish(result)

    def _finish(self, result: TrainResult) -> TrainResult:
        result.step = self.global_step
        result.seconds = time.perf_counter() - self.start_time
        result.tokens_per_second = self.tokens_seen / self.train_seconds if self.train_seconds else 0.0
        if self.dist.main:
            self.plot()
            if not result.interrupted:
                result.adapter = self.save_final()
            if result.checkpoint is None and checkpoints(self.output):
                result.checkpoint = checkpoints(self.output)[-1]
        self.dist.barrier()
        return result


def train(
    cfg: TrainConfig,
    resume: bool = False,
    callbacks: list[Callable[[dict], None]] | None = None,
    loaded=None,
    log: Callable[[str], None] = _err,
    progress: bool = True,
) -> TrainResult:
    """Runs (or resumes) a fine-tuning run described by `cfg`; see the module docstring.

    Args:
        resume: continue from the latest checkpoint in `cfg.output`.
        callbacks: called after every optimizer step with a dict (step, loss, lr, ...); a
            callback that raises KeyboardInterrupt stops the run after a checkpoint.
        loaded: an already loaded `gemmakit.loading.Loaded` (tests); it is modified in place.
        log: where messages go (rank 0 only).

    Returns:
        A `TrainResult`; `interrupted` is True when stopped by Ctrl-C or a callback.
    """
    return Trainer(cfg, resume=resume, loaded=loaded, log=log).fit(callbacks=callbacks, progress=progress)


def save_final(model, tokenizer, cfg: TrainConfig, output: Path, base_name: str, source=None) -> Path:
    """OUTPUT/adapter (PEFT) for LoRA runs; OUTPUT/model (an HF folder) for full runs."""
    from gemmakit.formats.hf_folder import save_hf_folder

    target = output / ("model" if cfg.method == "full" else "adapter")
    with atomic_folder(target, replace=True) as tmp:
        if cfg.method == "full":
            source_folder = source.path if source is not None and source.kind == "hf" else None
            save_hf_folder(model, tokenizer, tmp, source_folder)
        else:
            lora.save_adapter(model, tmp, base_name)
    return target
