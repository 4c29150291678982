"""Causal language modelling / instruction tuning with a Hugging Face decoder."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch

from lightning_peft.mixin import PEFTMixin
from lightning_peft.tasks._hf import (
    check_checkpointing_fits_adapters,
    check_vocab_fits,
    enable_gradient_checkpointing,
    ensure_pad_token,
    load_tokenizer,
    resolve_model_path,
)
from lightning_peft.tasks._optim import adamw_with_linear_schedule, check_schedule_args
from lightning_peft.tasks.generation import check_generation_args, generate_ids, strip_stop
from lightning_peft.validation import check_value


_SHARDED_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


class CausalLM(PEFTMixin, L.LightningModule):
    """A Hugging Face ``AutoModelForCausalLM`` trained on next-token prediction.

    Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels``, where ``labels`` is
    -100 on positions that carry no loss (prompt and padding), as
    :class:`~lightning_peft.tasks.InstructionData` makes them; packed batches carry ``position_ids``
    instead of an attention mask. The loss is the model's own shifted cross-entropy over the remaining
    tokens. Logs ``train_loss``, ``val_loss`` (token-weighted mean) and ``val_ppl`` = exp(``val_loss``).

    ``Trainer.predict`` generates a response to each prompt of the DataModule's ``predict_file``
    (``{"index", "prompt", "completion"}`` per example: add a
    :class:`~lightning_peft.tasks.PredictionWriter` to write them to a file).

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
        gradient_checkpointing: Recompute each decoder layer's activations in the backward pass instead of
            keeping them (less memory, about one more forward pass per step). Non-reentrant, so it works with a
            frozen base and adapters; the model's class must support it. Key/value prefixes (prefix tuning, P-tuning v2,
            MAM, UniPELT) are refused at fit start: checkpointed layers drop the cache they come through.
        max_new_tokens: Most tokens generated per response (``predict`` and ``val_generations``).
        temperature: 0 is greedy decoding; above 0, tokens are sampled at this temperature.
        top_p: Nucleus sampling threshold (with ``temperature`` > 0).
        val_generations: After each validation epoch, generate responses to the prompts of the first this many
            validation examples and log them (printed, and as text to a TensorBoard or W&B logger). 0: none.

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
        gradient_checkpointing: bool = False,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        val_generations: int = 0,
    ) -> None:
        super().__init__()
        check_value("CausalLM", "gradient_checkpointing", gradient_checkpointing, bool)
        check_value("CausalLM", "from_config", from_config, bool)  # the string "false" would build random weights
        check_generation_args("CausalLM", max_new_tokens, temperature, top_p)
        if isinstance(val_generations, bool) or not isinstance(val_generations, int) or val_generations < 0:
            raise ValueError(f"CausalLM: val_generations must be an integer >= 0, got {val_generations!r}.")
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
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.model, "CausalLM")
        self.tokenizer = load_tokenizer(tokenizer_name_or_path or path)
        ensure_pad_token(self.tokenizer)
        check_vocab_fits(self.tokenizer, self.model, "CausalLM")

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        # no cache: transformers then also recognises packed rows (position_ids restarting at 0, no attention mask)
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            labels=batch.get("labels"),
            use_cache=False,
        )

    def on_fit_start(self) -> None:
        # the adapters exist now (a PEFT callback injects them in setup): refuse those checkpointing would cut off
        check_checkpointing_fits_adapters(self, "CausalLM")
        if self.hparams.get("val_generations", 0):
            self._check_generation_strategy("val_generations > 0")

    def on_validation_start(self) -> None:  # Trainer.validate too, not only fit
        if self.hparams.get("val_generations", 0):
            self._check_generation_strategy("val_generations > 0")

    def on_predict_start(self) -> None:
        self._check_generation_strategy("Trainer.predict")

    def _check_generation_strategy(self, what: str) -> None:
        # generation runs a data-dependent number of forward passes, on one process (validation) or per process
        # (predict): with parameters sharded across processes, those would wait for each other forever
        name = type(self.trainer.strategy).__name__
        if name in _SHARDED_STRATEGIES:
            raise ValueError(
                f"CausalLM: {what} generates text, which is not supported under {name} (parameters sharded across "
                "processes). Generate after training with `lightning-peft generate` (or set val_generations: 0)."
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
        self._val_prompts: list[list[int]] = []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self(batch).loss
        # The model shifts labels by one: weight each batch by the targets it actually scored.
        n_tokens = (batch["labels"][:, 1:] != -100).sum()
        # A batch without targets has a NaN loss; torch.where skips it without a host sync.
        self._val_nll = self._val_nll + torch.where(n_tokens > 0, loss.detach().float() * n_tokens, 0.0)
        self._val_tokens = self._val_tokens + n_tokens
        wanted = self.hparams.get("val_generations", 0) - len(self._val_prompts)
        if wanted > 0 and not self.trainer.sanity_checking:
            # an example's prompt: its tokens before the first one with a loss (its first response)
            for ids, labels in zip(batch["input_ids"][:wanted].tolist(), batch["labels"][:wanted].tolist()):
                first = next((i for i, label in enumerate(labels) if label != -100), None)
                if first:
                    self._val_prompts.append(ids[:first])

    def on_validation_epoch_end(self) -> None:
        nll, tokens = self.trainer.strategy.reduce(torch.stack([self._val_nll, self._val_tokens]), reduce_op="sum")
        if tokens > 0:
            loss = nll / tokens  # token-weighted mean over all processes
            # Already reduced: every process holds the same value, so sync_dist=True averages equal values (one scalar
            # all-reduce per epoch). It is there because Lightning warns about any epoch-level value logged without it
            # under DDP (sync_dist=False does not silence that), telling users to add what the value does not need.
            self.log("val_loss", loss, prog_bar=True, sync_dist=True)
            self.log("val_ppl", loss.exp(), sync_dist=True)
        if self._val_prompts and self.trainer.is_global_zero:
            self._log_generations(self._val_prompts)

    def _stop_sequences(self) -> list[list[int]]:
        # a chat template's turn end (which the model learned), from the DataModule that formatted the prompts
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return data.generation_stop() if hasattr(data, "generation_stop") else []

    def _generate(self, prompts: list[list[int]]) -> list[list[int]]:
        hp = self.hparams
        return generate_ids(
            self.model, self.tokenizer, prompts, hp.max_new_tokens, hp.temperature, hp.top_p,
            stop_sequences=self._stop_sequences(),
        )

    def _log_generations(self, prompts: list[list[int]]) -> None:
        from lightning.pytorch.utilities import rank_zero_info

        decode = self.tokenizer.decode
        stops = self._stop_sequences()
        samples = [
            (decode(p, skip_special_tokens=True), decode(strip_stop(new, self.tokenizer, stops), skip_special_tokens=True))
            for p, new in zip(prompts, self._generate(prompts))
        ]
        step = self.global_step
        rank_zero_info("\n".join([f"Sample generations at step {step}:"] + [f"--- prompt: {p!r}\n    response: {r!r}" for p, r in samples]))
        text = "\n\n".join(f"**prompt:** {p}\n\n**response:** {r}" for p, r in samples)
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(logger, "log_text"):  # W&B
                logger.log_text(key="val_generations", columns=["prompt", "response"], data=[list(s) for s in samples], step=step)
            elif hasattr(experiment, "add_text"):  # TensorBoard
                experiment.add_text("val_generations", text, global_step=step)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        """Generate a response to each prompt of a batch (left-padded prompts, as ``InstructionData`` makes them)."""
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        new, stops = self._generate(prompts), self._stop_sequences()
        decode = self.tokenizer.decode
        out: dict[str, Any] = {
            "prompt": [decode(p, skip_special_tokens=True) for p in prompts],
            "completion": [decode(strip_stop(t, self.tokenizer, stops), skip_special_tokens=True) for t in new],
            "tokens": new,
        }
        if "index" in batch:
            out["index"] = batch["index"]
        return out

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return adamw_with_linear_schedule(self, hp.learning_rate, hp.weight_decay, hp.warmup_ratio)
