"""The Gemma model: reference maths in PyTorch (layers), its KV cache, the causal LM."""
