"""The ``PTuningV2`` callback: :mod:`lightning_peft.methods.p_tuning_v2` on a Lightning model."""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_peft.callbacks.base import PEFTCallback
from lightning_peft.methods._prompt import check_num_virtual_tokens
from lightning_peft.methods.p_tuning_v2 import inject_p_tuning_v2

__all__ = ["PTuningV2"]


class PTuningV2(PEFTCallback):
    """P-tuning v2: deep prompts (key/value prefixes) at every layer, trained directly; the base is frozen.

    Works on Hugging Face decoder LMs and on BERT-family encoders with classification or token-classification
    heads. Exports as Hugging Face PEFT's ``PREFIX_TUNING`` with ``prefix_projection=false``.

    Args:
        num_virtual_tokens: the prompt length ``n`` at every layer.
        trainable_modules: base modules trained in full and saved with the adapter, e.g. ``["classifier"]``.
        save_dir: write the adapter there in Hugging Face PEFT's format at the end of ``fit``.

    Example::

        trainer = L.Trainer(callbacks=[PTuningV2(num_virtual_tokens=20, trainable_modules=["classifier"])])
    """

    method_name = "p_tuning_v2"

    def __init__(self, num_virtual_tokens: int = 20, trainable_modules: Optional[list[str]] = None, save_dir: Optional[str] = None) -> None:
        check_num_virtual_tokens(num_virtual_tokens)
        super().__init__([], None, trainable_modules, save_dir)
        self.num_virtual_tokens = num_virtual_tokens

    def _inject(self, module: nn.Module) -> list[str]:
        return inject_p_tuning_v2(module, self.num_virtual_tokens)
