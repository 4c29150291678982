"""The ``LlamaAdapter`` callback: :mod:`lightning_peft.methods.llama_adapter` on a Lightning model."""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_peft.callbacks.base import PEFTCallback
from lightning_peft.methods.llama_adapter import check_llama_adapter_args, inject_llama_adapter

__all__ = ["LlamaAdapter"]


class LlamaAdapter(PEFTCallback):
    """LLaMA-Adapter: learned prompts in the top attention layers, attended through zero-initialized gates.

    The base model is frozen; only each adapted layer's ``adaption_prompt`` (``adapter_len x hidden``) and its
    scalar ``adaption_gate`` train. At step 0 the model's output equals the base model's exactly. Works on
    Llama-shaped models (``q_proj``/``k_proj``/``v_proj``/``o_proj`` with rotary embeddings, grouped-query
    attention included: Llama, Mistral, Qwen2) and raises on others. The adapter exports to Hugging Face PEFT's
    ``ADAPTION_PROMPT`` format.

    Args:
        adapter_len: prompt tokens per adapted layer (the paper uses 10).
        adapter_layers: how many of the last attention layers get prompts (the paper: 30 of LLaMA-7B's 32);
            None for all of them.
        trainable_modules: base modules trained in full and saved with the adapter, e.g. ``["lm_head"]``.
        save_dir: write the adapter there in Hugging Face PEFT's format at the end of ``fit``.

    Example::

        trainer = L.Trainer(callbacks=[LlamaAdapter(adapter_len=10, adapter_layers=8)])
    """

    method_name = "llama_adapter"

    def __init__(
        self,
        adapter_len: int = 10,
        adapter_layers: Optional[int] = None,
        trainable_modules: Optional[list[str]] = None,
        save_dir: Optional[str] = None,
    ) -> None:
        check_llama_adapter_args(adapter_len, adapter_layers)
        super().__init__("self_attn", None, trainable_modules, save_dir)
        self.adapter_len = adapter_len
        self.adapter_layers = adapter_layers

    def _inject(self, module: nn.Module) -> list[str]:
        return inject_llama_adapter(module, self.adapter_len, self.adapter_layers)
