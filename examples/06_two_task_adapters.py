"""6. Two task adapters on one base: SST-2 sentiment and CoLA acceptability; switch, then mix both in one batch.

One frozen all-MiniLM-L6-v2 encoder carries two named LoRA adapters, ``"sst2"`` and ``"cola"``; each task has
its own small head (an ``nn.ModuleDict`` in the module). Each adapter is trained by its own ``LoRA(adapter_name=...)``
callback; training the second leaves the first (and its head) untouched. ``set_active_adapters`` switches;
``per_sample_adapters`` routes each row of one batch through its own task's adapter.

    python examples/06_two_task_adapters.py             # 4,000 rows per task, 1 epoch, full dev sets
    python examples/06_two_task_adapters.py --smoke
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from _common import SMOKE_VAL_BATCHES, glue, parser, setup, table, trainer
from torch import nn
from torchmetrics.functional.classification import binary_accuracy, binary_matthews_corrcoef
from transformers import AutoModel, AutoTokenizer

from lightning_peft import LoRA, adapter_names, per_sample_adapters, set_active_adapters, set_adapter_trainable
from lightning_peft.tasks import resolve_model_path

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class TwoTaskModel(L.LightningModule):
    """A shared encoder (mean-pooled, as sentence-transformers pools MiniLM) and one linear head per task."""

    def __init__(self, tasks: tuple[str, ...] = ("sst2", "cola"), lr: float = 1e-3) -> None:
        super().__init__()
        path = resolve_model_path("all-MiniLM-L6-v2")
        self.encoder = AutoModel.from_pretrained(path, add_pooling_layer=False).train()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.heads = nn.ModuleDict({t: nn.Linear(self.encoder.config.hidden_size, 2) for t in tasks})
        self.task, self.lr = tasks[0], lr  # the task being trained

    def embed(self, batch: dict) -> torch.Tensor:
        hidden = self.encoder(**{k: batch[k] for k in INPUTS if k in batch}).last_hidden_state  # (B, T, H)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1)  # (B, H)

    def on_fit_start(self) -> None:
        set_active_adapters(self.encoder, self.task)  # a newly added adapter is active beside the old ones

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self.heads[self.task](self.embed(batch)), batch["labels"])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


@torch.no_grad()
def predict(model: TwoTaskModel, task: str, batches: list[dict]) -> torch.Tensor:
    set_active_adapters(model.encoder, task)
    return torch.cat([model.heads[task](model.embed(b)).argmax(-1) for b in batches])


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__.split("\n\n")[0], "06_two_task_adapters").parse_args(argv)
    setup(args)
    model = TwoTaskModel()
    rows = 64 if args.smoke else 4000
    data = {t: glue(t, args.data_dir, train_rows=rows, batch_size=16 if args.smoke else 32) for t in model.heads}
    dev, scores, sst2_before = {}, [], None
    for task in model.heads:  # train "sst2", then "cola"
        model.task = task
        model.train()
        for other in (adapter_names(model.encoder) if task != "sst2" else []):
            set_adapter_trainable(model, other, False)  # keep earlier adapters as they are
        lora = LoRA(r=8, alpha=16, target_modules=["query", "key", "value", "dense"], adapter_name=task, trainable_modules=[f"heads.{task}"])
        trainer(args.smoke, callbacks=[lora], limit_val_batches=0).fit(model, data[task])
        dev[task] = list(data[task].val_dataloader())[: SMOKE_VAL_BATCHES if args.smoke else None]
        if task == "sst2":
            sst2_before = predict(model.eval(), "sst2", dev["sst2"])
    model.eval()
    for task, batches in dev.items():
        labels, preds = torch.cat([b["labels"] for b in batches]), predict(model, task, batches)
        scores.append({"adapter": task, "dev rows": len(labels), "dev acc": binary_accuracy(preds, labels).item(),
                       "dev Matthews corr.": binary_matthews_corrcoef(preds, labels).item()})
    sst2_unchanged = bool(torch.equal(sst2_before, predict(model, "sst2", dev["sst2"])))
    print(table(scores))
    print(f"SST-2 predictions after training the CoLA adapter equal those before: {sst2_unchanged}")

    # One batch, rows from both dev sets, each row through its own task's adapter and head.
    picks = [(t, data[t].datasets["val"][i]) for i in range(3) for t in model.heads]
    names = [t for t, _ in picks]
    batch = model.tokenizer.pad([{k: ex[k] for k in INPUTS if k in ex} for _, ex in picks], return_tensors="pt")
    with torch.no_grad(), per_sample_adapters(model.encoder, names):
        pooled = model.embed(batch)  # (6, H): row i through adapter names[i]
        mixed = torch.stack([model.heads[t](pooled[i]) for i, t in enumerate(names)])
    alone = {}
    for t in model.heads:
        set_active_adapters(model.encoder, t)
        with torch.no_grad():
            alone[t] = model.heads[t](model.embed(batch))  # the whole batch through adapter t alone
    mixed_rows = [{"row": i, "task": t, "text": model.tokenizer.decode(ex["input_ids"], skip_special_tokens=True)[:48],
                   "label": ex["labels"], "pred (mixed batch)": int(mixed[i].argmax()), "pred (adapter alone)": int(alone[t][i].argmax()),
                   "max abs logit diff": (mixed[i] - alone[t][i]).abs().max().item()} for i, (t, ex) in enumerate(picks)]
    print(table(mixed_rows))
    return {"scores": scores, "sst2_unchanged": sst2_unchanged, "mixed": mixed_rows,
            "adapters": adapter_names(model.encoder), "mixed_logits": mixed, "alone_logits": alone, "names": names}


if __name__ == "__main__":
    main(sys.argv[1:])
