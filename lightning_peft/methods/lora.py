"""LoRA: Low-Rank Adaptation (Hu et al., 2021), with rsLoRA scaling (Kalajdzievski, 2023).

A frozen linear map ``W`` (out x in) gains a trainable low-rank update::

    h = x W^T + b + s * dropout(x) A^T B^T,    A: r x in,  B: out x r,  B = 0 at init
    s = alpha / r            (LoRA)
    s = alpha / sqrt(r)      (rsLoRA)

so the model is unchanged at step 0 and only ``A`` and ``B`` train. ``merge()`` folds ``s * B A`` into
``W`` for inference at no extra cost; ``unmerge()`` takes it back out.

Memory. The forward and backward are one ``torch.autograd.Function``: it saves only the input ``x``
(which a full fine-tuning step saves too) and the small ``x A^T`` (N x r); the frozen ``W`` gets no
weight gradient. Dropout does not keep a dropped copy of ``x``: the mask is regenerated in backward
from a seed drawn in forward.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.core import AdapterLayer
from lightning_peft.targeting import TargetSpec, find_targets, linear_types

__all__ = ["LoRALinear", "check_lora_args", "inject_lora", "lora_linear"]

LoRAInit = Literal["kaiming", "gaussian"]


def check_lora_args(r: int, alpha: float, dropout: float, init: str = "kaiming") -> None:
    """Raise ``ValueError`` naming the bad value and the fix."""
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got r={r!r}. Typical values: 4, 8, 16, 64.")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got alpha={alpha!r}. A common choice is alpha = 2 * r.")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got dropout={dropout!r}. Use 0.0 to disable it.")
    if init not in ("kaiming", "gaussian"):
        raise ValueError(f"LoRA init must be 'kaiming' or 'gaussian', got init={init!r}.")


def _dropout_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """A {0, 1/(1-p)} mask shaped like ``x``, the same for the same seed (forward and backward agree)."""
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    return torch.empty_like(x).bernoulli_(1.0 - p, generator=gen).mul_(1.0 / (1.0 - p))


def _base_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], fan_in_fan_out: bool) -> torch.Tensor:
    if fan_in_fan_out:  # HF Conv1D stores the weight as (in, out)
        weight = weight.t()
    return F.linear(x, weight, bias)


class _LoRAFunction(torch.autograd.Function):
    """``y = x W^T + b + s * drop(x) A^T B^T`` with a hand-written backward.

    Saves ``x`` and ``xa = drop(x) A^T`` (N x r); never a weight-shaped gradient for a frozen ``W``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dropout: float, seed: int, fan_in_fan_out: bool):
        xd = x * _dropout_mask(x, dropout, seed) if dropout > 0 else x
        xa = xd @ lora_a.t()  # (..., r)
        out = _base_linear(x, weight, bias, fan_in_fan_out)  # (..., out)
        out = out.view(-1, out.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), lora_b.t(), alpha=scaling).view(out.shape)
        del xd
        ctx.save_for_backward(x, xa, weight, lora_a, lora_b)
        ctx.scaling, ctx.dropout, ctx.seed, ctx.fan_in_fan_out = scaling, dropout, seed, fan_in_fan_out
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, xa, weight, lora_a, lora_b = ctx.saved_tensors
        s, p = ctx.scaling, ctx.dropout
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        in_f = x.shape[-1]
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        x2 = x.reshape(-1, in_f)  # (N, in)
        gb = g @ lora_b if (need_x or need_a) else None  # (N, r)
        mask = _dropout_mask(x2, p, ctx.seed) if p > 0 and (need_x or need_a) else None

        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_x:
            w = weight.t() if ctx.fan_in_fan_out else weight  # (out, in)
            grad_x = g @ w.to(g.dtype)
            lora_gx = gb @ lora_a  # (N, in)
            if mask is not None:
                lora_gx.mul_(mask)
            grad_x.add_(lora_gx, alpha=s)
            grad_x = grad_x.view(x.shape)
        if need_w:
            grad_w = x2.t() @ g if ctx.fan_in_fan_out else g.t() @ x2
        if need_b:
            grad_bias = g.sum(0)
        if need_a:
            xd = x2 * mask if mask is not None else x2
            grad_a = (gb.t() @ xd).mul_(s)  # (r, in)
        if need_lb:
            grad_b = (g.t() @ xa.reshape(-1, xa.shape[-1])).mul_(s)  # (out, r)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, None


