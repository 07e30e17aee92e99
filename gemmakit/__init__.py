"""gemmakit: inspect, run, chat, serve, quantize, fine-tune, evaluate and export Gemma models."""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "load"]


def __getattr__(name):
    # Each pulls in torch (and LLM and load the model stack): imported on first use, so that
    # `import gemmakit` (the CLI's `--help`, `gemmakit cache`) costs no torch import.
    if name == "SamplingParams":
        from gemmakit.inference.sampling import SamplingParams

        return SamplingParams
    if name == "LLM":
        from gemmakit.inference.api import LLM

        return LLM
    if name == "load":
        from gemmakit.loading import load

        return load
    raise AttributeError(name)
