"""Which model class runs a config: the one place a family's class is chosen by model_type."""

from __future__ import annotations

from torch import nn

from gemmakit.config import GemmaConfig
from gemmakit.errors import ConfigError
from gemmakit.model.gemma import Gemma
from gemmakit.model.gemma3n import Gemma3n
from gemmakit.model.gemma4 import Gemma4

# model_type -> the class that computes it. Gemma 1-3 share one class (their differences are
# config behaviours); Gemma 3n and 4 add maths of their own.
MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "gemma": Gemma,
    "gemma2": Gemma,
    "gemma3_text": Gemma,
    "gemma3n_text": Gemma3n,
    "gemma4_text": Gemma4,
}


def model_class(config: GemmaConfig) -> type[nn.Module]:
    """The class to build for `config` (a Gemma subclass, with Gemma's interface)."""
    try:
        return MODEL_CLASSES[config.model_type]
    except KeyError:
        raise ConfigError(f"no gemmakit model for model_type {config.model_type!r}") from None
