"""1. LoRA on a LightningModule you already have: one callback in the Trainer, nothing else changes.

``SentimentModule`` below is an ordinary LightningModule (a Hugging Face classifier, cross-entropy, AdamW over
``self.parameters()``), written with no PEFT in mind. ``Trainer(callbacks=[LoRA(...)])`` freezes it, adds LoRA
to its linear layers before the optimizer exists, and trains only the adapters and the new classifier head;
checkpoints hold those tensors only.

    python examples/01_lora_callback.py                 # 4,000 SST-2 rows, 1 epoch, full dev set
    python examples/01_lora_callback.py --smoke         # a few steps
"""

from __future__ import annotations

import sys
import time

import lightning as L
import torch
from _common import glue, parser, setup, table, trainer
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lightning_peft import LoRA, count_parameters
from lightning_peft.tasks import resolve_model_path


class SentimentModule(L.LightningModule):
    """A plain fine-tuning module: it knows nothing about LoRA."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        path = resolve_model_path("all-MiniLM-L6-v2")
        self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).train()  # dropout on
        self.tokenizer = AutoTokenizer.from_pretrained(path)  # TextClassificationData tokenizes with it
        self.lr = lr

    def forward(self, batch):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])

    def training_step(self, batch, batch_idx):
        loss = self(batch).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        acc = (self(batch).logits.argmax(-1) == batch["labels"]).float().mean()
        self.log("val_acc", acc, batch_size=len(batch["labels"]))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)  # frozen parameters simply get no gradient


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__.split("\n\n")[0], "01_lora_callback").parse_args(argv)
    setup(args)
    module = SentimentModule()
    data = glue("sst2", args.data_dir, train_rows=64 if args.smoke else 4000, batch_size=16 if args.smoke else 32)
    base_before = {n: p.detach().clone() for n, p in module.model.named_parameters()}

    # The one line: LoRA r=8 on every linear layer, the new classifier head trained in full.
    lora = LoRA(r=8, alpha=16, target_modules="all-linear", trainable_modules=["model.classifier"])
    fit = trainer(args.smoke, callbacks=[lora])
    start = time.perf_counter()
    fit.fit(module, data)
    seconds = time.perf_counter() - start

    fit.save_checkpoint(args.out / "lora.ckpt", weights_only=True)
    saved = torch.load(args.out / "lora.ckpt", weights_only=True)["state_dict"]
    params = dict(module.model.named_parameters())
    changed = sorted(n for n, p in base_before.items() if not torch.equal(p, params[n].detach()))
    counts = count_parameters(module)
    result = {
        "adapted modules": len(lora.injected),
        "trainable": counts.trainable,
        "of base": counts.base_total,
        "dev acc": float(fit.callback_metrics["val_acc"]),
        "base tensors changed": ", ".join(changed),
        "checkpoint tensors": len(saved),
        "fit seconds": round(seconds, 1),
    }
    print(table([result]))
    return {**result, "changed": changed, "checkpoint_keys": sorted(saved)}


if __name__ == "__main__":
    main(sys.argv[1:])
