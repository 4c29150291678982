"""Lightning precision plugins: QLoRA (4-bit or LLM.int8 frozen base weights through bitsandbytes)."""

from lightning_peft.plugins.qlora import QLoRAPrecision

__all__ = ["QLoRAPrecision"]
