"""``PEFTMixin``: for LightningModules that declare their adapters in code instead of with a callback."""

from __future__ import annotations

from typing import Any

from lightning_peft.callbacks.base import PEFTCallback, adapter_checkpoint_state, check_adapter_checkpoint
from lightning_peft.core import ParameterCounts, count_parameters

__all__ = ["PEFTMixin"]


class PEFTMixin:
    """Mix into a ``LightningModule`` (before it in the bases) to declare adapters in code.

    Call :meth:`apply_peft` once the model exists (at the end of ``__init__`` or of ``configure_model``):
    the same injection and freezing as the callbacks, and the same adapter-only checkpoints. If you
    override ``on_save_checkpoint`` / ``on_load_checkpoint``, call ``super()`` in them.

    Example::

        class Net(PEFTMixin, L.LightningModule):
            def __init__(self):
                super().__init__()
                self.model = AutoModelForCausalLM.from_pretrained(path)
                self.apply_peft(LoRA(r=8, target_modules=["q_proj", "v_proj"]))
    """

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
        check_adapter_checkpoint(self, checkpoint)
        super().on_load_checkpoint(checkpoint)
