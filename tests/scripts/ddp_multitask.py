"""MultiTaskData + MultiTaskClassifier in one process or under DDP on 2 CPU processes (run by
tests/tasks/test_multitask_ddp.py as ``python ddp_multitask.py MODE OUT BERT DATA_DIR TASKS_JSON LORA_DROPOUT``).

MODE ``one``: one process, batch 6, ``accumulate_grad_batches=2``: optimizer step t averages the gradients of the
epoch's batches 2t and 2t + 1. MODE ``ddp``: 2 processes, batch 6 each: rank r trains on batches r, r + 2, ... (the
sampler's share), and DDP averages the two: the same steps. Both start from the same adapter and head values (DDP
re-seeds each process before setup, so a fixed generator sets them when training starts). ``ddp`` saves a
checkpoint every 5 steps; MODE ``resume`` continues DDP from the step-5 one (mid-epoch 0, through the epoch boundary),
``resume_one`` tries that in one process. The model's dropout is 0 (saved so); LoRA's is LORA_DROPOUT (0 where one
process is compared with DDP, whose ranks draw other masks). Each rank writes its adapters and heads to
``OUT/<MODE>_rank<r>.pt``.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_peft.callbacks import LoRA  # noqa: E402
from lightning_peft.tasks import MultiTaskClassifier, MultiTaskData  # noqa: E402

TASKS = {"pos": 2, "pair": 2, "three": 3}
STEPS = 12


class FixedStart(L.Callback):
    def on_train_start(self, trainer, pl_module):
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, p in sorted(pl_module.named_parameters()):
                if p.requires_grad:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        self.start = trained(pl_module)
        # each rank its own random numbers (dropout): a resume must give each rank its own back
        torch.manual_seed(100 + trainer.global_rank)


def trained(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n or "modules_to_save" in n}


if __name__ == "__main__":
    mode, out, bert, data_dir, tasks = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
    dropout = float(sys.argv[6])
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = MultiTaskClassifier(TASKS, model_name_or_path=bert, learning_rate=1e-2)
    data = MultiTaskData(tasks, data_dir=data_dir, batch_size=6, group_by_length=True)  # batches of one or two tasks
    start = FixedStart()
    callbacks = [LoRA(r=4, alpha=8, dropout=dropout, adapter_name=name, trainable_modules=["classifier"]) for name in TASKS]
    callbacks += [start] if not mode.startswith("resume") else []
    callbacks += [ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=5, save_top_k=-1)] if mode == "ddp" else []
    ddp = mode in ("ddp", "resume")
    trainer = L.Trainer(
        accelerator="cpu", devices=2 if ddp else 1, strategy="ddp" if ddp else "auto", max_steps=STEPS,
        accumulate_grad_batches=1 if ddp else 2, limit_val_batches=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=mode == "ddp", callbacks=callbacks,
    )
    ckpt = str(next((out / "ckpt").glob("*step=5*.ckpt"))) if mode.startswith("resume") else None
    trainer.fit(model, data, ckpt_path=ckpt)
    torch.save({"trained": trained(model), "start": getattr(start, "start", {})}, out / f"{mode}_rank{trainer.global_rank}.pt")
    if ddp and torch.distributed.is_initialized():
        trainer.strategy.barrier()
        torch.distributed.destroy_process_group()
