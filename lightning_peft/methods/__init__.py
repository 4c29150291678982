"""Pure-PyTorch PEFT methods, one file per method; usable on any ``nn.Module`` without a Trainer."""

from lightning_peft.methods.lora import LoRALinear, inject_lora
from lightning_peft.methods.lora_layers import LoRAConv, LoRAEmbedding  # registers LoRA on embeddings and convolutions

__all__ = ["LoRAConv", "LoRAEmbedding", "LoRALinear", "inject_lora"]
