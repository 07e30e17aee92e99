"""Which model class runs a config: the one place a family's class is chosen by model_type."""

from __future__ import annotations

import contextlib

import torch
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


# The initializers torch's modules call in reset_parameters.
_INITIALIZERS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_",
    "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
)  # fmt: skip


@contextlib.contextmanager
def _parameter_init_skipped():
    """torch.nn.init's initializers as no-ops, for modules built on the meta device: there they
    compute nothing a loader keeps, and a meta `normal_` goes through torch's reference
    implementation, which imports torch._dynamo: 1.1 s of a 1.7 s load of the bundled model
    (measured with `python -X importtime`). Process-wide while it lasts, as transformers'
    `no_init_weights` is: loaders build one model at a time."""
    saved = {name: getattr(nn.init, name) for name in _INITIALIZERS}
    try:
        for name in saved:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, initializer in saved.items():
            setattr(nn.init, name, initializer)


def build_empty(config: GemmaConfig) -> nn.Module:
    """The model `config` builds, on the meta device (shapes and dtypes, no memory, no
    initialization), for a loader to fill with a checkpoint's tensors."""
    with torch.device("meta"), _parameter_init_skipped():
        return model_class(config)(config)
