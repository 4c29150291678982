"""Sequence classification (GLUE-style) with a Hugging Face encoder."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from torchmetrics.classification import Accuracy, F1Score, MatthewsCorrCoef

from lightning_peft.mixin import PEFTMixin
from lightning_peft.tasks._hf import check_checkpointing_fits_adapters, load_sequence_classifier
from lightning_peft.tasks._optim import adamw_with_linear_schedule, check_schedule_args
from lightning_peft.validation import check_value

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
        gradient_checkpointing: Recompute each layer's activations in the backward pass instead of keeping
            them (less memory, about one more forward pass per step). Non-reentrant, so it works with a frozen
            base and adapters; the model's class must support it. Key/value prefixes (prefix tuning, P-tuning v2,
            MAM, UniPELT) are refused at fit start: checkpointed layers drop the cache they come through.

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
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_value("SequenceClassifier", "gradient_checkpointing", gradient_checkpointing, bool)
        if num_labels < 2:
            raise ValueError(
                f"SequenceClassifier: num_labels must be >= 2 (cross-entropy over classes), got {num_labels}."
            )
        check_schedule_args("SequenceClassifier", learning_rate, weight_decay, warmup_ratio)
        self.save_hyperparameters()

        self.model, self.tokenizer = load_sequence_classifier(
            model_name_or_path, num_labels, tokenizer_name_or_path, gradient_checkpointing, "SequenceClassifier"
        )

        task, average = ("binary", "micro") if num_labels == 2 else ("multiclass", "macro")
        for stage in ("val", "test"):
            setattr(self, f"{stage}_acc", Accuracy(task=task, num_classes=num_labels))
            setattr(self, f"{stage}_f1", F1Score(task=task, num_classes=num_labels, average=average))
            setattr(self, f"{stage}_mcc", MatthewsCorrCoef(task=task, num_classes=num_labels))

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        inputs = {k: batch[k] for k in _MODEL_INPUTS if k in batch}
        return self.model(**inputs, labels=batch.get("labels"))

    def on_fit_start(self) -> None:
        # the adapters exist now (a PEFT callback injects them in setup): refuse those checkpointing would cut off
        check_checkpointing_fits_adapters(self, "SequenceClassifier")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        out = self(batch)
        preds = out.logits.argmax(dim=-1)  # (B,)
        size = batch["input_ids"].shape[0]
        # Averaged over every process's examples at epoch end, as the metrics below sync themselves: without it,
        # under DDP each rank would log (and checkpoint on) its own share's loss.
        self.log(f"{stage}_loss", out.loss, batch_size=size, sync_dist=True)
        for name in ("acc", "f1", "mcc"):
            metric = getattr(self, f"{stage}_{name}")
            metric.update(preds, batch["labels"])
            self.log(f"{stage}_{name}", metric, prog_bar=stage == "val" and name == "acc", batch_size=size)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        """Predict the class of each example.

        Returns:
            ``{"label": (B,) predicted class ids (argmax of the logits), "probs": (B, num_labels) softmax
            probabilities}``, and ``"label_name"``, the predicted classes' names (B strings), when the Trainer's
            DataModule has ``label_names``. :class:`~lightning_peft.tasks.PredictionWriter` writes one JSON line
            per example from it.
        """
        inputs = {k: batch[k] for k in _MODEL_INPUTS if k in batch}
        logits = self.model(**inputs).logits.float()  # (B, num_labels)
        label = logits.argmax(dim=-1)  # (B,)
        out: dict[str, Any] = {"label": label, "probs": logits.softmax(dim=-1)}
        names = _label_names(getattr(self._trainer, "datamodule", None))
        if names:
            out["label_name"] = [names[i] for i in label.tolist()]
        return out

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return adamw_with_linear_schedule(self, hp.learning_rate, hp.weight_decay, hp.warmup_ratio)


def _label_names(datamodule: Any) -> Optional[list[str]]:
    """The class names a DataModule declares (``label_names``, as an attribute or a hyperparameter), else None."""
    if datamodule is None:
        return None
    names = getattr(datamodule, "label_names", None)
    if names is None:
        names = getattr(datamodule, "hparams", {}).get("label_names")
    return list(names) if names else None
