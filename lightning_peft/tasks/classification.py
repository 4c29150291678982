"""Sequence classification (GLUE-style) with a Hugging Face encoder."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from torchmetrics.classification import Accuracy, F1Score, MatthewsCorrCoef

from lightning_peft.mixin import PEFTMixin
from lightning_peft.tasks._hf import check_vocab_fits, load_tokenizer, resolve_model_path
from lightning_peft.tasks._optim import adamw_with_linear_schedule, check_schedule_args

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class SequenceClassifier(PEFTMixin, L.LightningModule):
    """A Hugging Face ``AutoModelForSequenceClassification`` trained with cross-entropy.

    Batches are dicts with ``input_ids``, ``attention_mask``, optionally ``token_type_ids``, and
    ``labels`` (class ids), as :class:`~lightning_peft.tasks.TextClassificationData` makes them.
    Logs ``train_loss``, ``val_loss``/``val_acc``/``val_f1``/``val_mcc`` and the ``test_`` equivalents (F1 is
    binary for two labels, macro-averaged otherwise; MCC is Matthews' correlation, CoLA's metric). The model is built in ``__init__``; a PEFT
    callback freezes it and adds adapters before the optimizer is created.

    Args:
        model_name_or_path: A local model directory (with ``config.json``) or the alias
            ``"all-MiniLM-L6-v2"``. Nothing is downloaded.
        num_labels: Number of classes (at least 2).
        learning_rate: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay, applied to weight matrices only.
        warmup_ratio: Fraction of the training steps with a linear warmup; the rate then decays
            linearly to 0 at the last step.
        tokenizer_name_or_path: Tokenizer directory; None uses ``model_name_or_path``.

    Example::

        model = SequenceClassifier("all-MiniLM-L6-v2", num_labels=2)
        data = TextClassificationData(train_file="train.tsv", val_file="dev.tsv")
        L.Trainer(max_steps=100).fit(model, data)
    """

    def __init__(
        self,
        model_name_or_path: str = "all-MiniLM-L6-v2",
        num_labels: int = 2,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.06,
        tokenizer_name_or_path: Optional[str] = None,
    ) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(
                f"SequenceClassifier: num_labels must be >= 2 (cross-entropy over classes), got {num_labels}."
            )
        check_schedule_args("SequenceClassifier", learning_rate, weight_decay, warmup_ratio)
        self.save_hyperparameters()

        from transformers import AutoModelForSequenceClassification

        path = resolve_model_path(model_name_or_path)
        # Load in float32 whatever the checkpoint's dtype: precision is the Trainer's choice.
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, dtype=torch.float32, local_files_only=True
        )
        # from_pretrained returns the model in eval mode; Lightning keeps the mode it finds at fit start,
        # so without this dropout would stay off during training.
        self.model.train()
        self.tokenizer = load_tokenizer(tokenizer_name_or_path or path)
        check_vocab_fits(self.tokenizer, self.model, "SequenceClassifier")

        task, average = ("binary", "micro") if num_labels == 2 else ("multiclass", "macro")
        for stage in ("val", "test"):
            setattr(self, f"{stage}_acc", Accuracy(task=task, num_classes=num_labels))
            setattr(self, f"{stage}_f1", F1Score(task=task, num_classes=num_labels, average=average))
            setattr(self, f"{stage}_mcc", MatthewsCorrCoef(task=task, num_classes=num_labels))

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        inputs = {k: batch[k] for k in _MODEL_INPUTS if k in batch}
        return self.model(**inputs, labels=batch.get("labels"))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        out = self(batch)
        preds = out.logits.argmax(dim=-1)  # (B,)
        size = batch["input_ids"].shape[0]
        self.log(f"{stage}_loss", out.loss, batch_size=size)
        for name in ("acc", "f1", "mcc"):
            metric = getattr(self, f"{stage}_{name}")
            metric.update(preds, batch["labels"])
            self.log(f"{stage}_{name}", metric, prog_bar=stage == "val" and name == "acc", batch_size=size)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Return ``{"preds": (B,) class ids, "probs": (B, num_labels) softmax probabilities}``."""
        inputs = {k: batch[k] for k in _MODEL_INPUTS if k in batch}
        probs = self.model(**inputs).logits.float().softmax(dim=-1)
        return {"preds": probs.argmax(dim=-1), "probs": probs}

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return adamw_with_linear_schedule(self, hp.learning_rate, hp.weight_decay, hp.warmup_ratio)
