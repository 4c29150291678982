"""A learned gate that an adapter layer can carry (off by default): ``g = sigmoid(W x + b)``.

UniPELT (Mao et al., 2022) puts each of its submodules behind such a gate, computed from the submodule's input,
so the model learns how much to rely on each. The layers that can carry one (LoRA, the bottleneck adapters,
the key/value prefixes) own it under their method's prefix (``lora_gate``, ``houlsby_gate``, ``prefix_gate``),
so training, saving and counting find it like every other adapter parameter.

The gate remembers the mean of its last output (``last_mean``, detached, one value per output) for logging.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Gate"]


class Gate(nn.Module):
    """``g = sigmoid(x W^T + b)``: ``(..., in_features) -> (..., out_features)``, values in (0, 1).

    Initialised like ``nn.Linear`` (so ``g`` starts near 0.5). Not an ``nn.Linear`` subclass on purpose:
    ``target_modules="all-linear"`` must not pick a gate up.

    Args:
        in_features: width of the input the gate reads.
        out_features: number of gate values (1, or 2 for separate key and value prefix gates).
        dtype: parameter dtype (a non-float dtype falls back to float32).
        device: parameter device.
    """

    def __init__(self, in_features: int, out_features: int = 1, dtype: Optional[torch.dtype] = None, device=None) -> None:
        super().__init__()
        dtype = dtype if dtype is not None and dtype.is_floating_point else torch.float32
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
        self.last_mean: Optional[torch.Tensor] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's defaults
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype)))  # (..., out)
        self.record(g.reshape(-1, self.out_features).mean(0))
        return g

    def record(self, mean: torch.Tensor) -> None:
        """Keep ``mean`` (``(out_features,)``) as :attr:`last_mean`, detached, for logging."""
        self.last_mean = mean.detach().float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
