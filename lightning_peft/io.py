"""Adapter files in Hugging Face PEFT's directory layout.

``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` / ``lora_B.weight`` and, for base modules trained in
full (``trainable_modules``, PEFT's ``modules_to_save``), ``base_model.model.<module path>.<param>``.
Paths are relative to the Hugging Face model inside a LightningModule (or to the module itself), so
``peft.PeftModel.from_pretrained(hf_model, path)`` loads the directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import save_file
from torch import nn

from lightning_peft.callbacks.base import peft_state
from lightning_peft.core import adapter_modules
from lightning_peft.methods.lora import LoRALinear

__all__ = ["find_base_model", "save_adapter"]

_PEFT_PREFIX = "base_model.model."


def find_base_model(module: nn.Module) -> tuple[str, nn.Module]:
    """``(prefix, model)``: the Hugging Face model inside ``module`` (``prefix`` ends with a dot), else ``("", module)``."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return "", module
    for name, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel):
            return (f"{name}." if name else ""), sub
    return "", module


def save_adapter(module: nn.Module, directory: Union[str, Path]) -> Path:
    """Write ``module``'s LoRA adapter to ``directory`` in Hugging Face PEFT's format; returns the directory."""
    prefix, base = find_base_model(module)
    layers = [(n, m) for n, m in adapter_modules(base)]
    lora = [(n, m) for n, m in layers if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError(f"{type(module).__name__} carries no adapter to save: inject one first (e.g. LoRA(...).inject(model)).")
    if len(lora) != len(layers):
        other = sorted({type(m).__name__ for _, m in layers if not isinstance(m, LoRALinear)})
        raise NotImplementedError(f"Saving in PEFT format is implemented for LoRA only; this model also carries {other}.")
    first = lora[0][1]
    if any((m.r, m.alpha, m.use_rslora) != (first.r, first.alpha, first.use_rslora) for _, m in lora):
        raise NotImplementedError("Saving adapters with per-module ranks or alphas in PEFT format is not implemented yet.")

    tensors: dict[str, torch.Tensor] = {}
    for name, m in lora:
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_a.detach()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_b.detach()
    trained = [n[len(prefix):] for n in peft_state(module)["trainable"] if n.startswith(prefix)]
    params = dict(base.named_parameters())
    for name in trained:
        tensors[f"{_PEFT_PREFIX}{name}"] = params[name].detach()
    modules_to_save = sorted({n.rsplit(".", 1)[0] for n in trained}) or None

    name_or_path = getattr(getattr(base, "config", None), "_name_or_path", None)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": name_or_path or None,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout,
        "use_rslora": first.use_rslora,
        "target_modules": sorted(n for n, _ in lora),
        "modules_to_save": modules_to_save,
        "fan_in_fan_out": first.fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "library": "lightning-peft",
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
