"""The ``IA3`` callback: :mod:`lightning_peft.methods.ia3` on a Lightning model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import save_file
from torch import nn
from typing_extensions import override

from lightning_peft.callbacks.base import PEFTCallback, peft_state
from lightning_peft.core import adapter_modules
from lightning_peft.methods.ia3 import IA3Linear, check_ia3_args, inject_ia3, to_peft

__all__ = ["IA3", "save_ia3_adapter"]


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

    def config(self) -> dict[str, Any]:
        return {**super().config(), "feedforward_modules": self.feedforward_modules}

    def _inject(self, module: nn.Module) -> list[str]:
        return inject_ia3(module, self.target_modules, self.feedforward_modules, self.exclude_modules)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_dir and trainer.is_global_zero:
            path = save_ia3_adapter(pl_module, self.save_dir)
            rank_zero_info(f"{type(self).__name__}: adapter written to {path}")


def save_ia3_adapter(module: nn.Module, directory: Union[str, Path]) -> Path:
    """Write ``module``'s (IA)³ adapter (and trained base modules) in Hugging Face PEFT's format.

    ``peft.PeftModel.from_pretrained(hf_model, directory)`` loads it. (The lead's ``io`` registry will
    take this over; until then the IA3 callback's ``save_dir`` uses it.)
    """
    from lightning_peft.io import find_base_model

    prefix, base = find_base_model(module)
    config, tensors = to_peft(base, [(n, m) for n, m in adapter_modules(base) if isinstance(m, IA3Linear)])
    trained = [n[len(prefix):] for n in peft_state(module)["trainable"] if n.startswith(prefix)]
    params = dict(base.named_parameters())
    for name in trained:
        tensors[f"base_model.model.{name}"] = params[name].detach()
    config["modules_to_save"] = sorted({n.rsplit(".", 1)[0] for n in trained}) or None
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out

