"""A run's record: `metrics.jsonl` (one JSON object per logged step) and its plot, `loss.png`."""

from __future__ import annotations

import json
from pathlib import Path

from gemmakit.errors import GemmakitError
from gemmakit.files import atomic_write


class Metrics:
    """metrics.jsonl: one JSON object per line, `step` plus `loss` or `eval_loss`."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int):
        """Drops lines an interrupted run wrote past the checkpoint it resumes from."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in self.read() if r["step"] <= step]
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in keep)))

    def write(self, record: dict):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        """The records; a GemmakitError names the line of a damaged file.

        A last line without its newline that does not parse is what a kill in the middle of
        `write` leaves; it is left out (the resume rewrites the file without it).
        """
        if not self.path.exists():
            return []
        text = self.path.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines()
        records = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) and not text.endswith("\n"):
                    break
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise GemmakitError(
                    f"{self.path}:{i}: not a metrics record (damaged file); remove the line to continue"
                )
            records.append(record)
        return records


def plot_losses(records: list[dict], path: Path, title: str = "") -> bool:
    """Training and eval loss against step, as a PNG (matplotlib, Agg). False if unavailable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1, alpha=0.8)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return True
