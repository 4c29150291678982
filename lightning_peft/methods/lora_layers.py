"""LoRA on embeddings and convolutions: :class:`LoRAEmbedding` (``nn.Embedding``) and :class:`LoRAConv`
(``nn.Conv1d`` / ``nn.Conv2d``), the same named-adapter layer as :class:`~lightning_peft.methods.lora.LoRALinear` with
another geometry.

Both are linear maps in disguise, which is how they reuse LoRALinear's adapters, merge and export:

* an embedding is ``one_hot(ids) W`` with ``W`` stored ``(num_embeddings, dim)``, i.e. a linear layer whose weight is
  stored ``(in, out)`` (``fan_in_fan_out``). Its update is ``s * A^T[ids] B^T``, ``A: r x num_embeddings``,
  ``B: dim x r``; as in Hugging Face PEFT, ``A`` starts at zero and ``B`` normal (the product is zero), and dropout
  is not applied to token ids.
* a convolution is a linear map of each input patch (``in_channels x kernel`` values): ``A`` is a convolution with
  the base's kernel, stride and padding into ``r`` channels, ``B`` a 1x1 convolution to ``out_channels``
  (PEFT's layout); they are kept flattened, ``A: r x (in_channels * prod(kernel))``, ``B: out x r``, so the merged
  update ``s B A`` is the base weight's shape once reshaped.

"all-linear" never selects them: name embedding and convolution modules in ``target_modules``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.methods.lora import LoRALinear, register_layer_class

__all__ = ["LoRAConv", "LoRAEmbedding"]


def _check_plain_forward(base: nn.Module, kind: type[nn.Module]) -> None:
    """The layer recomputes the base from its weight: a subclass with its own ``forward`` (a scaled embedding) would
    silently lose what that forward adds."""
    if type(base).forward is not kind.forward:
        raise TypeError(
            f"{type(base).__qualname__} is an {kind.__name__} with its own forward, which LoRA would bypass (it computes the "
            f"{kind.__name__} from its weight). Leave it out of target_modules."
        )


class _NotLinear(LoRALinear):
    """What the embedding and convolution layers change in :class:`LoRALinear`: the base computation, the update, the
    rebuilt base layer; no fused path, no DoRA, PiSSA or gate (refused by ``add_adapter``/``add_gate``)."""

    wraps_linear = False  # QLoRAPrecision quantizes linear weights only; PEFT's fan_in_fan_out is about linear layers

    def __init__(self, base: nn.Module, **kwargs) -> None:
        self.__dict__["_base_module"] = base  # the original module, for unload; its parameters are ours (shared)
        super().__init__(base, **kwargs)

    def add_adapter(self, name: str, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, use_rslora: bool = False,
                    init: str = "kaiming", active: bool = True, use_dora: bool = False) -> None:
        kind = type(self._base_module).__name__
        if use_dora:
            raise ValueError(f"DoRA on {kind} is not supported yet: use use_dora=False for {kind} targets (or leave them out).")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"init={init!r} on {kind} is not supported: it starts LoRA from a linear layer's weight. Use 'kaiming' or 'gaussian'.")
        super().add_adapter(name, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init, active=active)

    def add_gate(self, name: Optional[str] = None):
        raise ValueError(f"Gates (UniPELT) are for LoRA on linear layers, not on {type(self._base_module).__name__}.")

    def _fusable(self, name: str) -> bool:
        return False

    def base_layer(self) -> nn.Module:
        base = self._base_module  # its parameters are this layer's (a strategy may have replaced them since)
        base.weight = self.weight
        if self.bias is not None:
            base.bias = self.bias
        return base


@register_layer_class
class LoRAEmbedding(_NotLinear):
    """LoRA on an ``nn.Embedding`` (see the module docstring). Args as :class:`LoRALinear`."""

    peft_parts = ("lora_embedding_A", "lora_embedding_B")  # PEFT keeps them as plain parameters, no ".weight"

    @classmethod
    def supported_types(cls) -> tuple[type[nn.Module], ...]:
        return (nn.Embedding,)

    @staticmethod
    def _geometry(base: nn.Module) -> tuple[int, int, bool]:
        _check_plain_forward(base, nn.Embedding)
        if base.max_norm is not None or base.sparse:
            raise ValueError("LoRA on an nn.Embedding with max_norm or sparse=True is not supported.")
        return base.num_embeddings, base.embedding_dim, True

    def reset_lora_parameters(self, name: str = "default") -> None:
        a, b = self.lora_a[name], self.lora_b[name]
        if a.is_meta:
            return
        with torch.no_grad():  # as PEFT, whatever the init: A zero, B standard normal
            a.zero_()
            nn.init.normal_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # token ids: no autocast cast of the input
        return self._forward(x, None)

    def _base_out(self, x, weight, bias):
        m = self._base_module
        return F.embedding(x, weight, m.padding_idx, None, m.norm_type, m.scale_grad_by_freq, False)

    def _update(self, x: torch.Tensor, name: str, dropout: bool = True) -> torch.Tensor:
        m = self._base_module
        a, b, spec = self.lora_a[name], self.lora_b[name], self.specs[name]
        rows = F.embedding(x, a.t(), m.padding_idx, None, m.norm_type, m.scale_grad_by_freq, False)  # (..., r)
        return (rows @ b.t()) * spec.scaling


@register_layer_class
class LoRAConv(_NotLinear):
    """LoRA on an ``nn.Conv1d`` / ``nn.Conv2d`` (see the module docstring). Args as :class:`LoRALinear`."""

    @classmethod
    def supported_types(cls) -> tuple[type[nn.Module], ...]:
        return (nn.Conv1d, nn.Conv2d)

    @staticmethod
    def _geometry(base: nn.Module) -> tuple[int, int, bool]:
        _check_plain_forward(base, nn.Conv1d if isinstance(base, nn.Conv1d) else nn.Conv2d)
        if base.groups != 1 or base.padding_mode != "zeros" or any(d != 1 for d in base.dilation):
            raise ValueError(
                f"LoRA on {type(base).__name__} supports groups=1, dilation 1 and padding_mode='zeros' (as PEFT), got "
                f"groups={base.groups}, dilation={base.dilation}, padding_mode={base.padding_mode!r}."
            )
        return base.in_channels * math.prod(base.kernel_size), base.out_channels, False

    def _conv(self, x, weight, bias=None, stride=None, padding=None):
        m = self._base_module
        fn = F.conv1d if isinstance(m, nn.Conv1d) else F.conv2d
        return fn(x, weight, bias, m.stride if stride is None else stride, m.padding if padding is None else padding)

    def _base_out(self, x, weight, bias):
        return self._conv(x, weight, bias)

    def _update(self, x: torch.Tensor, name: str, dropout: bool = True) -> torch.Tensor:
        m, r = self._base_module, self.specs[name].r
        a, b, s, p = self._operands(x, name, dropout)
        xd = F.dropout(x, p, training=True) if p > 0 else x
        ones = (1,) * len(m.kernel_size)
        h = self._conv(xd, a.view(r, m.in_channels, *m.kernel_size))  # (N, r, ...)
        return self._conv(h, b.view(self.out_features, r, *ones), stride=ones, padding=0) * s

    def delta_weight(self, name: Optional[str] = None) -> torch.Tensor:
        return super().delta_weight(name).view(self.weight.shape)

    @classmethod
    def peft_shapes(cls, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        base = module._base_module if isinstance(module, LoRAConv) else module
        ones = (1,) * len(base.kernel_size)  # PEFT's lora_A is a convolution with the base's kernel, lora_B a 1x1 one
        return (r, base.in_channels, *base.kernel_size), (base.out_channels, r, *ones)
