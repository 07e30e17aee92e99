"""gemmakit: inspect, run, chat, serve, quantize, fine-tune, evaluate and export Gemma models."""

__version__ = "0.1.0"

from gemmakit.inference.sampling import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "load"]


def __getattr__(name):
    # LLM and load pull in the model stack; import them on first use.
    if name == "LLM":
        from gemmakit.inference.api import LLM

        return LLM
    if name == "load":
        from gemmakit.loading import load

        return load
    raise AttributeError(name)
