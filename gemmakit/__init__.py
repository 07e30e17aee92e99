"""gemmakit: inspect, run, chat, serve, quantize, fine-tune, evaluate and export Gemma models."""

__version__ = "0.1.0"
