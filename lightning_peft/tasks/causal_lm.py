"""Causal language modelling / instruction tuning with a Hugging Face decoder."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch

from lightning_peft.mixin import PEFTMixin
from lightning_peft.tasks._hf import check_vocab_fits, ensure_pad_token, load_tokenizer, resolve_model_path
from lightning_peft.tasks._optim import adamw_with_linear_schedule, check_schedule_args


class CausalLM(PEFTMixin, L.LightningModule):
    """A Hugging Face ``AutoModelForCausalLM`` trained on next-token prediction.

    Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels``, where ``labels`` is
    -100 on positions that carry no loss (prompt and padding), as
    :class:`~lightning_peft.tasks.InstructionData` makes them. The loss is the model's own shifted
    cross-entropy over the remaining tokens. Logs ``train_loss``, ``val_loss`` (token-weighted mean)
    and ``val_ppl`` = exp(``val_loss``).

    Args:
        model_name_or_path: A local model directory (with ``config.json``). Nothing is downloaded.
        tokenizer_name_or_path: Tokenizer directory; None uses ``model_name_or_path``.
        from_config: Build the model from ``config.json`` with random weights (seeded by the global
            seed, e.g. ``seed_everything``) instead of loading a checkpoint. For tiny test models that
            ship only a config.
        learning_rate: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay, applied to weight matrices only.
        warmup_ratio: Fraction of the training steps with a linear warmup; the rate then decays
            linearly to 0 at the last step.

    Example::

        model = CausalLM("path/to/llama", learning_rate=3e-4)
        data = InstructionData(train_file="alpaca.json")
        L.Trainer(max_steps=100, callbacks=[LoRACallback(...)]).fit(model, data)
    """

    def __init__(
        self,
        model_name_or_path: str,
        tokenizer_name_or_path: Optional[str] = None,
        from_config: bool = False,
        learning_rate: float = 3e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
    ) -> None:
        super().__init__()
        check_schedule_args("CausalLM", learning_rate, weight_decay, warmup_ratio)
        self.save_hyperparameters()

        from transformers import AutoConfig, AutoModelForCausalLM

        path = resolve_model_path(model_name_or_path)
        if from_config:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        else:
            # Load in float32 whatever the checkpoint's dtype: precision is the Trainer's choice.
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        # from_pretrained returns the model in eval mode; Lightning keeps the mode it finds at fit start,
        # so without this dropout would stay off during training.
        self.model.train()
        self.tokenizer = load_tokenizer(tokenizer_name_or_path or path)
        ensure_pad_token(self.tokenizer)
        check_vocab_fits(self.tokenizer, self.model, "CausalLM")

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch.get("labels"),
            use_cache=False,
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        # Plain tensors rebuilt every epoch and summed out of place: a torchmetrics state reset inside
        # `Trainer.validate`'s inference mode cannot be updated in place by a later `fit`.
        self._val_nll = torch.zeros((), device=self.device)
        self._val_tokens = torch.zeros((), device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self(batch).loss
        # The model shifts labels by one: weight each batch by the targets it actually scored.
        n_tokens = (batch["labels"][:, 1:] != -100).sum()
        # A batch without targets has a NaN loss; torch.where skips it without a host sync.
        self._val_nll = self._val_nll + torch.where(n_tokens > 0, loss.detach().float() * n_tokens, 0.0)
        self._val_tokens = self._val_tokens + n_tokens

    def on_validation_epoch_end(self) -> None:
        nll, tokens = self.trainer.strategy.reduce(torch.stack([self._val_nll, self._val_tokens]), reduce_op="sum")
        if tokens > 0:
            loss = nll / tokens  # token-weighted mean over all processes
            self.log("val_loss", loss, prog_bar=True)
            self.log("val_ppl", loss.exp())

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return adamw_with_linear_schedule(self, hp.learning_rate, hp.weight_decay, hp.warmup_ratio)
