"""The ``Houlsby`` callback: :mod:`lightning_peft.methods.houlsby` on a Lightning model."""

from __future__ import annotations

from typing import Literal, Optional, Union

from torch import nn

from lightning_peft.callbacks.base import PEFTCallback
from lightning_peft.methods.houlsby import check_bottleneck_args, inject_houlsby

__all__ = ["Houlsby"]


class Houlsby(PEFTCallback):
    """Houlsby bottleneck adapters after each block's attention output and feed-forward output; the base is frozen.

    With no arguments the adapters go after BERT's ``attention.output.dense`` / ``output.dense``, Llama's and
    Qwen2's ``self_attn.o_proj`` / ``mlp.down_proj``, GPT-2's ``attn.c_proj`` / ``mlp.c_proj``, with a bottleneck of
    ``hidden / 16``. The up-projection starts at zero: the model's outputs are unchanged at step 0.

    Args:
        bottleneck_size: bottleneck width; give this or ``reduction_factor``.
        reduction_factor: bottleneck = hidden size / factor (default 16 when neither is given).
        activation: nonlinearity inside the bottleneck (default ``"relu"``, as in Houlsby et al.'s reference code).
        sites: with default targets, where adapters go: ``"attention"`` and/or ``"ffn"``.
        target_modules: modules whose output gets an adapter (names / dotted suffixes, or a regular
            expression); None: the default sites above.
        exclude_modules: modules to leave alone, same forms.
        trainable_modules: base modules trained in full and saved with the adapter, e.g. ``["classifier"]``.
        gate: scale each adapter's output by a learned gate ``sigmoid(W_g h + b_g)`` read from its input (UniPELT).

    Example::

        trainer = L.Trainer(callbacks=[Houlsby(bottleneck_size=32, trainable_modules=["classifier"])])
    """

    method_name = "houlsby"
    recorded_when_set = ("gate",)

    def __init__(
        self,
        bottleneck_size: Optional[int] = None,
        reduction_factor: Optional[float] = None,
        activation: Literal["relu", "gelu", "silu", "tanh"] = "relu",
        sites: list[Literal["attention", "ffn"]] = ["attention", "ffn"],  # noqa: B006  (jsonargparse shows the default)
        target_modules: Optional[Union[str, list[str]]] = None,
        exclude_modules: Optional[Union[str, list[str]]] = None,
        trainable_modules: Optional[list[str]] = None,
        gate: bool = False,
    ) -> None:
        check_bottleneck_args("Houlsby", bottleneck_size, reduction_factor, activation, sites)
        super().__init__(target_modules if target_modules is not None else [], exclude_modules, trainable_modules)
        self.target_modules = target_modules if target_modules is None or isinstance(target_modules, str) else list(target_modules)
        self.bottleneck_size, self.reduction_factor, self.activation, self.sites = bottleneck_size, reduction_factor, activation, list(sites)
        self.gate = bool(gate)

    def _inject(self, module: nn.Module) -> list[str]:
        return inject_houlsby(
            module, self.target_modules, self.exclude_modules, self.bottleneck_size, self.reduction_factor,
            self.activation, tuple(self.sites), gate=self.gate,
        )
