"""lightning-peft: parameter-efficient fine-tuning as PyTorch Lightning callbacks.

The names below are loaded on first use (PEP 562), so ``import lightning_peft.core`` or
``import lightning_peft.methods.lora`` loads neither Lightning nor transformers: the pure-PyTorch
layers stay importable on their own, and commands start faster.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_peft._version import __version__

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        ["AdaLoRA", "BitFit", "Houlsby", "IA3", "LlamaAdapter", "LoRA", "MAMAdapter", "ParallelAdapter", "PEFTCallback",
         "PrefixTuning", "PromptTuning", "PTuning", "PTuningV2", "Selective", "UniPELT", "load_adapter_checkpoint"],
        "lightning_peft.callbacks",
    ),
    **dict.fromkeys(
        ["AdapterLayer", "ParameterCounts", "adapter_names", "adapter_state_dict", "count_parameters", "delete_adapter",
         "disable_adapters", "merge_adapters", "per_sample_adapters", "set_active_adapters", "set_adapter_trainable",
         "unload", "unmerge_adapters"],
        "lightning_peft.core",
    ),
    **dict.fromkeys(["AdapterFileError", "load_adapter", "save_adapter"], "lightning_peft.io"),
    **dict.fromkeys(["LoRALinear", "add_weighted_adapter"], "lightning_peft.methods.lora"),
    **dict.fromkeys(["apply_loraplus", "loraplus_param_groups"], "lightning_peft.methods.loraplus"),
    "PEFTMixin": "lightning_peft.mixin",
    "QLoRAPrecision": "lightning_peft.plugins",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_peft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from lightning_peft.callbacks import (
        IA3,
        AdaLoRA,
        BitFit,
        Houlsby,
        LlamaAdapter,
        LoRA,
        MAMAdapter,
        ParallelAdapter,
        PEFTCallback,
        PrefixTuning,
        PromptTuning,
        PTuning,
        PTuningV2,
        Selective,
        UniPELT,
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
    from lightning_peft.methods.loraplus import apply_loraplus, loraplus_param_groups
    from lightning_peft.mixin import PEFTMixin
    from lightning_peft.plugins import QLoRAPrecision
