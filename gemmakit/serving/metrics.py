"""`GET /metrics`: the scheduler's counters in Prometheus' text exposition format (0.0.4).

Written by hand (the format is a few lines per metric) from `Scheduler.stats`
(`SchedulerStats`) and the queue: counters end in `_total`, the time to first token is a
summary over the last 1000 rows (the window `SchedulerStats` keeps), and the generation rate
is a gauge over the time since the previous scrape, for a reader without PromQL's `rate()`.
"""

from __future__ import annotations

import math
import time

from gemmakit.inference.engine import SpeculationStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "gemmakit"
QUANTILES = (0.5, 0.9, 0.95, 0.99)


def _quantile(sorted_values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation between order statistics (numpy's default)."""
    if not sorted_values:
        return math.nan
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class Metrics:
    """Renders one scheduler's metrics; remembers the last scrape for the rate gauge."""

    def __init__(self, scheduler, model_name: str):
        self.scheduler, self.model_name = scheduler, model_name
        self.started = time.monotonic()
        self._last = (self.started, 0)

    def render(self) -> str:
        s = self.scheduler.stats
        now = time.monotonic()
        last_time, last_tokens = self._last
        self._last = (now, s.generated_tokens)
        rate = (s.generated_tokens - last_tokens) / max(now - last_time, 1e-9)
        finished = {}
        for reason, _ in list(s.finished):
            finished[reason] = finished.get(reason, 0) + 1
        lines: list[str] = []
        self._metric(
            lines,
            "requests_started_total",
            "counter",
            "Rows (one per prompt and choice) that started.",
            s.rows,
        )
        self._metric(
            lines, "requests_cancelled_total", "counter", "Rows cancelled by their client.", s.cancelled
        )
        self._metric(lines, "requests_waiting", "gauge", "Rows queued for a batch.", self.scheduler.waiting)
        self._metric(lines, "requests_running", "gauge", "Rows in the running batch.", self.scheduler.running)
        self._metric(lines, "batches_total", "counter", "Batches run.", s.batches)
        sizes = list(s.batch_sizes)
        self._metric(lines, "batch_size", "gauge", "Rows in the latest batch.", sizes[-1] if sizes else 0)
        self._metric(lines, "batch_size_max", "gauge", "The largest batch since start.", s.max_batch_seen)
        self._metric(
            lines,
            "prompt_tokens_total",
            "counter",
            "Prompt tokens of the rows that started.",
            s.prompt_tokens,
        )
        self._metric(
            lines, "prefix_cache_hit_tokens_total", "counter",
            "Prompt tokens whose keys and values were reused from the prefix cache.", s.prefix_hit_tokens,
        )  # fmt: skip
        self._metric(lines, "generation_tokens_total", "counter", "Tokens generated.", s.generated_tokens)
        self._metric(
            lines, "generation_tokens_per_second", "gauge", "Tokens generated per second since the previous scrape.", rate
        )  # fmt: skip
        self._speculation(lines)
        self._finished(lines, finished)
        self._ttft(lines, sorted(s.time_to_first_token))
        self._metric(
            lines, "uptime_seconds", "gauge", "Seconds since the server started.", now - self.started
        )
        return "\n".join(lines) + "\n"

    def _labels(self, extra: str = "") -> str:
        model = self.model_name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'{{model_name="{model}"{extra}}}'

    def _metric(self, lines: list[str], name: str, kind: str, help_text: str, value: float) -> None:
        name = f"{PREFIX}_{name}"
        lines += [
            f"# HELP {name} {help_text}",
            f"# TYPE {name} {kind}",
            f"{name}{self._labels()} {_number(value)}",
        ]

    def _speculation(self, lines: list[str]) -> None:
        """What requests' speculative decoding did (`speculative.EngineSpeculation.totals`)."""
        engine = getattr(self.scheduler, "engine", None)
        totals = engine.speculation.totals if engine is not None else SpeculationStats()
        for name, kind, help_text, value in (
            ("speculative_steps_total", "counter", "Decode steps of speculating rows.", totals.steps),
            ("speculative_proposed_tokens_total", "counter", "Tokens proposed to verification.", totals.proposed),
            ("speculative_accepted_tokens_total", "counter", "Proposed tokens kept.", totals.accepted),
            ("speculative_acceptance_rate", "gauge", "Accepted / proposed tokens since start.", totals.acceptance_rate),
            ("speculative_tokens_per_step", "gauge", "Tokens a speculating row gained per step since start.",
             totals.tokens_per_step),
        ):  # fmt: skip
            self._metric(lines, name, kind, help_text, value)

    def _finished(self, lines: list[str], finished: dict[str, int]) -> None:
        name = f"{PREFIX}_recent_finished_requests"
        lines += [
            f"# HELP {name} Finish reasons of the last 1000 rows that ended.",
            f"# TYPE {name} gauge",
        ]
        for reason in sorted(finished):
            label = self._labels(f',finish_reason="{reason}"')
            lines.append(f"{name}{label} {finished[reason]}")

    def _ttft(self, lines: list[str], values: list[float]) -> None:
        name = f"{PREFIX}_time_to_first_token_seconds"
        lines += [
            f"# HELP {name} Seconds from submission to a row's first token, over the last 1000 rows.",
            f"# TYPE {name} summary",
        ]
        for q in QUANTILES:
            label = self._labels(f',quantile="{q}"')
            lines.append(f"{name}{label} {_number(_quantile(values, q))}")
        lines.append(f"{name}_sum{self._labels()} {_number(sum(values))}")
        lines.append(f"{name}_count{self._labels()} {len(values)}")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    return repr(float(value))
