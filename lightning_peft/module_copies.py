"""A module trained in full per named adapter (Hugging Face PEFT's ``modules_to_save`` with several adapters).

While one adapter declares a module as trained in full (``trainable_modules=["classifier"]``), the module trains in
place: its parameters keep their names, and single-adapter checkpoints, files and counts are what they always were.
When a second adapter declares the same module, the module is wrapped in :class:`ModuleCopies` and every adapter that
declared it gets its own copy: switching, per-sample routing, saving, loading, deleting and exporting then follow
each adapter's copy (:func:`keep_per_adapter_copies`).

The wrapper keeps the original module's parameters and buffers under their old names (it shares the original's
parameter and buffer dicts), so a base checkpoint still loads into the model; the copies live at
``<module>.modules_to_save.<adapter>.<param>``, PEFT's in-memory names.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from lightning_peft.core import AdapterLayer, NamedAdapters, peft_state

__all__ = ["ModuleCopies", "keep_per_adapter_copies", "copy_owner", "module_copy", "tied_elsewhere"]


class ModuleCopies(AdapterLayer, NamedAdapters):
    """``original`` plus one trained copy of it per named adapter; the forward runs the active adapter's copy (the
    original when no adapter with a copy is active, or when disabled), or each row's copy under per-sample routing.

    At most one adapter with a copy can be active at a time (two heads do not add up): :func:`set_active_adapters`
    refuses more. ``merge`` marks the active copy as the one :func:`~lightning_peft.core.unload` keeps.
    """

    adapter_prefix = "modules_to_save"
    mergeable = True
    exclusive = True  # one active copy at a time (core.set_active_adapters checks it)

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self._init_named_adapters()
        self.__dict__["_original"] = original  # not a submodule: its tensors are ours under the same names
        # the same dicts: parameters and buffers keep their names (``classifier.weight``), and replacing one on either
        # module (``.to()``, loading with assign=True) is seen by both
        self._parameters = original._parameters
        self._buffers = original._buffers
        for name, child in original.named_children():
            self.add_module(name, child)
        self.modules_to_save = nn.ModuleDict()
        self.training = original.training

    @property
    def original(self) -> nn.Module:
        return self.__dict__["_original"]

    def add_copy(self, name: str, values: Optional[nn.Module] = None) -> nn.Module:
        """Give adapter ``name`` its own copy: of ``values`` if given, else of the original (as it is now)."""
        if name in self.modules_to_save:
            raise ValueError(f"Adapter {name!r} already has a copy of this module.")
        source = values if values is not None else self.original
        made = copy.deepcopy(source)
        made.train(self.training)
        for p in made.parameters():
            p.requires_grad_(name not in self.frozen)
        self.modules_to_save[name] = made
        return made

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def adapter_params(self, trainable_only: bool = False) -> list[str]:
        return [
            f"modules_to_save.{name}.{p}" for name, m in self.modules_to_save.items()
            if not (trainable_only and name in self.frozen) for p, _ in m.named_parameters()
        ]

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active = [n for n in self.active if n != name]
        self.frozen.discard(name)

    def train(self, mode: bool = True) -> "ModuleCopies":
        super().train(mode)
        self.original.train(mode)
        return self

    def _active_copies(self) -> list[str]:
        return [n for n in self.active if n in self.modules_to_save]

    def _selected(self) -> Optional[str]:
        if self.disabled:
            return None
        mine = self._active_copies()
        if len(mine) > 1:
            raise RuntimeError(f"Adapters {mine} each have their own copy of this module: activate one of them.")
        return mine[0] if mine else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        routing = self.sample_adapters
        if routing is not None and not self.disabled:
            return self._routed(routing, *args, **kwargs)
        name = self._selected()
        return (self.modules_to_save[name] if name is not None else self.original)(*args, **kwargs)

    def _routed(self, routing, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Rows of ``x`` (dim 0) through their adapter's copy, the original for the others; other arguments are passed
        whole (a head's extra inputs must not be per-row)."""
        if x.shape[0] != len(routing):
            raise ValueError(
                f"adapter_names has {len(routing)} entries but the batch has {x.shape[0]} rows: give one adapter "
                "name (or None for the base model) per sample."
            )
        outs = []
        for name, _ in routing.groups:
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original
            outs.append(module(x[routing.index(name, x.device)], *args, **kwargs))
        out = torch.cat(outs)
        if routing.contiguous:  # groups in row order (a batch sorted by adapter)
            return out
        index = torch.cat([routing.indices(name, x.device) for name, _ in routing.groups])
        return out.new_empty(out.shape).index_put((index,), out)

    # -- merge: which copy stays when the adapters are unloaded ----------------------------------------------
    def merge_problem(self) -> Optional[str]:
        mine = self._active_copies()
        if len(mine) > 1:
            return f"adapters {mine} each have their own copy of this module: activate one of them"
        return None

    def merge(self, names: Optional[list[str]] = None) -> None:
        names = [n for n in (names if names is not None else self.active) if n in self.modules_to_save]
        self.merged_adapters = list(dict.fromkeys(names))[:1]

    def unmerge(self) -> None:
        self.merged_adapters = []

    @property
    def merged(self) -> bool:  # type: ignore[override]
        return bool(self.merged_adapters)

    @merged.setter
    def merged(self, value: bool) -> None:
        pass  # derived from merged_adapters

    def base_layer(self) -> nn.Module:
        """The merged adapter's copy (``unload(merge=True)`` returns that adapter's module), else the original."""
        return self.modules_to_save[self.merged_adapters[0]] if self.merged_adapters else self.original

    def extra_repr(self) -> str:
        return f"copies={self.adapter_names()}, active={self.active}"


