"""Lightning callbacks: one thin callback per method on the shared :class:`PEFTCallback`."""

from lightning_peft.callbacks.adalora import AdaLoRA
from lightning_peft.callbacks.base import PEFTCallback, load_adapter_checkpoint
from lightning_peft.callbacks.bitfit import BitFit
from lightning_peft.callbacks.houlsby import Houlsby
from lightning_peft.callbacks.ia3 import IA3
from lightning_peft.callbacks.llama_adapter import LlamaAdapter
from lightning_peft.callbacks.lora import LoRA
from lightning_peft.callbacks.mam_adapter import MAMAdapter
from lightning_peft.callbacks.parallel_adapter import ParallelAdapter
from lightning_peft.callbacks.p_tuning import PTuning
from lightning_peft.callbacks.p_tuning_v2 import PTuningV2
from lightning_peft.callbacks.prefix_tuning import PrefixTuning
from lightning_peft.callbacks.prompt_tuning import PromptTuning
from lightning_peft.callbacks.selective import Selective
from lightning_peft.callbacks.unipelt import UniPELT

__all__ = [
    "AdaLoRA",
    "BitFit",
    "Houlsby",
    "IA3",
    "LlamaAdapter",
    "LoRA",
    "MAMAdapter",
    "PEFTCallback",
    "ParallelAdapter",
    "PTuning",
    "PTuningV2",
    "PrefixTuning",
    "PromptTuning",
    "Selective",
    "UniPELT",
    "load_adapter_checkpoint",
]
