"""The ``PTuning`` callback: :mod:`lightning_peft.methods.p_tuning` on a Lightning model."""

from __future__ import annotations

from typing import Literal, Optional

from torch import nn

from lightning_peft.callbacks.base import PEFTCallback
from lightning_peft.core import check_adapter_name
from lightning_peft.methods.p_tuning import check_p_tuning_args, inject_p_tuning

__all__ = ["PTuning"]


class PTuning(PEFTCallback):
    """P-tuning: virtual-token embeddings produced by a prompt encoder (MLP, or bidirectional LSTM + MLP), prepended
    to the input; the base is frozen.

    Works on Hugging Face decoder LMs (training and ``generate()``) and BERT-family encoders. The adapter written by
    ``save_dir`` (Hugging Face PEFT's ``P_TUNING``) holds the encoder's output only; ``fold()`` on the layer drops
    the encoder in memory.

    Args:
        num_virtual_tokens: number of virtual tokens ``n``.
        encoder: ``"mlp"`` (3 layers) or ``"lstm"`` (2-layer bidirectional LSTM, then a 2-layer MLP).
        encoder_hidden_size: the encoder's hidden size; None: the model's hidden size.
        trainable_modules: base modules trained in full and saved with the adapter, e.g. ``["classifier"]``.
        save_dir: write the adapter there in Hugging Face PEFT's format at the end of ``fit``.
        adapter_name: name of this prompt; a model that already carries P-tuning prompts gets it as a further named
            prompt (a sibling layer ``p_tuning_<name>``), switched with ``set_active_adapters`` and routed per row with
            ``per_sample_adapters``.

    Example::

        trainer = L.Trainer(callbacks=[PTuning(num_virtual_tokens=20, encoder="lstm")])
    """

    method_name = "p_tuning"
    recorded_when_set = ("adapter_name",)

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        encoder: Literal["mlp", "lstm"] = "mlp",
        encoder_hidden_size: Optional[int] = None,
        trainable_modules: Optional[list[str]] = None,
        save_dir: Optional[str] = None,
        adapter_name: str = "default",
    ) -> None:
        check_p_tuning_args(num_virtual_tokens, encoder, encoder_hidden_size)
        check_adapter_name(adapter_name)
        super().__init__([], None, trainable_modules, save_dir)
        self.num_virtual_tokens, self.encoder, self.encoder_hidden_size = num_virtual_tokens, encoder, encoder_hidden_size
        self.adapter_name = adapter_name

    def _inject(self, module: nn.Module) -> list[str]:
        return inject_p_tuning(module, self.num_virtual_tokens, self.encoder, self.encoder_hidden_size, self.adapter_name)
