"""The ``LoRA`` callback: :mod:`lightning_peft.methods.lora` on a Lightning model."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from torch import nn

from lightning_peft.callbacks.base import PEFTCallback
from lightning_peft.methods.lora import check_lora_args, inject_lora

__all__ = ["LoRA"]


class LoRA(PEFTCallback):
    """Low-Rank Adaptation of the base model's linear layers; the base is frozen.

    Args:
        r: rank of each update ``B A``.
        alpha: scale numerator, ``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout on the adapter's input, in [0, 1).
        target_modules: ``"all-linear"``, a regular expression matching whole module names, or a list of
            names / dotted suffixes (``["q_proj", "v_proj"]``, ``["query", "value"]`` for BERT).
        exclude_modules: modules to leave alone, same forms.
        use_rslora: rank-stabilized scaling ``alpha / sqrt(r)``.
        init: initialisation of ``A``: ``"kaiming"`` (uniform) or ``"gaussian"``; ``B`` starts at zero.
        trainable_modules: base modules trained in full and saved with the adapter, e.g. ``["classifier"]``.
        save_dir: write the adapter there in Hugging Face PEFT's format at the end of ``fit``.

    Example::

        trainer = L.Trainer(callbacks=[LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"])])
    """

    method_name = "lora"

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: Union[str, list[str]] = "all-linear",
        exclude_modules: Optional[Union[str, list[str]]] = None,
        use_rslora: bool = False,
        init: Literal["kaiming", "gaussian"] = "kaiming",
        trainable_modules: Optional[list[str]] = None,
        save_dir: Optional[str] = None,
    ) -> None:
        check_lora_args(r, alpha, dropout, init)
        super().__init__(target_modules, exclude_modules, trainable_modules, save_dir)
        self.r, self.alpha, self.dropout, self.use_rslora, self.init = r, float(alpha), float(dropout), use_rslora, init

    def config(self) -> dict[str, Any]:
        return {**super().config(), "r": self.r, "alpha": self.alpha, "dropout": self.dropout, "use_rslora": self.use_rslora, "init": self.init}

    def _inject(self, module: nn.Module) -> list[str]:
        return inject_lora(
            module, self.target_modules, self.exclude_modules, r=self.r, alpha=self.alpha, dropout=self.dropout,
            use_rslora=self.use_rslora, init=self.init,
        )
