"""The models an evaluation compares: every combination of models, adapters and quantizations.

`gemmakit eval` takes `--model`, `--adapter` and `--quantize` each repeatable; `settings` turns
them into one `Setting` per combination and `load_setting` loads one, in the order `gemmakit
generate` would run it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Setting:
    """One row of a comparison: a model, an optional adapter and an optional quantization."""

    model: str | None = None
    adapter: str | None = None
    quantize: str | None = None

    @property
    def label(self) -> str:
        parts = [Path(self.model).name if self.model else "bundled"]
        if self.adapter:
            parts.append(f"+{Path(self.adapter).name}")
        parts.append(self.quantize or "none")
        return " ".join(parts)


def _none(value: str | None) -> str | None:
    return None if value is None or str(value).lower() in ("", "none", "base") else value


def settings(
    models: Iterable | None, adapters: Iterable | None, quantizations: Iterable | None
) -> list[Setting]:
    """Every combination of the given models x adapters x quantizations ("none" = without)."""
    ms = [_none(m) for m in (models or [None])]
    adapters_ = [_none(a) for a in (adapters or [None])]
    qs = [_none(q) for q in (quantizations or [None])]
    out = [Setting(m, a, q) for m in ms for a in adapters_ for q in qs]
    return list(dict.fromkeys(out))


def load_setting(setting: Setting, dtype: str = "auto", device: str | None = None):
    """Loads the model of `setting` and applies its adapter, then its quantization.

    The order is `gemmakit.inference.api.LLM`'s, so a row here is the model `generate` would run.
    """
    from gemmakit.inference.api import LLM
    from gemmakit.loading import load

    # A setting quantized below needs the float weights, not a GGUF's own blocks.
    loaded = load(setting.model, dtype=dtype, device=device, keep_blocks=not setting.quantize)
    return LLM(loaded=loaded, quantization=setting.quantize, adapter=setting.adapter).loaded
