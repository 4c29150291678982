"""``LinearAdapter``: what every adapter that wraps one frozen linear layer shares (LoRA, AdaLoRA, (IA)³).

It owns the frozen ``weight`` and ``bias`` (shared with the wrapped layer, not copied), the layout
(``nn.Linear`` stores ``(out, in)``, Hugging Face's GPT-2 ``Conv1D`` ``(in, out)``), the base path
through the quantization layer (a plain, 4-bit or int8 weight alike: :func:`~lightning_peft.quant.frozen_linear`),
writing a merged weight back (re-quantized when the base is quantized, with the warning that rounding gives),
and rebuilding the plain base layer for ``unload``. A method adds its parameters and its update; the QLoRA
plugin quantizes the weight of any ``LinearAdapter`` and keeps its adapter parameters in float32.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.core import AdapterLayer
from lightning_peft.quant import QuantLinear, dequantize, frozen_linear, is_quantized, requantize, weight_shape
from lightning_peft.targeting import linear_types

__all__ = ["LinearAdapter", "base_linear"]


def base_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], fan_in_fan_out: bool) -> torch.Tensor:
    """``x W^T + b`` for a frozen ``W`` in either layout, plain or quantized."""
    if fan_in_fan_out:  # HF Conv1D stores the weight as (in, out)
        return F.linear(x, dequantize(weight, x.dtype).t(), bias)
    return frozen_linear(x, weight, bias)  # a quantized base: 4-bit dequantized for this call, or LLM.int8


class LinearAdapter(AdapterLayer):
    """Base class of the adapters that wrap one frozen linear layer (``nn.Linear``, HF ``Conv1D`` or a quantized
    :class:`~lightning_peft.quant.QuantLinear`).

    Args:
        base: the layer to adapt; its parameters are shared, not copied.
    """

    mergeable = True
    wraps_linear = True  # a linear layer (the QLoRA plugin quantizes its weight); False: a linear map only in disguise

    def __init__(self, base: nn.Module) -> None:
        if not isinstance(base, self.supported_types()):
            names = " or ".join(t.__name__ for t in self.supported_types())
            raise TypeError(f"{type(self).__name__} wraps {names}, got {type(base).__name__}.")
        super().__init__()
        self.in_features, self.out_features, self.fan_in_fan_out = self._geometry(base)
        self._base_type = type(base)
        self.weight = base.weight
        self.bias = getattr(base, "bias", None)

    @classmethod
    def supported_types(cls) -> tuple[type[nn.Module], ...]:
        """The module types this layer wraps."""
        return linear_types()

    @staticmethod
    def _geometry(base: nn.Module) -> tuple[int, int, bool]:
        """``(in_features, out_features, fan_in_fan_out)`` of the linear map ``base`` computes: ``nn.Linear`` stores its
        weight ``(out, in)``, HF ``Conv1D`` ``(in, out)``."""
        fan_in_fan_out = not isinstance(base, nn.Linear)
        shape = weight_shape(base.weight)  # the logical shape, also of a quantized weight
        return (shape[0], shape[1], True) if fan_in_fan_out else (shape[1], shape[0], False)

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype new adapter parameters take: the base weight's, or float32 for a quantized base."""
        return self.weight.dtype if self.weight.dtype.is_floating_point else torch.float32

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen base layer's output for ``x``."""
        return base_linear(x, self.weight, self.bias, self.fan_in_fan_out)

    def dense_weight(self) -> torch.Tensor:
        """The base weight in float32, in its own layout (dequantized when quantized)."""
        return dequantize(self.weight, torch.float32).float()

    def _write_weight(self, value: torch.Tensor, what: str) -> None:
        """Write ``value`` (float32, the weight's layout) into the base weight: in place, or re-quantized (QLoRA:
        rounds, and ``requantize`` warns)."""
        if is_quantized(self.weight):
            self.weight = requantize(self.weight, value, what)
        else:
            self.weight.copy_(value.to(self.weight.dtype))

    def _check_finite(self, merged: torch.Tensor, what: str) -> None:
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"Merging {what} ({self.out_features}x{self.in_features}) would write NaN/inf into the base weight; the "
                "weight was left unchanged. The adapter weights are not finite: check the training run (learning rate, "
                "loss scaling) or reload the adapter."
            )

    def base_layer(self) -> nn.Module:
        if is_quantized(self.weight) and not self.fan_in_fan_out:  # QLoRA: a frozen quantized linear
            return QuantLinear(self.weight, self.bias)
        with torch.device("meta"):
            layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None) if not self.fan_in_fan_out else self._base_type(self.out_features, self.in_features)
        layer.weight = self.weight
        layer.bias = self.bias
        return layer


def _dropout_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """A {0, 1/(1-p)} mask shaped like ``x``, the same for the same seed (forward and backward agree): the dropout of
    the LoRA-family functions, regenerated in backward instead of keeping a dropped copy of ``x``."""
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    return torch.empty_like(x).bernoulli_(1.0 - p, generator=gen).mul_(1.0 / (1.0 - p))
