"""LoRA+: LoRA with a larger learning rate for ``B`` (Hayou, Ghosh and Yu, 2024, "LoRA+: Efficient Low Rank
Adaptation of Large Models").

LoRA's update is ``s B A`` (``A``: r x in, ``B``: out x r, ``B = 0`` at init; :mod:`lightning_peft.methods.lora`).
Trained with one learning rate, ``A`` and ``B`` cannot both learn features efficiently in wide models; the paper
gives ``B`` a larger one::

    lr_B = ratio * lr_A,    ratio = loraplus_lr_ratio > 1 (the paper suggests about 2^4 = 16 to start with)

The ratio and the learning rate go together: with Adam, B moves by about ``ratio * lr`` per step, so a large ratio
needs a smaller ``lr`` than plain LoRA (PEFT suggests about half; on SST-2 with all-MiniLM-L6-v2 at lr 1e-3, ratio 16
diverged and ratio 4 trained, configs/loraplus.yaml).

The model does not change, only the optimizer's parameter groups do, so LoRA+ has no file format and nothing to
merge. Two ways to get the groups:

* :func:`loraplus_param_groups`: the groups for an optimizer you build (``configure_optimizers``), as Hugging Face
  PEFT's ``create_loraplus_optimizer`` (and the paper's reference code) makes them;
* :func:`apply_loraplus`: splits, in place, the groups of an optimizer already built (and keeps its learning-rate
  schedulers in step); the ``LoRA`` callback's ``loraplus_lr_ratio`` calls it at ``on_fit_start``.

Which parameters train at ``ratio * lr`` (PEFT's rule, followed here): the trainable ``B`` matrices of the LoRA
layers (:class:`~lightning_peft.methods.lora.LoRALinear`'s ``lora_b.<name>``, found through the layers, not by name)
and every other trainable **1-D** parameter: biases, LayerNorm scales, DoRA magnitudes (``lora_magnitude``), gate
biases. PEFT puts vectors with ``B`` (``"lora_B" in name or param.ndim == 1``); they are output-side, like ``B``.
Everything else that trains (``lora_a``, full matrices of ``trainable_modules``, scalars) keeps ``lr``. Frozen
parameters (``requires_grad=False``, e.g. a frozen named adapter) are left out.

Weight decay (:func:`loraplus_param_groups`): the ``weight_decay`` given, except 0 for 1-D parameters. PEFT sets 0
for biases and LayerNorm parameters and decays other vectors; here no vector is decayed (decaying a DoRA magnitude
or an RMSNorm scale pulls it towards 0, not towards its initial 1). :func:`apply_loraplus` changes learning rates
only: each new group keeps the weight decay (and every other setting) of the group it came from.

A group that trains at ``ratio * lr`` carries the key ``"loraplus_lr_ratio"`` (the ratio): it is saved with the
optimizer state, and it is how :func:`apply_loraplus` sees that an optimizer already has LoRA+ groups.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn
from torch.optim import Optimizer, lr_scheduler

from lightning_peft.methods.lora import LoRALinear

__all__ = ["RATIO_KEY", "SUPPORTED_SCHEDULERS", "apply_loraplus", "check_loraplus_ratio", "lora_b_parameters", "loraplus_param_groups"]

#: the param-group key that marks a group training at ``ratio * lr`` (its value: the ratio)
RATIO_KEY = "loraplus_lr_ratio"

_RATIO_FIX = "LoRA+ multiplies B's learning rate by it: e.g. 16 (the paper's suggested start); 1 is plain LoRA."

#: schedulers whose per-group state is ``base_lrs`` (and ``lr_lambdas``): a new group gets entries in them
_PER_GROUP_BASE_LRS = (
    lr_scheduler.LambdaLR, lr_scheduler.MultiplicativeLR, lr_scheduler.StepLR, lr_scheduler.MultiStepLR,
    lr_scheduler.ConstantLR, lr_scheduler.LinearLR, lr_scheduler.ExponentialLR, lr_scheduler.PolynomialLR,
    lr_scheduler.CosineAnnealingLR, lr_scheduler.CosineAnnealingWarmRestarts,
)
_CONTAINERS = (lr_scheduler.SequentialLR, lr_scheduler.ChainedScheduler)
SUPPORTED_SCHEDULERS = tuple(c.__name__ for c in (*_PER_GROUP_BASE_LRS, lr_scheduler.ReduceLROnPlateau, *_CONTAINERS))


def _number(owner: str, name: str, value: Any, fix: str, zero_ok: bool = False) -> float:
    """``value`` as a float: a real number (not a bool), finite, > 0 (>= 0 with ``zero_ok``); else an error naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r} ({type(value).__name__}). {fix}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{owner}: {name} must be a finite number {'>= 0' if zero_ok else '> 0'}, got {value!r}. {fix}")
    return float(value)


