"""Pure-PyTorch PEFT methods, one file per method; usable on any ``nn.Module`` without a Trainer."""

from lightning_peft.methods.lora import LoRALinear, inject_lora

__all__ = ["LoRALinear", "inject_lora"]
