"""LoRA under DDP on CPU with 2 processes (run by tests/callbacks/test_lora_callback.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_peft import LoRA  # noqa: E402
from tests.callbacks.helpers import TinyLM, full_loss  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = TinyLM(n=32)
    base = {k: v.clone() for k, v in module.state_dict().items()}
    loss0 = full_loss(module)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=10, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[LoRA(r=4, alpha=8, target_modules="all-linear"), ModelCheckpoint(dirpath=out, save_last=True)],
        default_root_dir=out,
    )
    trainer.fit(module)
    loss1 = full_loss(module)
    # every rank holds the same adapter weights and an untouched base
    for k, v in module.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, base[k]), k
    torch.save({k: v for k, v in module.state_dict().items() if "lora_" in k}, out / f"rank{trainer.global_rank}.pt")
    assert loss1 < loss0 - 0.3, (loss0, loss1)
    if trainer.is_global_zero:
        print(f"DDP_OK loss {loss0:.3f} -> {loss1:.3f}")
    trainer.strategy.barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