def check_loraplus_ratio(value: Any, owner: str = "LoRA+") -> float:
    """``loraplus_lr_ratio`` as a float, or ``TypeError`` (a bool, a string) / ``ValueError`` (``inf``, nan, <= 0)."""
    return _number(owner, "loraplus_lr_ratio", value, _RATIO_FIX)


def lora_b_parameters(model: nn.Module) -> dict[int, str]:
    """``{id(parameter): qualified name}`` of the trainable ``B`` matrices of every LoRA layer of ``model``."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {id(p): names[id(p)] for m in model.modules() if isinstance(m, LoRALinear) for p in m.lora_b.values() if p.requires_grad}


def _trainable(model: nn.Module, owner: str) -> tuple[list[tuple[str, nn.Parameter]], dict[int, str], set[int]]:
    """The trainable parameters (named, in model order), the LoRA ``B`` ones, and the ids of all at ``ratio * lr``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}.")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    b = lora_b_parameters(model)
    if not b:
        raise ValueError(
            f"{owner}: {type(model).__name__} has no trainable LoRA B matrix (lora_b of a LoRALinear layer), so LoRA+ would "
            "change nothing. Inject LoRA first (the LoRA callback, inject_lora), and check that its adapter is not frozen."
        )
    return trainable, b, set(b) | {id(p) for _, p in trainable if p.ndim == 1}


