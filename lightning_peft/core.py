"""The adapter protocol and the free functions every layer above uses.

An adapter layer is an ``nn.Module`` that subclasses :class:`AdapterLayer`. It

* keeps the base module's own parameters under their original names (``weight``, ``bias``), so a
  checkpoint of the base model loads into the adapted model unchanged;
* names its own parameters with the method's prefix (``lora_a``, ``lora_b``, ...) and lists them in
  :meth:`AdapterLayer.adapter_params`;
* can be switched off (``disabled``) and, where the method allows it, merged into the base weights.

Everything else (training flags, checkpoints, counts) is derived from that protocol here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "AdapterLayer",
    "ParameterCounts",
    "adapter_modules",
    "adapter_param_names",
    "adapter_state_dict",
    "count_parameters",
    "disable_adapters",
    "mark_trainable",
    "merge_adapters",
    "unmerge_adapters",
]


class AdapterLayer(nn.Module):
    """Base class of every adapter layer (the adapter protocol).

    Subclasses set ``adapter_prefix`` (the method's name, e.g. ``"lora_"``) and implement
    :meth:`adapter_params`; mergeable methods implement :meth:`_delta_merge`.
    """

    adapter_prefix: str = ""
    mergeable: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.disabled = False
        self.merged = False

    def adapter_params(self) -> list[str]:
        """Names (relative to this module) of the parameters the adapter adds."""
        return [n for n, _ in self.named_parameters(recurse=True) if n.split(".")[-1].startswith(self.adapter_prefix)]

    def merge(self) -> None:
        """Fold the adapter into the base weights. Safe to call twice."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights.")

    def unmerge(self) -> None:
        """Undo :meth:`merge`. Safe to call when not merged."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights.")

    def base_layer(self) -> nn.Module:
        """A plain module equivalent to the base (used by ``unload``); the adapter is dropped."""
        raise NotImplementedError


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Yield ``(qualified name, layer)`` for every adapter layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def adapter_param_names(model: nn.Module) -> list[str]:
    """Qualified names of every adapter parameter in ``model`` (the parameters a method adds)."""
    names = []
    for mod_name, module in adapter_modules(model):
        prefix = f"{mod_name}." if mod_name else ""
        names.extend(prefix + p for p in module.adapter_params())
    return names


def mark_trainable(model: nn.Module, extra: list[str] | tuple[str, ...] = ()) -> None:
    """Freeze everything except adapter parameters and the qualified parameter names in ``extra``."""
    trainable = set(adapter_param_names(model)) | set(extra)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)


def adapter_state_dict(model: nn.Module, extra: list[str] | tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The subset of ``model.state_dict()`` an adapter file or checkpoint needs.

    Args:
        model: a model carrying adapters.
        extra: qualified names of base parameters that are trained too (``trainable_modules``).
    """
    keep = set(adapter_param_names(model)) | set(extra)
    return {k: v for k, v in model.state_dict().items() if k in keep}


@dataclass(frozen=True)
class ParameterCounts:
    """Typed parameter counts: never one number that mixes them.

    Attributes:
        trainable: parameters with ``requires_grad`` (adapter parameters plus base parameters trained too).
        added: parameters the adapters add to the model.
        changed: base parameters that training changes (``trainable_modules``, biases for BitFit, ...).
        adapter_bytes: bytes of the tensors an adapter file stores (added + changed, in their dtypes).
        base_total: parameters of the base model (everything that is not added).
    """

    trainable: int
    added: int
    changed: int
    adapter_bytes: int
    base_total: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / max(self.base_total, 1)

    def __str__(self) -> str:
        return (
            f"trainable {self.trainable:,} ({self.trainable_percent:.3f}% of base) | added {self.added:,} | "
            f"changed in base {self.changed:,} | adapter file {self.adapter_bytes / 1024:,.1f} KiB | "
            f"base {self.base_total:,}"
        )


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Count parameters by type (see :class:`ParameterCounts`). Shared parameters are counted once."""
    added_names = set(adapter_param_names(model))
    seen: set[int] = set()
    trainable = added = changed = nbytes = base = 0
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = param.numel()
        if name in added_names:
            added += n
        else:
            base += n
            if param.requires_grad:
                changed += n
        if param.requires_grad:
            trainable += n
        if name in added_names or param.requires_grad:
            nbytes += n * param.element_size()
    return ParameterCounts(trainable, added, changed, nbytes, base)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone: every adapter layer in ``model`` is switched off inside the block.

    Example::

        with disable_adapters(model):
            base_logits = model(x)
    """
    layers = [m for _, m in adapter_modules(model)]
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, state in zip(layers, before):
            m.disabled = state


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every mergeable adapter into its base weights (idempotent). Returns ``model``."""
    for _, m in adapter_modules(model):
        m.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapters` (idempotent). Returns ``model``."""
    for _, m in adapter_modules(model):
        m.unmerge()
    return model
