"""Hybrid methods are compositions: several methods' injections run in order on one model, all or nothing."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from lightning_peft.core import AdapterLayer

__all__ = ["inject_in_order"]


def _remove(model: nn.Module, names: list[str]) -> None:
    """Take the adapter layers ``names`` (made by the injections that ran) out of ``model`` again, last first."""
    from lightning_peft.methods._prompt import SoftPromptLayer

    for name in reversed(names):
        layer = model.get_submodule(name)
        if not isinstance(layer, AdapterLayer):
            continue
        base = layer.base_layer()
        if isinstance(layer, SoftPromptLayer):  # a submodule of the Hugging Face model, its hook removed above
            parent, _, attr = name.rpartition(".")
            delattr(model.get_submodule(parent), attr)
        else:
            model.set_submodule(name, base)


def inject_in_order(model: nn.Module, injections: Sequence[Callable[[nn.Module], list[str]]]) -> list[str]:
    """Run each ``injection(model) -> names`` in order; return all names.

    Each injection leaves ``model`` unchanged when it raises; if a later one raises, the layers the earlier ones
    added are taken out again (for layers freshly wrapped by them), so ``model`` is as it was.
    """
    names: list[str] = []
    for inject in injections:
        try:
            names += inject(model)
        except Exception:
            _remove(model, names)
            raise
    return names
