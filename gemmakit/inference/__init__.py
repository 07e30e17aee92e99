"""Inference: sampling, the batched generation engine, text streaming and the Python `LLM` API."""
