"""The ``MAMAdapter`` callback: :mod:`lightning_peft.methods.mam_adapter` on a Lightning model."""

from __future__ import annotations

from typing import Literal, Optional, Union

from torch import nn

from lightning_peft.callbacks.base import PEFTCallback
from lightning_peft.methods.mam_adapter import check_mam_args, inject_mam_adapter

__all__ = ["MAMAdapter"]


class MAMAdapter(PEFTCallback):
    """MAM adapter (He et al., 2022): prefix tuning in attention + a scaled parallel adapter beside the feed-forward sublayer.

    The paper's defaults: 30 prefixes per layer (through prefix tuning's MLP), FFN bottleneck hidden / 2 (512 on a
    1024-wide model; 192 on all-MiniLM-L6-v2), scaling 4. The same as ``PrefixTuning(num_virtual_tokens=30)`` then
    ``ParallelAdapter(reduction_factor=2, scaling=4)`` on one model (same seed, same parameters and outputs). The
    parallel adapters start at zero: at step 0 the model is the base model with the prefixes alone.

    Args:
        num_virtual_tokens: prefix length ``l``.
        prefix_hidden_size: width of the prefixes' reparameterizing MLP; None: the model's hidden size.
        bottleneck_size: FFN adapter bottleneck; give this or ``reduction_factor`` (neither: hidden / 2).
        reduction_factor: bottleneck = hidden size / factor.
        scaling: ``s``, the factor on the parallel adapter's output.
        activation: nonlinearity inside the bottleneck.
        ffn_target_modules: the feed-forward sublayers (names / dotted suffixes, or a regular expression); None:
            found by name (BERT ``output``, Llama / Qwen2 / GPT-2 ``mlp``).
        trainable_modules: base modules trained in full and saved with the adapter, e.g. ``["classifier"]``.

    Example::

        trainer = L.Trainer(callbacks=[MAMAdapter(trainable_modules=["classifier"])])
    """

    method_name = "mam_adapter"

    def __init__(
        self,
        num_virtual_tokens: int = 30,
        prefix_hidden_size: Optional[int] = None,
        bottleneck_size: Optional[int] = None,
        reduction_factor: Optional[float] = None,
        scaling: float = 4.0,
        activation: Literal["relu", "gelu", "silu", "tanh"] = "relu",
        ffn_target_modules: Optional[Union[str, list[str]]] = None,
        trainable_modules: Optional[list[str]] = None,
    ) -> None:
        check_mam_args(num_virtual_tokens, bottleneck_size, reduction_factor, scaling, activation)
        super().__init__([], None, trainable_modules)
        self.num_virtual_tokens, self.prefix_hidden_size = num_virtual_tokens, prefix_hidden_size
        self.bottleneck_size, self.reduction_factor, self.scaling, self.activation = bottleneck_size, reduction_factor, float(scaling), activation
        self.ffn_target_modules = ffn_target_modules if ffn_target_modules is None or isinstance(ffn_target_modules, str) else list(ffn_target_modules)

    def _inject(self, module: nn.Module) -> list[str]:
        return inject_mam_adapter(
            module, self.num_virtual_tokens, self.prefix_hidden_size, self.bottleneck_size, self.reduction_factor,
            self.scaling, self.activation, self.ffn_target_modules,
        )
