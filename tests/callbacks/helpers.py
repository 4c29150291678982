"""A small LightningModule around a tiny Llama, used by the callback tests and the DDP script."""

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import tiny_llama


def token_data(n: int = 16, seq: int = 12, seed: int = 0) -> torch.Tensor:
    """Learnable sequences: each row counts up by a per-row step from a random start (mod 128)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 128, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return (start + step * torch.arange(seq)) % 128


class TinyLM(L.LightningModule):
    """Builds its model in ``__init__``; the optimizer gets ``self.parameters()`` or only trainable ones."""

    def __init__(self, opt: str = "all", lr: float = 1e-2, n: int = 16, batch_size: int = 4) -> None:
        super().__init__()
        self.opt, self.lr, self.n, self.batch_size = opt, lr, n, batch_size
        self.model = self.build()

    def build(self):
        return tiny_llama(seed=0).train()

    def forward(self, ids):
        return self.model(input_ids=ids).logits

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        (ids,) = batch
        self.log("val_loss", self.model(input_ids=ids, labels=ids).loss)

    def train_dataloader(self):
        return DataLoader(TensorDataset(token_data(self.n)), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(TensorDataset(token_data(8, seed=1)), batch_size=4)

    def configure_optimizers(self):
        params = self.parameters() if self.opt == "all" else [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr)


class TinyLMConfigureModel(TinyLM):
    """Builds its model in ``configure_model`` (idempotent, as Lightning asks)."""

    def build(self):
        return None

    def configure_model(self):
        if self.model is None:
            self.model = tiny_llama(seed=0).train()


def full_loss(module) -> float:
    with torch.no_grad():
        ids = token_data(module.n)
        return module.model(input_ids=ids, labels=ids).loss.item()


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0
