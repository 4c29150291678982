"""The ``UniPELT`` callback: :mod:`lightning_peft.methods.unipelt` on a Lightning model, with its gates logged."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
from torch import nn
from typing_extensions import override

from lightning_peft.callbacks.base import PEFTCallback
from lightning_peft.methods.unipelt import DEFAULT_LORA_TARGETS, check_unipelt_args, gate_means, inject_unipelt

__all__ = ["UniPELT"]


class UniPELT(PEFTCallback):
    """UniPELT (Mao et al., 2022): gated LoRA (query, value), gated prefix tuning and a gated serial adapter per block.

    Each submodule sits behind a learned gate ``sigmoid(W x + b)`` read from its input, so the model learns which
    one to rely on. The same as ``LoRA(gate=True, target_modules=[query/value])``, ``PrefixTuning(gate=True)`` and
    ``Houlsby(sites=["ffn"], gate=True)`` injected in that order. LoRA and the adapter start at zero: at step 0
    the model is the base model with the gated prefixes alone.

    During training the gates' mean values are logged per layer to the Trainer's loggers, every
    ``log_every_n_steps``, as ``unipelt_gate/layer<i>/<gate>`` (``lora_query``, ``lora_value``, ``prefix_key``,
    ``prefix_value``, ``adapter``).

    Args:
        r: LoRA rank.
        alpha: LoRA scale numerator (``s = alpha / r``).
        lora_dropout: dropout on LoRA's input.
        lora_target_modules: LoRA's layers; default: BERT ``query`` / ``value``, Llama-style ``q_proj`` / ``v_proj``.
        num_virtual_tokens: prefix length.
        prefix_hidden_size: width of the prefixes' reparameterizing MLP; None: the model's hidden size.
        bottleneck_size: adapter bottleneck; give this or ``reduction_factor`` (default hidden / 16).
        reduction_factor: bottleneck = hidden size / factor.
        activation: the adapter's nonlinearity.
        adapter_sites: with default adapter targets, ``"ffn"`` (the paper) and/or ``"attention"``.
        adapter_target_modules: modules whose output gets an adapter; None: found by name (``adapter_sites``).
        trainable_modules: base modules trained in full and saved with the adapter, e.g. ``["classifier"]``.
        log_gates: log the gates' mean values during training.

    Example::

        trainer = L.Trainer(callbacks=[UniPELT(trainable_modules=["classifier"])], logger=CSVLogger("logs"))
    """

    method_name = "unipelt"
    not_recorded = ("log_gates",)

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_target_modules: Union[str, list[str]] = list(DEFAULT_LORA_TARGETS),  # noqa: B008  (jsonargparse shows the default)
        num_virtual_tokens: int = 10,
        prefix_hidden_size: Optional[int] = None,
        bottleneck_size: Optional[int] = None,
        reduction_factor: Optional[float] = None,
        activation: Literal["relu", "gelu", "silu", "tanh"] = "relu",
        adapter_sites: list[Literal["attention", "ffn"]] = ["ffn"],  # noqa: B006  (jsonargparse shows the default)
        adapter_target_modules: Optional[Union[str, list[str]]] = None,
        trainable_modules: Optional[list[str]] = None,
        log_gates: bool = True,
    ) -> None:
        check_unipelt_args(r, alpha, lora_dropout, num_virtual_tokens, bottleneck_size, reduction_factor, activation, adapter_sites)
        if not isinstance(lora_target_modules, (str, list, tuple)):
            raise TypeError(f"lora_target_modules must be a string or a list of strings, got {type(lora_target_modules).__name__}: {lora_target_modules!r}.")
        super().__init__([], None, trainable_modules)
        self.r, self.alpha, self.lora_dropout = r, float(alpha), float(lora_dropout)
        self.lora_target_modules = lora_target_modules if isinstance(lora_target_modules, str) else list(lora_target_modules)
        self.num_virtual_tokens, self.prefix_hidden_size = num_virtual_tokens, prefix_hidden_size
        self.bottleneck_size, self.reduction_factor, self.activation = bottleneck_size, reduction_factor, activation
        self.adapter_sites = list(adapter_sites)
        self.adapter_target_modules = (
            adapter_target_modules if adapter_target_modules is None or isinstance(adapter_target_modules, str) else list(adapter_target_modules)
        )
        self.log_gates = log_gates

    def _inject(self, module: nn.Module) -> list[str]:
        return inject_unipelt(
            module, self.r, self.alpha, self.lora_dropout, self.lora_target_modules, self.num_virtual_tokens,
            self.prefix_hidden_size, self.bottleneck_size, self.reduction_factor, self.activation,
            tuple(self.adapter_sites), self.adapter_target_modules,
        )

    @staticmethod
    def gate_means(module: nn.Module) -> dict[str, float]:
        """The mean value of each gate in ``module`` at its last forward, keyed ``layer<i>/<gate>`` (no Trainer needed)."""
        return gate_means(module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.log_gates or not trainer.loggers:
            return
        means = gate_means(pl_module)
        if means:
            pl_module.log_dict({f"unipelt_gate/{k}": v for k, v in means.items()}, on_step=True, on_epoch=False)
