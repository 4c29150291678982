"""PredictionWriter under DDP on CPU with 2 processes (run by tests/tasks/test_writer.py).

Launched as a script with ``strategy="ddp"`` (Lightning re-runs it for rank 1) rather than with ``ddp_spawn`` inside
pytest: a spawned child that exits with its gloo process group still alive can abort in C++ ("terminate called without
an active exception"), which failed CI once. Here each rank destroys its process group before it exits.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_peft.tasks import PredictionWriter  # noqa: E402


class Constant(L.LightningModule):
    """Predicts each example's own index, so a row written for the wrong example shows."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def predict_step(self, batch, batch_idx):
        return {"value": batch * 10}

    def predict_dataloader(self):
        return DataLoader(torch.arange(7), batch_size=2)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[PredictionWriter(str(out))])
    trainer.predict(Constant(), return_predictions=False)
    trainer.strategy.barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
