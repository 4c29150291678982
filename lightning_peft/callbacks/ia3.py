"""The ``IA3`` callback: :mod:`lightning_peft.methods.ia3` on a Lightning model."""

from __future__ import annotations

from typing import Optional, Union

from torch import nn

from lightning_peft.callbacks.base import PEFTCallback
from lightning_peft.methods.ia3 import check_ia3_args, inject_ia3

__all__ = ["IA3"]


class IA3(PEFTCallback):
    """(IA)³: learned vectors rescale keys, values and the feed-forward layer's input; the base is frozen.

    With no arguments the targets are Hugging Face PEFT's defaults for the model's family (BERT: ``key``,
    ``value``, ``output.dense``; Llama: ``k_proj``, ``v_proj``, ``down_proj``; GPT-2: ``c_attn``,
    ``mlp.c_proj``), so the adapter equals ``peft.IA3Config()``'s and exports to PEFT's format.

    Args:
        target_modules: layers to rescale: a list of names / dotted suffixes or a regular expression
            matching whole names; None for the per-family defaults.
        feedforward_modules: the targets whose *input* is rescaled (feed-forward down-projections);
            None: the family default with default targets, none otherwise.
        exclude_modules: layers to leave alone, same forms.
        trainable_modules: base modules trained in full and saved with the adapter, e.g. ``["classifier"]``.
        save_dir: write the adapter there in Hugging Face PEFT's format at the end of ``fit``.

    Example::

        trainer = L.Trainer(callbacks=[IA3(trainable_modules=["classifier"])])
    """

    method_name = "ia3"

    def __init__(
        self,
        target_modules: Optional[Union[str, list[str]]] = None,
        feedforward_modules: Optional[Union[str, list[str]]] = None,
        exclude_modules: Optional[Union[str, list[str]]] = None,
        trainable_modules: Optional[list[str]] = None,
        save_dir: Optional[str] = None,
    ) -> None:
        if feedforward_modules is not None and not isinstance(feedforward_modules, (str, list, tuple)):
            raise TypeError(f"feedforward_modules must be a string or a list of strings, got {type(feedforward_modules).__name__}.")
        check_ia3_args(target_modules, feedforward_modules)
        super().__init__(target_modules if target_modules is not None else [], exclude_modules, trainable_modules, save_dir)
        self.target_modules = target_modules if target_modules is None or isinstance(target_modules, str) else list(target_modules)
        self.feedforward_modules = feedforward_modules if feedforward_modules is None or isinstance(feedforward_modules, str) else list(feedforward_modules)

    def _inject(self, module: nn.Module) -> list[str]:
        return inject_ia3(module, self.target_modules, self.feedforward_modules, self.exclude_modules)
