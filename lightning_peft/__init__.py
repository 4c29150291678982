"""lightning-peft: parameter-efficient fine-tuning as PyTorch Lightning callbacks."""

from lightning_peft.callbacks import (
    AdaLoRA,
    BitFit,
    Houlsby,
    IA3,
    LlamaAdapter,
    LoRA,
    ParallelAdapter,
    PEFTCallback,
    PrefixTuning,
    PromptTuning,
    PTuning,
    PTuningV2,
    Selective,
    load_adapter_checkpoint,
)
from lightning_peft.core import (
    AdapterLayer,
    ParameterCounts,
    adapter_names,
    adapter_state_dict,
    count_parameters,
    delete_adapter,
    disable_adapters,
    merge_adapters,
    per_sample_adapters,
    set_active_adapters,
    set_adapter_trainable,
    unload,
    unmerge_adapters,
)
from lightning_peft.io import AdapterFileError, load_adapter, save_adapter
from lightning_peft.methods.lora import LoRALinear, add_weighted_adapter
from lightning_peft.mixin import PEFTMixin
from lightning_peft.plugins import QLoRAPrecision

__version__ = "0.1.0"

__all__ = [
    "AdaLoRA",
    "BitFit",
    "Houlsby",
    "IA3",
    "LlamaAdapter",
    "ParallelAdapter",
    "PrefixTuning",
    "PromptTuning",
    "PTuning",
    "PTuningV2",
    "Selective",
    "AdapterFileError",
    "AdapterLayer",
    "add_weighted_adapter",
    "adapter_names",
    "delete_adapter",
    "load_adapter",
    "per_sample_adapters",
    "set_active_adapters",
    "set_adapter_trainable",
    "unload",
    "LoRA",
    "LoRALinear",
    "PEFTCallback",
    "PEFTMixin",
    "QLoRAPrecision",
    "ParameterCounts",
    "adapter_state_dict",
    "count_parameters",
    "disable_adapters",
    "load_adapter_checkpoint",
    "merge_adapters",
    "save_adapter",
    "unmerge_adapters",
]
