"""Exact parameter accounting and memory planning from a config alone: no weights are read.

The figures behind `gemmakit inspect`, one concern per module, each built on the one before:
    towers           the vision / audio towers of multimodal checkpoints (SigLIP, Gemma 4's)
    architecture     `Architecture` and its tensor list, from a GemmaConfig, a config.json
                     dict (Gemma, Llama, Mistral, Qwen2) or a GGUF header
    params           parameter counts (total, embedding, non-embedding, per-layer embedding,
                     effective, active per token, vision, audio, LoRA)
    weights          weight bytes per precision (bitsandbytes int8/NF4, llama.cpp GGUF types)
    kv_cache         KV cache bytes of the KV-owning layers, sliding ones capped at their window
    activations      activation bytes of a forward, and of a training step per token and layer
    training_memory  one fine-tuning step item by item (full, 8-bit AdamW, LoRA, QLoRA)
    report           one model's report and its JSON form
    prose            the notes and sentences printed around the numbers

Every count comes from `Architecture.tensors()`, so totals, the embedding split, per-precision
bytes and the GGUF type of each tensor agree by construction. Units: bytes everywhere; the
printed GB is 10**9 bytes. Estimates state their rule in the docstring of the function that
makes them.
"""
