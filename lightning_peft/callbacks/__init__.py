"""Lightning callbacks: one thin callback per method on the shared :class:`PEFTCallback`."""

from lightning_peft.callbacks.base import PEFTCallback, load_adapter_checkpoint
from lightning_peft.callbacks.lora import LoRA

__all__ = ["LoRA", "PEFTCallback", "load_adapter_checkpoint"]
