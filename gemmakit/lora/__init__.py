"""LoRA: low-rank adapters on a frozen base (layers), put on and merged back (apply), saved
and loaded in PEFT's format (peft)."""

from gemmakit.lora.apply import LoraSettings, apply_lora, lora_modules, merge
from gemmakit.lora.layers import LoRAEmbedding, LoRALinear, LoRAParameters
from gemmakit.lora.peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    adapter_parameters,
    adapter_state_dict,
    load_adapter,
    load_adapter_state,
    peft_config,
    read_adapter,
    save_adapter,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "PEFT_PREFIX",
    "LoRAEmbedding",
    "LoRALinear",
    "LoRAParameters",
    "LoraSettings",
    "adapter_parameters",
    "adapter_state_dict",
    "apply_lora",
    "load_adapter",
    "load_adapter_state",
    "lora_modules",
    "merge",
    "peft_config",
    "read_adapter",
    "save_adapter",
]
