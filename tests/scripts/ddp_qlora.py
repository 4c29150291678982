"""QLoRA under DDP on CPU with 2 processes (run by tests/plugins/test_qlora.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_peft.callbacks.lora import LoRA  # noqa: E402
from lightning_peft.plugins.qlora import QLoRAPrecision  # noqa: E402
from lightning_peft.quant import is_quantized  # noqa: E402
from tests.callbacks.helpers import TinyLM, full_loss  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = TinyLM(n=32)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=8, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, plugins=[QLoRAPrecision()], callbacks=[LoRA(r=4, alpha=8)],
    )
    trainer.fit(module)
    assert is_quantized(module.model.model.layers[0].self_attn.q_proj.weight)
    torch.save({k: v for k, v in module.state_dict().items() if "lora_" in k}, out / f"rank{trainer.global_rank}.pt")
    if trainer.is_global_zero:
        print(f"DDP_OK loss {full_loss(module):.3f}")
    trainer.strategy.barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