def lora_linear(x, weight, bias, lora_a, lora_b, scaling: float, dropout: float = 0.0, seed: int = 0, fan_in_fan_out: bool = False):
    """Functional LoRA linear (differentiable in every tensor argument)."""
    return _LoRAFunction.apply(x, weight, bias, lora_a, lora_b, scaling, dropout, seed, fan_in_fan_out)


class LoRALinear(AdapterLayer):
    """A linear layer (``nn.Linear`` or HF ``Conv1D``) with a LoRA update.

    The base parameters stay under their own names (``weight``, ``bias``); the adapter adds
    ``lora_a`` (r x in) and ``lora_b`` (out x r), created in the base weight's dtype and device.

    Args:
        base: the layer to adapt; its parameters are shared, not copied.
        r: rank of the update.
        alpha: scale numerator: ``s = alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout probability on the adapter's input.
        use_rslora: rank-stabilized scaling ``alpha / sqrt(r)``.
        init: ``"kaiming"`` (uniform, as the reference implementation) or ``"gaussian"`` (std ``1/r``) for ``A``; ``B`` is zero.
    """

    adapter_prefix = "lora_"
    mergeable = True

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, use_rslora: bool = False, init: LoRAInit = "kaiming") -> None:
        check_lora_args(r, alpha, dropout, init)
        if not isinstance(base, linear_types()):
            raise TypeError(f"LoRALinear wraps nn.Linear or transformers Conv1D, got {type(base).__name__}.")
        super().__init__()
        self.fan_in_fan_out = not isinstance(base, nn.Linear)
        w = base.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])
        self._base_type = type(base)
        self.weight = w
        self.bias = base.bias
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.lora_a = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=w.device))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=w.device))
        self.r, self.alpha, self.dropout, self.use_rslora, self.init = r, alpha, float(dropout), use_rslora, init
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        if self.lora_a.is_meta:
            return
        with torch.no_grad():
            if self.init == "gaussian":
                nn.init.normal_(self.lora_a, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
            self.lora_b.zero_()

    def delta_weight(self) -> torch.Tensor:
        """``s * B A`` in the base weight's layout, computed in float32."""
        delta = (self.lora_b.float() @ self.lora_a.float()) * self.scaling  # (out, in)
        return delta.t() if self.fan_in_fan_out else delta

    def _lora_out(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            out = _base_linear(x, self.weight, self.bias, self.fan_in_fan_out)
            if self.disabled and self.merged:  # the base alone = merged weights minus the update
                out = out - self._lora_out(x)
            return out
        weight, bias, lora_a, lora_b = self.weight, self.bias, self.lora_a, self.lora_b
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            x, weight, lora_a, lora_b = x.to(dtype), weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
            with torch.autocast(device_type, enabled=False):
                return self._apply_fn(x, weight, bias, lora_a, lora_b)
        return self._apply_fn(x, weight, bias, lora_a, lora_b)

    def _apply_fn(self, x, weight, bias, lora_a, lora_b):
        p = self.dropout if self.training else 0.0
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
        if lora_a.dtype != x.dtype:
            lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        return _LoRAFunction.apply(x, weight, bias, lora_a, lora_b, self.scaling, p, seed, self.fan_in_fan_out)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        merged = self.weight.float() + self.delta_weight()
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"Merging this LoRA adapter ({self.out_features}x{self.in_features}, r={self.r}) would write NaN/inf "
                "into the base weight; the weight was left unchanged. The adapter weights are not finite: check the "
                "training run (learning rate, loss scaling) or reload the adapter."
            )
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def base_layer(self) -> nn.Module:
        with torch.device("meta"):
            layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None) if not self.fan_in_fan_out else self._base_type(self.out_features, self.in_features)
        layer.weight = self.weight
        layer.bias = self.bias
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}, "
            f"scaling={self.scaling:.4g}, dropout={self.dropout}, merged={self.merged}"
        )


def inject_lora(
    model: nn.Module,
    target_modules: TargetSpec,
    exclude_modules: Optional[TargetSpec] = None,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: LoRAInit = "kaiming",
) -> list[str]:
    """Wrap the matching layers of ``model`` in :class:`LoRALinear`, in place; returns their names.

    All targets are validated and all new layers built before the first one is swapped in, so an
    error leaves ``model`` unchanged.
    """
    check_lora_args(r, alpha, dropout, init)
    names = find_targets(model, target_modules, exclude_modules, supported=linear_types(), method="LoRA")
    new = {n: LoRALinear(model.get_submodule(n), r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init) for n in names}
    for name, layer in new.items():
        model.set_submodule(name, layer)
    return names
