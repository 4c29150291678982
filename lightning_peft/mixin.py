"""``PEFTMixin``: for LightningModules that declare their adapters in code instead of with a callback."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from lightning_peft.callbacks.base import (
    _CKPT_KEY,
    PEFTCallback,
    _kept_names,
    adapter_checkpoint_state,
    check_adapter_checkpoint,
    fit_checkpoint_adapters,
    peft_state,
    recorded_methods,
)
from lightning_peft.callbacks._strategies import support_strategy
from lightning_peft.core import ParameterCounts, count_parameters

__all__ = ["PEFTMixin"]


class PEFTMixin:
    """Mix into a ``LightningModule`` (before it in the bases) to declare adapters in code.

    Call :meth:`apply_peft` once the model exists (at the end of ``__init__`` or of ``configure_model``):
    the same injection and freezing as the callbacks, and the same adapter-only checkpoints. If you
    override ``on_save_checkpoint`` / ``on_load_checkpoint``, call ``super()`` in them.

    A module with the mixin also loads adapter-only checkpoints made with a PEFT *callback*:
    ``Net.load_from_checkpoint(path)`` and ``trainer.validate(net, ckpt_path=path)`` inject the adapters
    the checkpoint records (when the module carries none yet) and load them; the base weights come from
    the module's own ``__init__``. Resuming ``fit`` needs the same PEFT callback on the Trainer (its
    settings, e.g. ``save_dir``, are not in the checkpoint): without it the error says so.

    Example::

        class Net(PEFTMixin, L.LightningModule):
            def __init__(self):
                super().__init__()
                self.model = AutoModelForCausalLM.from_pretrained(path)
                self.apply_peft(LoRA(r=8, target_modules=["q_proj", "v_proj"]))
    """

    _implements_peft_checkpoint_hooks: ClassVar[bool] = True  # the callbacks' glue leaves this class's hooks alone

    # Lightning attaches the Trainer before any hook runs: adapt its strategy then (sharded checkpoints hold the
    # adapter only and resume with it; see callbacks/_strategies.py), as the PEFT callbacks do in setup
    @property
    def trainer(self) -> Any:
        return self._lightning_module_property("trainer").__get__(self)

    @trainer.setter
    def trainer(self, trainer: Any) -> None:
        self._lightning_module_property("trainer").__set__(self, trainer)
        if trainer is not None and getattr(trainer, "strategy", None) is not None:
            support_strategy(trainer)

    def _lightning_module_property(self, name: str) -> property:
        mro = type(self).__mro__
        for klass in mro[mro.index(PEFTMixin) + 1:]:
            if name in klass.__dict__:
                return klass.__dict__[name]
        raise AttributeError(name)

    def apply_peft(self, *methods: PEFTCallback) -> None:
        """Inject each method's adapters into this module and freeze the rest."""
        if not methods:
            raise ValueError("apply_peft() needs at least one method, e.g. self.apply_peft(LoRA(r=8)).")
        for method in methods:
            if not isinstance(method, PEFTCallback):
                raise TypeError(f"apply_peft() takes lightning-peft methods such as LoRA(...), got {type(method).__name__}.")
            method.inject(self)
        self.strict_loading = False  # checkpoints hold the adapter, not the base

    def peft_parameter_counts(self) -> ParameterCounts:
        """Typed parameter counts of this module (trainable, added, changed, adapter bytes, base)."""
        return count_parameters(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        adapter_checkpoint_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record = checkpoint.get(_CKPT_KEY)
        if isinstance(record, dict) and record.get("methods") and not peft_state(self)["methods"]:
            trainer = getattr(self, "_trainer", None)
            # fit: the callback's settings (save_dir, ...) are not in the checkpoint; a sharded strategy restores after
            # wrapping the model, too late to inject
            if trainer is not None and (trainer.state.fn == "fit" or trainer.strategy.restore_checkpoint_after_setup):
                raise RuntimeError(
                    f"This checkpoint holds only a lightning-peft adapter ({', '.join(recorded_methods(record))}), and this "
                    f"{type(self).__name__} carries no adapter: resume with the same PEFT callback on the Trainer that "
                    "wrote it (e.g. callbacks=[LoRA(...)] or the same --config). To evaluate or predict with it, "
                    f"{type(self).__name__}.load_from_checkpoint(path) or load_adapter_checkpoint(model, path) load it."
                )
            fit_checkpoint_adapters(self, checkpoint, record)  # a checkpoint that does not fit leaves no adapter injected
            self.strict_loading = False
        else:
            check_adapter_checkpoint(self, checkpoint)
        super().on_load_checkpoint(checkpoint)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, except that a dict holding only this module's adapter (and trained base)
        parameters, which is what its checkpoints hold, loads with ``strict=True``: the base weights it does not hold
        are not reported missing (they come from the module's own source). A missing adapter parameter still is."""
        kept = _kept_names(self)
        if not (peft_state(self)["methods"] and state_dict and all(k in kept for k in state_dict)):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k in kept]
        if strict and missing:
            raise RuntimeError(f"Error(s) in loading the adapter of {type(self).__name__}: missing adapter parameter(s) {missing}.")
        result.missing_keys[:] = missing
        return result
