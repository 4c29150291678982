"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024), the pieces :class:`~lightning_peft.methods.lora.LoRALinear`
uses for an adapter made with ``use_dora=True``.

The adapted weight is a magnitude times a direction::

    W' = m * (W + s B A) / ||W + s B A||_c          m: (out,), initialised to ||W||_c (so W' = W at step 0)

with ``||.||_c`` the norm of each output row (the paper's column norm of ``W^T``) and, as the paper recommends and
``peft`` does, the norm treated as a constant in backward. With ``k = m / ||W + s B A||_c`` the layer computes::

    h = x W^T + b + (k - 1) * (drop(x) W^T) + k * s * drop(x) A^T B^T

(without dropout: ``h = k * (x W^T + s x A^T B^T) + b``), which is ``peft``'s ``DoraLinearLayer`` formula.

Memory and cost, against ``peft`` (which materialises ``B A`` through an identity matrix and ``W + s B A`` in every
forward, and keeps the base and LoRA outputs for backward):

* the norm comes from ``||W_i||^2 + 2 s B_i . (A W_i^T) + s^2 B_i (A A^T) B_i^T``: matrices of ``out x r`` and
  ``r x r``, no second weight-sized tensor (a quantized base is dequantized per call, as LoRA does);
* :class:`_DoRAFunction` computes base and update in one function and keeps for backward the input ``x`` (which the
  base layer needs anyway), ``x A^T`` (``N x r``) and ``z = x W^T + s x A^T B^T`` (``N x out``, what ``m``'s gradient
  needs; it replaces the base and LoRA outputs ``peft`` keeps); the dropout mask is regenerated from a seed.
"""

from __future__ import annotations

from typing import Optional

import torch

from lightning_peft.methods._linear import _dropout_mask
from lightning_peft.quant import dequantize, is_quantized

__all__ = ["dora_weight_norm", "dora_linear"]


def _rows_first(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """The weight as ``(out, in)``, dequantized if it is a quantized parameter."""
    w = dequantize(weight) if is_quantized(weight) else weight
    return w.t() if fan_in_fan_out else w


@torch.no_grad()
def dora_weight_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``||W + s B A||`` of each output row, in float32 (float64 for a float64 weight), without forming ``W + s B A``.
    ``weight``: ``(out, in)``."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    a, b = lora_a.to(acc), lora_b.to(acc)
    w2 = torch.linalg.vector_norm(weight, dim=1, dtype=acc).square()
    wa = (weight @ lora_a.t().to(weight.dtype)).to(acc)  # (out, r)
    cross = (b * wa).sum(1)
    bab = ((b @ (a @ a.t())) * b).sum(1)
    return (w2 + 2.0 * scaling * cross + scaling * scaling * bab).clamp_min(0.0).sqrt()


class _DoRAFunction(torch.autograd.Function):
    """``base + update`` of one DoRA adapter (see the module docstring); returns the layer's output."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, magnitude, scaling: float, dropout: float, seed: int, fan_in_fan_out: bool):
        w = _rows_first(weight, fan_in_fan_out).to(x.dtype)
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        norm = dora_weight_norm(w, a, b, scaling)
        k = (magnitude.detach().to(norm.dtype) / norm).to(x.dtype)
        base = x @ w.t()
        if dropout > 0:  # h = x W^T + (k - 1) drop(x) W^T + k s drop(x) A^T B^T = x W^T - drop(x) W^T + k z
            xd = x * _dropout_mask(x, dropout, seed)
            base_d = xd @ w.t()
            u = xd @ a.t()
            z = base_d + scaling * (u @ b.t())
            out = base - base_d + k * z
            del xd, base_d
        else:  # h = k z
            u = x @ a.t()
            z = base + scaling * (u @ b.t())
            out = k * z
        del base
        if bias is not None:
            out = out + bias.to(out.dtype)
        ctx.save_for_backward(x, weight, lora_a, lora_b, u, z, k, norm)
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.settings = (scaling, dropout, seed, fan_in_fan_out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b, u, z, k, norm = ctx.saved_tensors
        scaling, dropout, seed, fan_in_fan_out = ctx.settings
        need_x, _, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        g = grad_out
        g2, u2 = g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1])
        gl = g * (k * scaling)  # gradient reaching the low-rank product
        gl2 = gl.reshape(-1, gl.shape[-1])
        a, b = lora_a.to(g.dtype), lora_b.to(g.dtype)
        mask = _dropout_mask(x, dropout, seed) if dropout > 0 and (need_x or need_a) else None
        grad_x = grad_w = grad_bias = grad_a = grad_b = grad_m = None
        if need_m:
            grad_m = ((g2.to(norm.dtype) * z.reshape(-1, z.shape[-1]).to(norm.dtype)).sum(0) / norm).to(lora_b.dtype)
        if need_b:
            grad_b = (gl2.t() @ u2).to(lora_b.dtype)
        du = gl @ b if (need_a or need_x) else None
        if need_a:
            xd = x * mask if mask is not None else x
            grad_a = (du.reshape(-1, du.shape[-1]).t() @ xd.reshape(-1, x.shape[-1])).to(lora_a.dtype)
        if need_x:
            w = _rows_first(weight, fan_in_fan_out).to(g.dtype)
            if dropout > 0:  # h = x W^T + (k - 1) drop(x) W^T + k s drop(x) A^T B^T
                grad_x = g @ w + ((g * (k - 1)) @ w + du @ a) * mask
            else:  # h = k (x W^T + s x A^T B^T)
                grad_x = (g * k) @ w + du @ a
        if need_bias and ctx.bias_shape is not None:
            grad_bias = g2.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_m, None, None, None, None


def dora_linear(x, weight, bias, lora_a, lora_b, magnitude, scaling: float, dropout: float = 0.0, seed: int = 0, fan_in_fan_out: bool = False):
    """Functional DoRA linear: the base layer plus one DoRA adapter (differentiable in ``x``, ``bias``, ``A``, ``B``, ``m``)."""
    return _DoRAFunction.apply(x, weight, bias, lora_a, lora_b, magnitude, scaling, dropout, seed, fan_in_fan_out)


def dora_update(x, weight, lora_a, lora_b, magnitude, scaling: float, mask: Optional[torch.Tensor], fan_in_fan_out: bool = False):
    """The update a DoRA adapter adds to the base output, in plain differentiable operations (the definition
    :class:`_DoRAFunction` is held equal to): ``(k - 1) * drop(x) W^T + k * s * drop(x) A^T B^T``. ``mask``: the
    scaled dropout mask, or None."""
    w = _rows_first(weight, fan_in_fan_out).to(x.dtype)
    a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    norm = dora_weight_norm(w, a, b, scaling)
    k = (magnitude.to(norm.dtype) / norm).to(x.dtype)
    xd = x * mask if mask is not None else x
    return (k - 1) * (xd @ w.t()) + k * scaling * ((xd @ a.t()) @ b.t())
