"""The ``BitFit`` callback: :mod:`lightning_peft.methods.bitfit` on a Lightning model."""

from __future__ import annotations

from typing import Optional, Union

from torch import nn

from lightning_peft.callbacks.base import PEFTCallback
from lightning_peft.core import peft_state
from lightning_peft.methods.bitfit import find_biases

__all__ = ["BitFit"]


class BitFit(PEFTCallback):
    """Train only bias terms (Ben Zaken et al., 2022); every weight matrix stays frozen.

    The trained biases are base parameters: they are counted as ``changed`` (not ``added``) and are all an
    adapter checkpoint holds (with ``trainable_modules``). Models without biases (Llama) raise an error that
    suggests (IA)³ or LoRA.

    Args:
        biases: None trains every bias; else the modules whose bias trains: names / dotted suffixes
            (``["query", "intermediate.dense"]``) or a regular expression matching whole module names.
        exclude_modules: modules whose bias stays frozen, same forms.
        trainable_modules: base modules trained in full and saved with the biases, e.g. ``["classifier"]``.

    Example::

        trainer = L.Trainer(callbacks=[BitFit(trainable_modules=["classifier"])])
    """

    method_name = "bitfit"

    def __init__(
        self,
        biases: Optional[Union[str, list[str]]] = None,
        exclude_modules: Optional[Union[str, list[str]]] = None,
        trainable_modules: Optional[list[str]] = None,
    ) -> None:
        if biases is not None and not isinstance(biases, (str, list, tuple)):
            raise TypeError(f"biases must be None, a string or a list of strings, got {type(biases).__name__}: {biases!r}.")
        if isinstance(biases, (list, tuple)) and not biases:
            raise ValueError("biases=[] selects nothing to train. Use None to train every bias, or name modules, e.g. ['query'].")
        super().__init__([], exclude_modules, trainable_modules)
        self.biases = biases if biases is None or isinstance(biases, str) else list(biases)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(biases=repr(self.biases), exclude=repr(self.exclude_modules))

    def _inject(self, module: nn.Module) -> list[str]:
        names = find_biases(module, self.biases, self.exclude_modules)  # raises before anything changes
        state = peft_state(module)
        state["trainable"] = sorted(set(state["trainable"]) | set(names))  # trained and saved, as trainable_modules are
        return names
