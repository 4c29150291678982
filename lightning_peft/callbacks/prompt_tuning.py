"""The ``PromptTuning`` callback: :mod:`lightning_peft.methods.prompt_tuning` on a Lightning model."""

from __future__ import annotations

from typing import Literal, Optional

from torch import nn

from lightning_peft.callbacks.base import PEFTCallback
from lightning_peft.core import check_adapter_name
from lightning_peft.methods.prompt_tuning import check_prompt_tuning_args, inject_prompt_tuning, prompt_tuning_tokenizer

__all__ = ["PromptTuning"]


class PromptTuning(PEFTCallback):
    """Prompt tuning: ``num_virtual_tokens`` learned embeddings prepended to the input; the base is frozen.

    Works on Hugging Face decoder LMs (Llama, GPT-2, Qwen2, ...; training and ``generate()``) and encoders with a
    head (BERT family). Exports to Hugging Face PEFT's ``PROMPT_TUNING`` format.

    Args:
        num_virtual_tokens: number of virtual tokens ``n``.
        init: ``"vocab"`` (embeddings of sampled vocabulary tokens), ``"random"`` (normal at the scale of the
            word embeddings) or ``"text"`` (the embeddings of ``init_text``'s tokens).
        init_text: the text for ``init="text"``, e.g. ``"Classify the sentiment:"``.
        tokenizer: tokenizer directory for ``init="text"`` (refused with another ``init``, which tokenizes nothing);
            None takes the LightningModule's ``tokenizer``.
        trainable_modules: base modules trained in full and saved with the adapter, e.g. ``["classifier"]``.
        save_dir: write the adapter there in Hugging Face PEFT's format at the end of ``fit``.
        adapter_name: name of this prompt; a model that already carries prompt-tuning prompts gets it as a further named
            prompt (a sibling layer ``prompt_tuning_<name>``), switched with ``set_active_adapters`` and routed per row with
            ``per_sample_adapters``.

    Example::

        trainer = L.Trainer(callbacks=[PromptTuning(num_virtual_tokens=20)])
    """

    method_name = "prompt_tuning"
    recorded_when_set = ("adapter_name",)

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        init: Literal["random", "vocab", "text"] = "vocab",
        init_text: Optional[str] = None,
        tokenizer: Optional[str] = None,
        trainable_modules: Optional[list[str]] = None,
        save_dir: Optional[str] = None,
        adapter_name: str = "default",
    ) -> None:
        check_prompt_tuning_args(num_virtual_tokens, init, init_text, tokenizer)
        check_adapter_name(adapter_name)
        super().__init__([], None, trainable_modules, save_dir)
        self.num_virtual_tokens, self.init, self.init_text, self.tokenizer = num_virtual_tokens, init, init_text, tokenizer
        self.adapter_name = adapter_name

    def _inject(self, module: nn.Module) -> list[str]:
        tokenizer = prompt_tuning_tokenizer(module, self.tokenizer) if self.init == "text" else None
        return inject_prompt_tuning(module, self.num_virtual_tokens, self.init, self.init_text, tokenizer, self.adapter_name)
