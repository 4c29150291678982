"""lightning-peft: parameter-efficient fine-tuning as PyTorch Lightning callbacks."""

from lightning_peft.callbacks import LoRA, PEFTCallback, load_adapter_checkpoint
from lightning_peft.core import (
    AdapterLayer,
    ParameterCounts,
    adapter_state_dict,
    count_parameters,
    disable_adapters,
    merge_adapters,
    unmerge_adapters,
)
from lightning_peft.io import save_adapter
from lightning_peft.methods.lora import LoRALinear
from lightning_peft.mixin import PEFTMixin

__version__ = "0.1.0"

__all__ = [
    "AdapterLayer",
    "LoRA",
    "LoRALinear",
    "PEFTCallback",
    "PEFTMixin",
    "ParameterCounts",
    "adapter_state_dict",
    "count_parameters",
    "disable_adapters",
    "load_adapter_checkpoint",
    "merge_adapters",
    "save_adapter",
    "unmerge_adapters",
]