def loraplus_param_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Parameter groups for LoRA+: LoRA ``B`` matrices and 1-D parameters at ``lr * loraplus_lr_ratio``, the rest at ``lr``.

    The grouping of Hugging Face PEFT's ``create_loraplus_optimizer`` (see the module docstring for the rule and
    the one difference in weight decay). Only trainable parameters; empty groups are left out.

    Args:
        model: a model with LoRA layers (after the callback's ``setup`` / ``inject_lora``).
        lr: learning rate of ``A`` and of every other trainable matrix.
        loraplus_lr_ratio: ``lr_B / lr_A``, > 0 (e.g. 16).
        weight_decay: weight decay of the matrices; 1-D parameters get 0.

    Returns:
        Up to three groups, in this order: the rest (``lr``, ``weight_decay``), the ``B`` matrices
        (``lr * ratio``, ``weight_decay``), the 1-D parameters (``lr * ratio``, 0). The last two carry
        ``"loraplus_lr_ratio"``.

    Example::

        def configure_optimizers(self):
            return torch.optim.AdamW(loraplus_param_groups(self, lr=2e-4, loraplus_lr_ratio=16, weight_decay=0.01))
    """
    owner = "loraplus_param_groups"
    lr = _number(owner, "lr", lr, "Pass the learning rate of A, e.g. lr=2e-4.")
    ratio = check_loraplus_ratio(loraplus_lr_ratio, owner)
    weight_decay = _number(owner, "weight_decay", weight_decay, "Pass 0 for none, e.g. 0.01 for AdamW-style decay.", zero_ok=True)
    trainable, b, _ = _trainable(model, owner)
    groups = [
        {"params": [p for _, p in trainable if id(p) not in b and p.ndim != 1], "lr": lr, "weight_decay": weight_decay},
        {"params": [p for _, p in trainable if id(p) in b], "lr": lr * ratio, "weight_decay": weight_decay, RATIO_KEY: ratio},
        {"params": [p for _, p in trainable if id(p) not in b and p.ndim == 1], "lr": lr * ratio, "weight_decay": 0.0, RATIO_KEY: ratio},
    ]
    return [g for g in groups if g["params"]]


# -- splitting an optimizer that exists ------------------------------------------------------------------------------
def _tree(scheduler: Any) -> list[Any]:
    """``scheduler`` and, for ``SequentialLR`` / ``ChainedScheduler``, the schedulers inside it (at any depth)."""
    members = scheduler._schedulers if isinstance(scheduler, _CONTAINERS) else []
    return [scheduler, *(s for member in members for s in _tree(member))]


def _check_scheduler(scheduler: Any, optimizer: Optimizer, owner: str) -> None:
    supported = isinstance(scheduler, (*_PER_GROUP_BASE_LRS, lr_scheduler.ReduceLROnPlateau, *_CONTAINERS))
    if not supported:
        raise TypeError(
            f"{owner}: cannot give the learning-rate scheduler {type(scheduler).__name__} entries for new parameter groups "
            f"(it keeps per-group settings of its own). Supported: {', '.join(SUPPORTED_SCHEDULERS)}. Or build the groups "
            "with loraplus_param_groups(...) in configure_optimizers, before the scheduler is created."
        )
    if getattr(scheduler, "optimizer", None) is not optimizer:
        raise ValueError(f"{owner}: the scheduler {type(scheduler).__name__} drives another optimizer; pass only this optimizer's schedulers.")


def _follow(scheduler: Any, source: int, target: Optional[int], ratio: float) -> None:
    """Give ``scheduler`` the entries of group ``target`` (new, appended; None: ``source`` itself was scaled)."""
    per_group = [("base_lrs", ratio), ("min_lrs", ratio)]
    if isinstance(scheduler, (lr_scheduler.LambdaLR, lr_scheduler.MultiplicativeLR)):
        per_group.append(("lr_lambdas", None))
    for attr, scale in per_group:
        values = getattr(scheduler, attr, None)
        if not isinstance(values, list):
            continue
        value = values[source] if scale is None else values[source] * scale
        if target is None:
            values[source] = value
        else:
            values.append(value)


def _scaled(value: Any, ratio: float) -> Any:
    return value * ratio  # a float, or a tensor learning rate (a new tensor, not shared with the source group)


def apply_loraplus(optimizer: Optimizer, model: nn.Module, loraplus_lr_ratio: float, schedulers: Sequence[Any] = ()) -> list[int]:
    """Split ``optimizer``'s parameter groups in place so that LoRA ``B`` matrices (and 1-D parameters) train at ``ratio`` x.

    Every group holding such parameters is split: they move to a new group, appended, with the same settings
    (weight decay, betas, ...) and ``lr`` / ``initial_lr`` times the ratio; a group holding nothing else is scaled
    where it is. ``schedulers`` (every learning-rate scheduler of this optimizer) get the matching entries
    (``base_lrs``; ``lr_lambdas`` for ``LambdaLR`` / ``MultiplicativeLR``; ``min_lrs`` for ``ReduceLROnPlateau``),
    so that each new group follows its source group's schedule at ``ratio`` times its learning rate (absolute floors
    such as ``CosineAnnealingLR``'s ``eta_min`` are shared: the ratio is exact with ``eta_min=0``). All checks run
    before anything changes.

    Calling it again (or on groups from :func:`loraplus_param_groups`) with the same ratio splits nothing more: groups
    already marked ``"loraplus_lr_ratio"`` are left as they are. A different ratio raises.

    Args:
        optimizer: holds every trainable LoRA ``B`` matrix of ``model`` (else ``ValueError``, naming them).
        model: the model with the LoRA layers.
        loraplus_lr_ratio: ``lr_B / lr_A``, > 0.
        schedulers: this optimizer's schedulers; needed when one exists (its groups then have ``initial_lr``).
            Supported: see ``SUPPORTED_SCHEDULERS``; others (``OneCycleLR``, ``CyclicLR``, ...) raise ``TypeError``.

    Returns:
        The indices of the groups that train at ``ratio * lr``.

    Example::

        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=100)
        apply_loraplus(optimizer, model, loraplus_lr_ratio=16, schedulers=[scheduler])
    """
    owner = "apply_loraplus"
    ratio = check_loraplus_ratio(loraplus_lr_ratio, owner)
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"{owner}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    # every scheduler once, those inside a SequentialLR / ChainedScheduler too (each keeps its own per-group lists)
    schedulers = list({id(s): s for scheduler in schedulers for s in _tree(scheduler)}.values())
    for scheduler in schedulers:
        _check_scheduler(scheduler, optimizer, owner)
    _, b, at_ratio = _trainable(model, owner)
    groups = optimizer.param_groups
    held = {id(p) for g in groups for p in g["params"]}
    missing = [name for i, name in b.items() if i not in held]
    if missing:
        raise ValueError(
            f"{owner}: {len(missing)} trainable LoRA B matrices are not in the optimizer (e.g. {missing[:3]}), so LoRA+ cannot "
            "set their learning rate and they would not train. Give the optimizer every trainable parameter (e.g. "
            "[p for p in model.parameters() if p.requires_grad]) after the adapters are injected."
        )
    other = sorted({float(g[RATIO_KEY]) for g in groups if RATIO_KEY in g and float(g[RATIO_KEY]) != ratio})
    if other:
        raise ValueError(
            f"{owner}: the optimizer already has LoRA+ groups with loraplus_lr_ratio={other[0]!r} (from loraplus_param_groups "
            f"or an earlier call), and {ratio!r} was asked for. Use one ratio: drop one of the two settings."
        )
    plan = [(i, [p for p in g["params"] if id(p) in at_ratio]) for i, g in enumerate(groups) if RATIO_KEY not in g]
    plan = [(i, moved) for i, moved in plan if moved]
    if plan and not schedulers and any("initial_lr" in g for g in groups):
        raise ValueError(
            f"{owner}: the optimizer's groups have 'initial_lr', so a learning-rate scheduler was created on it: pass it "
            "(schedulers=[scheduler]) so that it gets entries for the new groups, or call apply_loraplus before creating it."
        )
    for source, moved in plan:
        group = groups[source]
        if len(moved) == len(group["params"]):  # nothing else in it: scaled where it is
            target = None
            for key in ("lr", "initial_lr"):
                if key in group:
                    group[key] = _scaled(group[key], ratio)
            group[RATIO_KEY] = ratio
        else:
            ids = {id(p) for p in moved}
            keep = [k for k, p in enumerate(group["params"]) if id(p) not in ids]
            moved_at = [k for k, p in enumerate(group["params"]) if id(p) in ids]
            new = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            new.update({key: _scaled(group[key], ratio) for key in ("lr", "initial_lr") if key in group})
            new[RATIO_KEY] = ratio
            new["params"] = moved
            if "param_names" in group:  # an optimizer built from named_parameters(): the names split the same way
                new["param_names"] = [group["param_names"][k] for k in moved_at]
                group["param_names"] = [group["param_names"][k] for k in keep]
            group["params"] = [group["params"][k] for k in keep]
            optimizer.add_param_group(new)
            target = len(groups) - 1
        for scheduler in schedulers:
            _follow(scheduler, source, target, ratio)
    for scheduler in schedulers:  # what get_last_lr() reports: the groups' learning rates now
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in groups]
    return [i for i, g in enumerate(groups) if RATIO_KEY in g]