def copy_owner(model: nn.Module, module_name: str) -> Optional[ModuleCopies]:
    """The :class:`ModuleCopies` at ``module_name``, or None when that module is not kept per adapter."""
    try:
        m = model.get_submodule(module_name)
    except AttributeError:
        return None
    return m if isinstance(m, ModuleCopies) else None


def module_copy(model: nn.Module, module_name: str, adapter: str) -> nn.Module:
    """The module adapter ``adapter`` uses at ``module_name``: its own copy, or the module itself."""
    m = model.get_submodule(module_name)
    if isinstance(m, ModuleCopies):
        return m.modules_to_save[adapter] if adapter in m.modules_to_save else m.original
    return m


def keep_per_adapter_copies(model: nn.Module, module_names: list[str], adapter: str) -> list[str]:
    """Record that adapter ``adapter`` trains the modules ``module_names`` in full, keeping a copy per adapter where
    another adapter already trains the same module.

    ``peft_state(model)["owners"]`` maps a module (qualified in ``model``) to the adapters that declared it. The first
    adapter trains it in place (its parameters are returned, to be trained as base parameters); at the second, the
    module becomes a :class:`ModuleCopies`: the first owner gets a copy of the current values (trained so far), the new
    adapter a copy too, and the module's parameters stop training in place (they leave ``peft_state["trainable"]``).
    Returns the qualified parameter names that train in place.
    """
    state = peft_state(model)
    owners: dict[str, list[str]] = state.setdefault("owners", {})
    in_place: list[str] = []
    for name in module_names:
        holders = owners.get(name, [])
        if adapter in holders:
            if copy_owner(model, name) is None:
                in_place += [f"{name}.{p}" for p, _ in model.get_submodule(name).named_parameters()]
            continue
        wrapper = copy_owner(model, name)
        if not holders and wrapper is None:
            owners[name] = [adapter]
            in_place += [f"{name}.{p}" for p, _ in model.get_submodule(name).named_parameters()]
            continue
        if wrapper is None:
            original = model.get_submodule(name)
            ties = tied_elsewhere(model, name)
            if ties:
                raise NotImplementedError(
                    f"{name} shares parameters with {ties[:3]} (tied weights): a copy per adapter would untie them. "
                    f"Train it in one adapter only (trainable_modules of adapter {holders[0]!r}), or untie the weights first."
                )
            wrapper = ModuleCopies(original)
            for previous in holders:
                wrapper.add_copy(previous)
                wrapper.set_adapter_active(previous, _is_active(model, previous))
            model.set_submodule(name, wrapper)
            own = {f"{name}.{p}" for p, _ in original.named_parameters()}
            state["trainable"] = [t for t in state["trainable"] if t not in own]
        wrapper.add_copy(adapter)
        wrapper.set_adapter_active(adapter, _is_active(model, adapter))
        owners[name] = holders + [adapter]
    return in_place


def _is_active(model: nn.Module, adapter: str) -> bool:
    """Whether the model's other named-adapter layers apply ``adapter`` now (a new adapter: whether it is the only one)."""
    layers = [m for _, m in model.named_modules() if isinstance(m, NamedAdapters) and not isinstance(m, ModuleCopies)]
    holding = [m for m in layers if adapter in m.adapter_names()]
    return any(adapter in m.active for m in holding) if holding else True


def tied_elsewhere(model: nn.Module, name: str) -> list[str]:
    """Parameter names outside the module ``name`` that share one of its parameters (tied weights)."""
    ids = {id(p) for p in model.get_submodule(name).parameters()}
    return [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids and not n.startswith(name + ".")]
