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

__all__ = ["dora_linear", "dora_update", "dora_weight_norm", "weight_sq_norms_of"]


def _rows_first(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """The weight as ``(out, in)``, dequantized if it is a quantized parameter."""
    w = dequantize(weight) if is_quantized(weight) else weight
    return w.t() if fan_in_fan_out else w


@torch.no_grad()
def dora_weight_norm(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, weight_sq_norms: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``||W + s B A||`` of each output row, in float32 (float64 for a float64 weight), without forming ``W + s B A``.
    ``weight``: ``(out, in)``; ``weight_sq_norms``: ``||W_i||^2`` if known."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    a, b = lora_a.to(acc), lora_b.to(acc)
    w2 = weight_sq_norms.to(acc) if weight_sq_norms is not None else weight_sq_norms_of(weight)
    wa = (weight @ lora_a.t().to(weight.dtype)).to(acc)  # (out, r)
    cross = (b * wa).sum(1)
    bab = ((b @ (a @ a.t())) * b).sum(1)
    return (w2 + 2.0 * scaling * cross + scaling * scaling * bab).clamp_min(0.0).sqrt()


def weight_sq_norms_of(weight: torch.Tensor) -> torch.Tensor:
    """``||W_i||^2`` of each output row of an ``(out, in)`` weight, float32 (float64 for float64)."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(weight, dim=1, dtype=acc).square()


class _DoRAFunction(torch.autograd.Function):
    """``base + update`` of one DoRA adapter (see the module docstring); returns the layer's output. Works on 2-D views
    and accumulates in place where it can: each extra pass over an ``N x out`` tensor costs about as much as the
    low-rank product."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, magnitude, scaling: float, dropout: float, seed: int, fan_in_fan_out: bool, w2):
        w = _rows_first(weight, fan_in_fan_out).to(x.dtype)
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        norm = dora_weight_norm(w, a, b, scaling, w2)
        k = (magnitude.detach().to(norm.dtype) / norm).to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        # the output is made in its final shape and filled through a 2-D view: a custom Function's output that is a
        # view cannot be modified in place by the model afterwards (Falcon's ``mlp_output += attention_output``)
        out = torch.empty(*x.shape[:-1], w.shape[0], dtype=x.dtype, device=x.device)
        out2 = out.view(-1, w.shape[0])
        if dropout > 0:  # h = x W^T + (k - 1) drop(x) W^T + k s drop(x) A^T B^T = x W^T - drop(x) W^T + k z
            xd = x2 * _dropout_mask(x2, dropout, seed)
            u = xd @ a.t()
            z = (xd @ w.t()).addmm_(u, b.t(), alpha=scaling)  # drop(x) W^T + s drop(x) A^T B^T
            torch.mul(z, k, out=out2)
            out2.addmm_(x2, w.t()).sub_(xd @ w.t())
            del xd
        else:  # h = k z
            u = x2 @ a.t()
            z = (x2 @ w.t()).addmm_(u, b.t(), alpha=scaling)  # x W^T + s x A^T B^T
            torch.mul(z, k, out=out2)
        if bias is not None:
            out2.add_(bias.to(out.dtype))
        ctx.save_for_backward(x, weight, lora_a, lora_b, u, z, k, norm)
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.settings = (scaling, dropout, seed, fan_in_fan_out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b, u, z, k, norm = ctx.saved_tensors
        scaling, dropout, seed, fan_in_fan_out = ctx.settings
        need_x, need_w, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        x2 = x.reshape(-1, x.shape[-1])
        a, b = lora_a.to(g.dtype), lora_b.to(g.dtype)
        mask = _dropout_mask(x2, dropout, seed) if dropout > 0 and (need_x or need_a) else None
        grad_x = grad_w = grad_bias = grad_a = grad_b = grad_m = None
        if need_m:  # d/dm = sum over tokens of g * z / norm (the norm a constant)
            grad_m = ((g * z).sum(0).to(norm.dtype) / norm).to(lora_b.dtype)
        gk = g * k  # what reaches z
        if need_b:
            grad_b = (gk.t() @ u).mul_(scaling).to(lora_b.dtype)
        du = (gk @ b).mul_(scaling) if (need_a or need_x) else None  # (N, r)
        if need_a:
            xd = x2 * mask if mask is not None else x2
            grad_a = (du.t() @ xd).to(lora_a.dtype)
        if need_x:
            w = _rows_first(weight, fan_in_fan_out).to(g.dtype)
            if mask is not None:  # h = x W^T - drop(x) W^T + k z(drop(x))
                grad_x = torch.addcmul(g @ w, (gk - g) @ w + du @ a, mask)
            else:  # h = k z(x)
                grad_x = (gk @ w).addmm_(du, a)
            grad_x = grad_x.view(x.shape)
        if need_w:  # a trained base weight (the norm a constant here too): h = k z(x), or x W^T - drop(x) W^T + k z(drop(x))
            if dropout > 0:
                xd = x2 * _dropout_mask(x2, dropout, seed)
                grad_w = g.t() @ x2 + (gk - g).t() @ xd
            else:
                grad_w = gk.t() @ x2
            grad_w = (grad_w.t() if fan_in_fan_out else grad_w).to(weight.dtype)
        if need_bias and ctx.bias_shape is not None:
            grad_bias = g.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_m, None, None, None, None, None


def dora_linear(
    x, weight, bias, lora_a, lora_b, magnitude, scaling: float, dropout: float = 0.0, seed: int = 0, fan_in_fan_out: bool = False,
    weight_sq_norms: Optional[torch.Tensor] = None,
):
    """Functional DoRA linear: the base layer plus one DoRA adapter (differentiable in ``x``, ``bias``, ``A``, ``B``, ``m``).
    ``weight_sq_norms``: ``||W_i||^2`` when the caller keeps them (the frozen base does not change between steps)."""
    return _DoRAFunction.apply(x, weight, bias, lora_a, lora_b, magnitude, scaling, dropout, seed, fan_in_fan_out, weight_sq_norms)


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
