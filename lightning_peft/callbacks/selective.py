"""The ``Selective`` callback: :mod:`lightning_peft.methods.selective` on a Lightning model, with gradual unfreezing."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_peft.callbacks.base import PEFTCallback
from lightning_peft.core import peft_state
from lightning_peft.methods.selective import check_patterns, head_names, select_parameters

__all__ = ["Selective"]


class Selective(PEFTCallback):
    """Train only the parameters that patterns pick; optionally unfreeze more at given epochs.

    With no arguments: the top two transformer blocks and the task head (``classifier`` / ``score`` /
    an untied ``lm_head``) train. Patterns: ``"top:K"``, ``"bottom:K"``, ``"blocks:I-J"``, ``"head"``,
    ``"type:REGEX"`` (module class names, e.g. ``"type:LayerNorm"``), ``"param:REGEX"`` (parameter names),
    or a module / parameter name or dotted suffix (see :mod:`lightning_peft.methods.selective`).

    Gradual unfreezing follows Lightning's ``BackboneFinetuning``: at the start of each epoch of
    ``unfreeze_schedule`` the parameters its patterns pick become trainable and go to the optimizer as a
    new parameter group, with learning rate ``unfreeze_lr_factor`` x the first group's current one (a
    ``LambdaLR``-style scheduler gets the group too, so it follows the same schedule). Checkpoints hold
    only the parameters trained so far; resuming re-creates the groups before the optimizer state loads.

    Args:
        train: patterns of the parameters to train from the start; None: ``["top:2", "head"]`` (``"head"`` only
            if the model has one).
        unfreeze_schedule: ``{epoch: patterns}``: parameters to unfreeze at the start of that epoch (from 0).
        unfreeze_lr_factor: learning rate of an unfrozen group relative to the first group's, > 0 (a value other than
            the default needs ``unfreeze_schedule``).

    Example::

        # the top 2 blocks and the head; block 3 from epoch 1, blocks 0-2 from epoch 2, at 1/10 the learning rate
        Selective(train=["top:2", "head"], unfreeze_schedule={1: ["blocks:3"], 2: ["blocks:0-2"]}, unfreeze_lr_factor=0.1)
    """

    method_name = "selective"

    def __init__(
        self,
        train: Optional[list[str]] = None,
        unfreeze_schedule: Optional[dict[int, list[str]]] = None,
        unfreeze_lr_factor: float = 0.1,
    ) -> None:
        if train is not None:
            check_patterns(train, "train")
        schedule = {}
        for epoch, patterns in (unfreeze_schedule or {}).items():
            if isinstance(epoch, str) and epoch.isdigit():
                epoch = int(epoch)  # YAML / JSON keys
            if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
                raise ValueError(f"Selective: unfreeze_schedule keys are epochs (integers >= 0), got {epoch!r}. E.g. {{1: ['blocks:3']}}.")
            check_patterns(patterns, f"unfreeze_schedule[{epoch}]")
            schedule[epoch] = list(patterns)
        if not isinstance(unfreeze_lr_factor, (int, float)) or isinstance(unfreeze_lr_factor, bool) or not unfreeze_lr_factor > 0:
            raise ValueError(f"Selective: unfreeze_lr_factor must be > 0, got {unfreeze_lr_factor!r}. Lightning's BackboneFinetuning uses 0.1.")
        if not schedule and unfreeze_lr_factor != 0.1:  # it would be ignored: it only sets the groups the schedule adds
            raise ValueError(
                f"Selective: unfreeze_lr_factor={unfreeze_lr_factor!r} sets the learning rate of the parameter groups that "
                "unfreeze_schedule adds, but there is no unfreeze_schedule, so it would have no effect. Give unfreeze_schedule "
                "(e.g. {1: ['blocks:3']}) or drop unfreeze_lr_factor."
            )
        super().__init__([])
        self.train = list(train) if train is not None else None
        self.unfreeze_schedule = dict(sorted(schedule.items()))
        self.unfreeze_lr_factor = float(unfreeze_lr_factor)
        self.applied_epochs: list[int] = []
        self._restore_epochs: list[int] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(train=repr(self.train), schedule=repr(self.unfreeze_schedule))

    def patterns(self, module: nn.Module) -> list[str]:
        """The ``train`` patterns, or the default ``["top:2", "head"]`` (``"head"`` if the model has one)."""
        if self.train is not None:
            return self.train
        return ["top:2"] + (["head"] if head_names(module) else [])

    def _inject(self, module: nn.Module) -> list[str]:
        names = select_parameters(module, self.patterns(module))
        for epoch, patterns in self.unfreeze_schedule.items():  # fail now, not epochs into training
            try:
                select_parameters(module, patterns)
            except ValueError as err:
                raise ValueError(f"unfreeze_schedule[{epoch}]: {err}") from None
        state = peft_state(module)
        state["trainable"] = sorted(set(state["trainable"]) | set(names))  # trained and saved, as trainable_modules are
        return names

    # -- gradual unfreezing ------------------------------------------------------------------------
    def unfreeze(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> list[str]:
        """Make the parameters of ``unfreeze_schedule[epoch]`` trainable and give them to the optimizer as a new group."""
        state = peft_state(pl_module)
        names = [n for n in select_parameters(pl_module, self.unfreeze_schedule[epoch]) if n not in state["trainable"]]
        params = [pl_module.get_parameter(n) for n in names]
        for p in params:
            p.requires_grad_(True)
        state["trainable"] = sorted(set(state["trainable"]) | set(names))
        if not trainer.optimizers:
            return names
        if len(trainer.optimizers) > 1:
            rank_zero_warn(f"Selective: {len(trainer.optimizers)} optimizers; unfrozen parameters go to the first one.")
        optimizer = trainer.optimizers[0]
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        new = [p for p in params if id(p) not in in_optimizer]
        if len(new) < len(params):
            rank_zero_warn(
                f"Selective: {len(params) - len(new)} parameters unfrozen at epoch {epoch} were already in the optimizer "
                "(configure_optimizers passed frozen parameters too); they train in their existing group, at its learning "
                "rate. Pass only trainable parameters to the optimizer to get a separate group."
            )
        if new:
            lr = optimizer.param_groups[0]["lr"] * self.unfreeze_lr_factor
            optimizer.add_param_group({"params": new, "lr": lr, "initial_lr": optimizer.param_groups[0].get("initial_lr", lr) * self.unfreeze_lr_factor})
            for config in trainer.lr_scheduler_configs:
                sched = config.scheduler
                if getattr(sched, "optimizer", None) is optimizer and isinstance(getattr(sched, "base_lrs", None), list):
                    sched.base_lrs.append(sched.base_lrs[0] * self.unfreeze_lr_factor)
                    if isinstance(getattr(sched, "lr_lambdas", None), list):  # LambdaLR, MultiplicativeLR
                        sched.lr_lambdas.append(sched.lr_lambdas[0])
        rank_zero_info(f"Selective: epoch {epoch}: unfroze {len(names)} parameter tensors ({sum(p.numel() for p in params):,} parameters).")
        return names

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # resuming: re-create the groups of the epochs already unfrozen before the optimizer state is loaded
        for epoch in self._restore_epochs:
            self.unfreeze(trainer, pl_module, epoch)
        self.applied_epochs, self._restore_epochs = list(self._restore_epochs), []

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for epoch in self.unfreeze_schedule:
            if epoch <= trainer.current_epoch and epoch not in self.applied_epochs:
                self.unfreeze(trainer, pl_module, epoch)
                self.applied_epochs.append(epoch)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "applied_epochs": list(self.applied_epochs)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._restore_epochs = list(state_dict.get("applied_epochs", []))
