"""Lightning precision plugins: QLoRA (4-bit frozen base weights through bitsandbytes)."""

from lightning_peft.plugins.qlora import QLoRAPrecision

__all__ = ["QLoRAPrecision"]
