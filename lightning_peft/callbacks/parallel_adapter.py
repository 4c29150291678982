"""The ``ParallelAdapter`` callback: :mod:`lightning_peft.methods.parallel_adapter` on a Lightning model."""

from __future__ import annotations

from typing import Literal, Optional, Union

from torch import nn

from lightning_peft.callbacks.base import PEFTCallback
from lightning_peft.methods.houlsby import check_bottleneck_args
from lightning_peft.methods.parallel_adapter import check_scaling, inject_parallel_adapter

__all__ = ["ParallelAdapter"]


class ParallelAdapter(PEFTCallback):
    """Scaled parallel bottleneck adapters beside each block's feed-forward (and/or attention) sublayer.

    ``h = f(x) + s * adapter(x)`` (He et al., 2022). With no arguments: the feed-forward sublayer of every
    block (BERT ``output``, Llama/Qwen2/GPT-2 ``mlp``), bottleneck ``hidden / 16``, ``s = 4``. The
    up-projection starts at zero: the model's outputs are unchanged at step 0.

    Args:
        bottleneck_size: bottleneck width; give this or ``reduction_factor``.
        reduction_factor: bottleneck = hidden size / factor (default 16 when neither is given).
        scaling: ``s``, the factor on the adapter's output.
        activation: nonlinearity inside the bottleneck (default ``"relu"``, as in He et al.'s parallel adapter).
        sites: with default targets, ``"ffn"`` and/or ``"attention"``.
        target_modules: sublayer modules to adapt (names / dotted suffixes, or a regular expression);
            None: the default sites above.
        exclude_modules: modules to leave alone, same forms.
        trainable_modules: base modules trained in full and saved with the adapter, e.g. ``["classifier"]``.

    Example::

        trainer = L.Trainer(callbacks=[ParallelAdapter(bottleneck_size=64, scaling=4.0)])
    """

    method_name = "parallel_adapter"

    def __init__(
        self,
        bottleneck_size: Optional[int] = None,
        reduction_factor: Optional[float] = None,
        scaling: float = 4.0,
        activation: Literal["relu", "gelu", "silu", "tanh"] = "relu",
        sites: list[Literal["attention", "ffn"]] = ["ffn"],  # noqa: B006  (jsonargparse shows the default)
        target_modules: Optional[Union[str, list[str]]] = None,
        exclude_modules: Optional[Union[str, list[str]]] = None,
        trainable_modules: Optional[list[str]] = None,
    ) -> None:
        check_bottleneck_args("Parallel adapter", bottleneck_size, reduction_factor, activation, sites)
        check_scaling(scaling)
        super().__init__(target_modules if target_modules is not None else [], exclude_modules, trainable_modules)
        self.target_modules = target_modules if target_modules is None or isinstance(target_modules, str) else list(target_modules)
        self.bottleneck_size, self.reduction_factor, self.scaling = bottleneck_size, reduction_factor, float(scaling)
        self.activation, self.sites = activation, list(sites)

    def _inject(self, module: nn.Module) -> list[str]:
        return inject_parallel_adapter(
            module, self.target_modules, self.exclude_modules, self.bottleneck_size, self.reduction_factor,
            self.activation, self.scaling, tuple(self.sites),
        )
