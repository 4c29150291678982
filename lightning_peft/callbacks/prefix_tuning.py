"""The ``PrefixTuning`` callback: :mod:`lightning_peft.methods.prefix_tuning` on a Lightning model."""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_peft.callbacks.base import PEFTCallback
from lightning_peft.core import check_adapter_name
from lightning_peft.methods._prompt import check_num_virtual_tokens
from lightning_peft.methods.prefix_tuning import inject_prefix_tuning

__all__ = ["PrefixTuning"]


class PrefixTuning(PEFTCallback):
    """Prefix tuning: learned key/value prefixes at every attention layer, trained through an MLP; the base is frozen.

    Works on Hugging Face decoder LMs (Llama, GPT-2, Qwen2, ...; training and ``generate()``) and on BERT-family
    encoders. The adapter written by ``save_dir`` (Hugging Face PEFT's ``PREFIX_TUNING``) holds the per-layer
    prefixes only; ``model.<hf model>.prefix_tuning.fold()`` drops the MLP in memory.

    Args:
        num_virtual_tokens: the prefix length ``n``.
        encoder_hidden_size: hidden size of the reparameterizing MLP; None: the model's hidden size.
        trainable_modules: base modules trained in full and saved with the adapter, e.g. ``["classifier"]``.
        gate: scale each layer's prefix keys and values by a learned gate read from the layer's attention input
            (UniPELT; one value per sample, see :mod:`lightning_peft.methods._prompt`); no PEFT format then.
        save_dir: write the adapter there in Hugging Face PEFT's format at the end of ``fit``.
        adapter_name: name of this prompt; a model that already carries prefix-tuning prompts gets it as a further named
            prompt (a sibling layer ``prefix_tuning_<name>``), switched with ``set_active_adapters`` and routed per row with
            ``per_sample_adapters``.

    Example::

        trainer = L.Trainer(callbacks=[PrefixTuning(num_virtual_tokens=20)])
    """

    method_name = "prefix_tuning"
    recorded_when_set = ("gate", "adapter_name")

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        encoder_hidden_size: Optional[int] = None,
        trainable_modules: Optional[list[str]] = None,
        save_dir: Optional[str] = None,
        gate: bool = False,
        adapter_name: str = "default",
    ) -> None:
        check_num_virtual_tokens(num_virtual_tokens)
        check_adapter_name(adapter_name)
        super().__init__([], None, trainable_modules, save_dir)
        self.num_virtual_tokens, self.encoder_hidden_size = num_virtual_tokens, encoder_hidden_size
        self.gate = bool(gate)
        self.adapter_name = adapter_name

    def _inject(self, module: nn.Module) -> list[str]:
        return inject_prefix_tuning(
            module, self.num_virtual_tokens, projection=True, encoder_hidden_size=self.encoder_hidden_size, gate=self.gate, adapter_name=self.adapter_name,
        )
