"""LoRA: Low-Rank Adaptation (Hu et al., 2021), with rsLoRA scaling (Kalajdzievski, 2023).

A frozen linear map ``W`` (out x in) gains a trainable low-rank update::

    h = x W^T + b + s * dropout(x) A^T B^T,    A: r x in,  B: out x r,  B = 0 at init
    s = alpha / r            (LoRA)
    s = alpha / sqrt(r)      (rsLoRA)

so the model is unchanged at step 0 and only ``A`` and ``B`` train.

Initialisation from the base weight (``init="pissa"``, ``"pissa_niter_K"``, ``"olora"``; PiSSA, Meng et al., 2024;
OLoRA, Büyükakyüz, 2024): ``A`` and ``B`` start at ``A0, B0`` taken from ``W`` (its top-r singular part, or its QR
factors) and the adapter trains ``W``'s principal part while the rest stays frozen::

    h = x W^T + b + s * dropout(x) A^T B^T - s * x A0^T B0^T

Hugging Face PEFT writes the residual ``W - s B0 A0`` into the base weight; here the base weight is left as it is and
the frozen ``A0, B0`` (``lora_init_a``/``lora_init_b``, saved with the adapter) subtract the initial product: the same
function, and the base stays the original model (switching the adapter off, deleting it, another adapter, a quantized
or sharded base all see ``W``), at the cost of one more rank-r product per layer. The update ``s (B A - B0 A0)`` is
plain LoRA of rank ``2r``, ``[B | -B0] [A ; A0]``: how it is exported (PEFT's "conversion to LoRA"). ``merge()`` folds ``s * B A`` into
``W`` for inference at no extra cost; ``unmerge()`` takes it back out.

Gate (optional, off by default; UniPELT, Mao et al., 2022): :meth:`LoRALinear.add_gate` puts the update of an
adapter behind a learned gate read from the layer's input, per token::

    h = x W^T + b + g(x) * s * dropout(x) A^T B^T,    g(x) = sigmoid(x W_g^T + b_g)   (lora_gate.<name>)

A gated update depends on ``x`` through ``g``: it cannot be merged into ``W``.

One forward contract. The update of adapter ``name`` is defined in one place, :meth:`LoRALinear._update`
(dropout, low-rank product, scaling, gate); the layer's output is the base output plus the update of every
wanted adapter (minus those merged into ``W`` but not wanted now), and per-sample routing adds each adapter's
update to its rows. A variant changes ``_update`` (and says whether the fused fast path below still holds).

Memory. The update is a ``torch.autograd.Function`` that saves only the input ``x`` (which a full fine-tuning
step saves too) and the small ``x A^T`` (N x r). Dropout does not keep a dropped copy of ``x``: the mask is
regenerated in backward from a seed drawn in forward. As an optimisation, the base output and the first plain
(ungated) adapter's update are computed by one fused function (``_LoRAFunction``, the same mask from the same seed):
it accumulates in place instead of adding two outputs and two input gradients. The frozen ``W`` gets no weight
gradient either way.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.core import STATE_ATTR, NamedAdapters, _non_finite_problem, check_adapter_name, sharding_of
from lightning_peft.methods._gate import Gate
from lightning_peft.module_copies import ModuleCopies
from lightning_peft.methods._linear import LinearAdapter, _dropout_mask, base_linear
from lightning_peft.methods.dora import dora_linear, dora_update, dora_weight_norm, weight_sq_norms_of
from lightning_peft.quant import dequantize, is_quantized  # QLoRA: quantized base weights
from lightning_peft.targeting import TargetSpec, find_targets, linear_types

__all__ = [
    "LoRALinear", "LoRASpec", "add_weighted_adapter", "check_lora_args", "from_weight", "inject_lora", "lora_linear", "pattern_value",
    "register_layer_class",
]

LoRAInit = str
"""``"kaiming"``, ``"gaussian"`` (``B = 0``), or from the base weight: ``"pissa"``, ``"pissa_niter_K"``, ``"olora"``."""

_FROM_WEIGHT = re.compile(r"pissa|pissa_niter_(\d+)|olora")


def from_weight(init: str) -> bool:
    """Whether ``init`` starts ``A, B`` from the base weight (PiSSA, OLoRA): the adapter then keeps its initial
    product and subtracts it, so that the model is unchanged at step 0 while the base weights stay as they are."""
    return _FROM_WEIGHT.fullmatch(init) is not None


def check_lora_args(r: int, alpha: float, dropout: float, init: str = "kaiming") -> None:
    """Raise ``ValueError`` naming the bad value and the fix."""
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got r={r!r}. Typical values: 4, 8, 16, 64.")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or not alpha > 0:
        raise ValueError(f"LoRA alpha must be a finite number > 0, got alpha={alpha!r}. A common choice is alpha = 2 * r.")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got dropout={dropout!r}. Use 0.0 to disable it.")
    if not isinstance(init, str) or not (init in ("kaiming", "gaussian") or from_weight(init)):
        raise ValueError(
            f"LoRA init must be 'kaiming', 'gaussian', 'pissa', 'pissa_niter_K' (K subspace iterations of a randomized SVD, "
            f"e.g. 'pissa_niter_4') or 'olora', got init={init!r}."
        )


class _LoRAFunction(torch.autograd.Function):
    """``y = x W^T + b + s * drop(x) A^T B^T`` with a hand-written backward.

    Saves ``x`` and ``xa = s * drop(x) A^T`` (N x r); never a weight-shaped gradient for a frozen ``W``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dropout: float, seed: int, fan_in_fan_out: bool):
        xd = x * _dropout_mask(x, dropout, seed) if dropout > 0 else x
        xa = (xd @ lora_a.t()).mul_(scaling)  # (..., r), scaled here: cheaper than an alpha on the big addmm
        out = base_linear(x, weight, bias, fan_in_fan_out)  # (..., out)
        # in place through a 2-D view, but return ``out`` itself: a custom Function's output that is a view cannot be
        # modified in place by the model afterwards (Falcon's ``mlp_output += attention_output``)
        out.view(-1, out.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), lora_b.t())
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
            w = dequantize(weight, g.dtype)  # saved packed when quantized, dequantized again here
            w = w.t() if ctx.fan_in_fan_out else w  # (out, in)
            grad_x = g @ w.to(g.dtype)
            if mask is None:  # accumulate in place: a separate add of an (N, in) tensor costs as much as a matmul
                grad_x.addmm_(gb, lora_a, alpha=s)
            else:
                grad_x.addcmul_(gb @ lora_a, mask, value=s)
            grad_x = grad_x.view(x.shape)
        if need_w:
            grad_w = x2.t() @ g if ctx.fan_in_fan_out else g.t() @ x2
        if need_b:
            grad_bias = g.sum(0)
        if need_a:
            xd = x2 * mask if mask is not None else x2
            grad_a = (gb.t() @ xd).mul_(s)  # (r, in)
        if need_lb:
            grad_b = g.t() @ xa.reshape(-1, xa.shape[-1])  # (out, r); xa already carries the scaling
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, None


class _LoRADeltaFunction(torch.autograd.Function):
    """``s * drop(x) A^T B^T`` alone (the update without the base): saves ``x`` and ``xa`` (N x r), no dropped copy."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scaling: float, dropout: float, seed: int):
        xd = x * _dropout_mask(x, dropout, seed) if dropout > 0 else x
        xa = (xd @ lora_a.t()).mul_(scaling)
        del xd
        ctx.save_for_backward(x, xa, lora_a, lora_b)
        ctx.dropout, ctx.seed, ctx.scaling = dropout, seed, scaling
        return xa @ lora_b.t()

    @staticmethod
    def backward(ctx, grad_out):
        x, xa, lora_a, lora_b = ctx.saved_tensors
        s, p = ctx.scaling, ctx.dropout
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_a = grad_b = None
        if need_x or need_a:
            gb = g @ lora_b  # (N, r)
            mask = _dropout_mask(x2, p, ctx.seed) if p > 0 else None
            if need_x:
                grad_x = (gb @ lora_a).mul_(s)
                grad_x = (grad_x.mul_(mask) if mask is not None else grad_x).view(x.shape)
            if need_a:
                grad_a = (gb.t() @ (x2 * mask if mask is not None else x2)).mul_(s)
        if need_b:
            grad_b = g.t() @ xa.reshape(-1, xa.shape[-1])
        return grad_x, grad_a, grad_b, None, None, None


class _RoutedLoRAFunction(torch.autograd.Function):
    """Per-sample routing in one function: ``y = x W^T + b`` for every row, plus, for the rows ``R_g`` routed to
    adapter ``g``, ``s_g drop_g(x[R_g]) A_g^T B_g^T``.

    ``drop_g`` is rows ``R_g`` of the mask adapter ``g`` would draw over the whole batch from the layer's one seed,
    so a routed step equals the steps each adapter takes alone on the same batch (and seed), dropout included.
    ``plan`` holds ``(rows, scaling, dropout)`` per group (``rows``: a slice, or an index tensor); ``factors`` are
    ``A_1, B_1, A_2, B_2, ...``, so an adapter absent from the batch is not an input and gets no gradient. Saves ``x``
    and each group's ``xa`` (rows x r); the masks are drawn again in backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, plan, seed: int, fan_in_fan_out: bool, *factors):
        out = base_linear(x, weight, bias, fan_in_fan_out)
        out_f, masks, xas = out.shape[-1], {}, []
        for g, (rows, s, p) in enumerate(plan):
            a, b = factors[2 * g], factors[2 * g + 1]
            xg = x[rows]
            if p > 0:
                if p not in masks:
                    masks[p] = _dropout_mask(x, p, seed)
                xg = xg * masks[p][rows]
            xa = (xg @ a.t()).mul_(s)
            if isinstance(rows, slice):
                out[rows].view(-1, out_f).addmm_(xa.reshape(-1, xa.shape[-1]), b.t())
            else:
                out.index_add_(0, rows, xa @ b.t())
            xas.append(xa)
        del masks
        ctx.save_for_backward(x, weight, *xas, *factors)
        ctx.plan, ctx.seed, ctx.fan_in_fan_out = plan, seed, fan_in_fan_out
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, *rest = ctx.saved_tensors
        plan, n_groups = ctx.plan, len(ctx.plan)
        xas, factors = rest[:n_groups], rest[n_groups:]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_factors = ctx.needs_input_grad[6:]
        in_f, out_f = x.shape[-1], grad_out.shape[-1]
        g2 = grad_out.reshape(-1, out_f)
        grad_x = grad_w = grad_bias = None
        if need_x:
            w = dequantize(weight, g2.dtype)
            w = w.t() if ctx.fan_in_fan_out else w
            grad_x = (g2 @ w.to(g2.dtype)).view(x.shape)
        if need_w:
            x2 = x.reshape(-1, in_f)
            grad_w = x2.t() @ g2 if ctx.fan_in_fan_out else g2.t() @ x2
        if need_b:
            grad_bias = g2.sum(0)
        grads: list[Optional[torch.Tensor]] = []
        masks: dict[float, torch.Tensor] = {}
        for g, (rows, s, p) in enumerate(plan):
            a, b = factors[2 * g], factors[2 * g + 1]
            need_a, need_lb = need_factors[2 * g], need_factors[2 * g + 1]
            gg = grad_out[rows].reshape(-1, out_f)
            grad_a = grad_b = None
            if need_x or need_a:
                if p > 0 and p not in masks:
                    masks[p] = _dropout_mask(x, p, ctx.seed)
                mask = masks[p][rows].reshape(-1, in_f) if p > 0 else None
                gb = gg @ b  # (rows, r)
                if need_x:
                    d = (gb @ a).mul_(s)
                    d = (d.mul_(mask) if mask is not None else d).view(x[rows].shape)
                    if isinstance(rows, slice):
                        grad_x[rows].add_(d)
                    else:
                        grad_x.index_add_(0, rows, d)
                if need_a:
                    xg = x[rows].reshape(-1, in_f)
                    grad_a = (gb.t() @ (xg * mask if mask is not None else xg)).mul_(s)
            if need_lb:
                grad_b = gg.t() @ xas[g].reshape(-1, xas[g].shape[-1])
            grads += [grad_a, grad_b]
        return (grad_x, grad_w, grad_bias, None, None, None, *grads)


def _draw_seed() -> int:
    """A dropout seed from the global generator (so ``seed_everything`` makes it reproducible)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def lora_linear(x, weight, bias, lora_a, lora_b, scaling: float, dropout: float = 0.0, seed: int = 0, fan_in_fan_out: bool = False):
    """Functional LoRA linear (differentiable in every tensor argument)."""
    return _LoRAFunction.apply(x, weight, bias, lora_a, lora_b, scaling, dropout, seed, fan_in_fan_out)


@dataclass(frozen=True)
class LoRASpec:
    """Settings of one named LoRA adapter on a layer."""

    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    use_dora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class LoRALinear(LinearAdapter, NamedAdapters):
    """A linear layer (``nn.Linear`` or HF ``Conv1D``) with one or several named LoRA updates.

    The base parameters stay under their own names (``weight``, ``bias``); each adapter ``name`` adds
    ``lora_a.<name>`` (r x in) and ``lora_b.<name>`` (out x r), created in the base weight's dtype and
    device. The first adapter is called ``"default"`` unless named otherwise.

    Several adapters: :meth:`add_adapter`, :meth:`delete_adapter`, and the state of the multi-adapter
    protocol (:class:`lightning_peft.core.NamedAdapters`: ``active``, ``frozen``, ``merged_adapters``,
    ``sample_adapters``), which the core functions (``set_active_adapters``, ...) set model-wide.

    Args:
        base: the layer to adapt; its parameters are shared, not copied.
        r: rank of the update.
        alpha: scale numerator: ``s = alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout probability on the adapter's input.
        use_rslora: rank-stabilized scaling ``alpha / sqrt(r)``.
        init: ``"kaiming"`` (uniform, as the reference implementation) or ``"gaussian"`` (std ``1/r``) for ``A``, ``B`` zero;
            or ``"pissa"``, ``"pissa_niter_K"``, ``"olora"``: from the base weight (see the module docstring).
        adapter_name: the name of this first adapter.
        use_dora: DoRA (:mod:`lightning_peft.methods.dora`): a trained magnitude per output row,
            ``lora_magnitude.<name>``, rescales the direction ``W + s B A``.
    """

    adapter_prefix = "lora_"
    peft_parts = ("lora_A.weight", "lora_B.weight")  # the keys of A and B in a PEFT file, after the module path

    def __init__(
        self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, use_rslora: bool = False,
        init: LoRAInit = "kaiming", adapter_name: str = "default", use_dora: bool = False,
    ) -> None:
        super().__init__(base)
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()  # DoRA adapters only
        # PiSSA/OLoRA adapters only: the initial A0, B0 (frozen), whose update is subtracted (see _initial_update)
        self.lora_init_a = nn.ParameterDict()
        self.lora_init_b = nn.ParameterDict()
        self.lora_gate = nn.ModuleDict()  # optional gates, per adapter name (none by default)
        self.specs: dict[str, LoRASpec] = {}
        self._init_named_adapters()  # active, frozen, merged_adapters, sample_adapters (core.NamedAdapters)
        self._dora_norms: dict[str, torch.Tensor] = {}  # row norms of merged DoRA adapters, for unmerge
        self.add_adapter(adapter_name, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init, use_dora=use_dora)

    # -- named adapters -----------------------------------------------------------------------------
    def add_adapter(
        self, name: str, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, use_rslora: bool = False,
        init: LoRAInit = "kaiming", active: bool = True, use_dora: bool = False,
    ) -> None:
        """Add a named adapter (``B = 0``: the output does not change); it is applied when ``active``."""
        check_lora_args(r, alpha, dropout, init)
        for flag, value in (("use_rslora", use_rslora), ("use_dora", use_dora)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be True or False, got {value!r} ({type(value).__name__}).")
        check_adapter_name(name)
        if name in self.specs:
            raise ValueError(f"This layer already has an adapter named {name!r} (adapters: {sorted(self.specs)}).")
        if use_dora and from_weight(init):
            raise ValueError(
                f"init={init!r} with use_dora=True is not supported: DoRA's magnitude is read from the base weight, which "
                "PiSSA/OLoRA split. Use one of them."
            )
        if use_dora and self.merged_adapters:
            raise ValueError(
                f"A DoRA adapter takes its magnitude from the base weight, which holds merged adapter(s) {self.merged_adapters} "
                "now: unmerge them first (unmerge_adapters(model))."
            )
        dtype, device = self.adapter_dtype, self.weight.device
        self.lora_a[name] = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_b[name] = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        if use_dora:
            self.lora_magnitude[name] = nn.Parameter(torch.ones(self.out_features, dtype=dtype, device=device))
        if from_weight(init):
            self._check_weight_readable(init, r)
            self.lora_init_a[name] = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device), requires_grad=False)
            self.lora_init_b[name] = nn.Parameter(torch.empty(self.out_features, r, dtype=dtype, device=device), requires_grad=False)
        self.specs[name] = LoRASpec(r, float(alpha), float(dropout), bool(use_rslora), init, bool(use_dora))
        self.reset_lora_parameters(name)
        if active:
            self.active.append(name)

    def delete_adapter(self, name: str) -> None:
        """Remove a named adapter (unmerge it first if it is merged)."""
        self._check_known(name)
        if name in self.merged_adapters:
            raise RuntimeError(f"Adapter {name!r} is merged into the base weights: unmerge it before deleting it.")
        del self.lora_a[name], self.lora_b[name], self.specs[name]
        for extra in (self.lora_magnitude, self.lora_init_a, self.lora_init_b):
            if name in extra:
                del extra[name]
        if name in self.lora_gate:
            del self.lora_gate[name]
        self.active = [n for n in self.active if n != name]
        self.frozen.discard(name)

    def adapter_names(self) -> list[str]:
        return list(self.specs)

    def add_gate(self, name: Optional[str] = None) -> Gate:
        """Put adapter ``name`` (the only one by default) behind a learned gate ``sigmoid(x W_g^T + b_g)`` read from
        this layer's input (UniPELT). Returns the gate (``lora_gate.<name>``)."""
        name = self._only_name() if name is None else name
        self._check_known(name)
        if name in self.merged_adapters:
            raise RuntimeError(f"Adapter {name!r} is merged into the base weight: unmerge it before gating it.")
        if name in self.lora_magnitude:
            raise ValueError(f"Adapter {name!r} is a DoRA adapter: gates (UniPELT) are for plain LoRA updates. Use use_dora=False with gate=True.")
        if name in self.lora_init_a:
            raise ValueError(
                f"Adapter {name!r} starts from the base weight (init={self.specs[name].init!r}): gates (UniPELT) are for "
                "adapters that start at zero. Use init='kaiming' with gate=True."
            )
        if name not in self.lora_gate:
            a = self.lora_a[name]
            self.lora_gate[name] = Gate(self.in_features, 1, dtype=a.dtype, device=a.device)
        return self.lora_gate[name]

    def _check_known(self, name: str) -> None:
        if name not in self.specs:
            raise KeyError(f"No adapter named {name!r} on this layer (adapters: {sorted(self.specs)}).")

    def adapter_params(self, trainable_only: bool = False) -> list[str]:
        names = [n for n in self.specs if not (trainable_only and n in self.frozen)]
        gates = [f"lora_gate.{n}.{p}" for n in names if n in self.lora_gate for p in ("weight", "bias")]
        magnitudes = [f"lora_magnitude.{n}" for n in names if n in self.lora_magnitude]
        # the initial A0, B0 of PiSSA/OLoRA adapters are saved with the adapter but never trained
        initial = [] if trainable_only else [f"lora_init_{p}.{n}" for n in names if n in self.lora_init_a for p in ("a", "b")]
        return [f"lora_a.{n}" for n in names] + [f"lora_b.{n}" for n in names] + magnitudes + gates + initial

    def _only(self) -> LoRASpec:
        if len(self.specs) != 1:
            raise AttributeError(
                f"This layer holds {len(self.specs)} adapters ({sorted(self.specs)}): read their settings from "
                "layer.specs[name]."
            )
        return next(iter(self.specs.values()))

    # single-adapter conveniences (the common case)
    r = property(lambda self: self._only().r)
    alpha = property(lambda self: self._only().alpha)
    dropout = property(lambda self: self._only().dropout)
    use_rslora = property(lambda self: self._only().use_rslora)
    init = property(lambda self: self._only().init)
    use_dora = property(lambda self: self._only().use_dora)
    scaling = property(lambda self: self._only().scaling)

    @property
    def merged(self) -> bool:  # type: ignore[override]
        return bool(self.merged_adapters)

    @merged.setter
    def merged(self, value: bool) -> None:
        if value != bool(getattr(self, "merged_adapters", [])):
            raise AttributeError("Use merge() / unmerge() to change what is merged into a LoRALinear.")

    def reset_lora_parameters(self, name: str = "default") -> None:
        a, b, spec = self.lora_a[name], self.lora_b[name], self.specs[name]
        if a.is_meta:
            return
        with torch.no_grad():
            if from_weight(spec.init):
                a0, b0 = self._from_weight(spec)
                for target, value in ((a, a0), (b, b0), (self.lora_init_a[name], a0), (self.lora_init_b[name], b0)):
                    target.copy_(value)
                return
            if spec.init == "gaussian":
                nn.init.normal_(a, std=1.0 / spec.r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            b.zero_()
            if name in self.lora_magnitude:  # m = ||W + s B A|| = ||W|| (B = 0): the output does not change
                self.lora_magnitude[name].copy_(self._dora_norm(name))

    def _check_weight_readable(self, init: str, r: int) -> None:
        if sharding_of(self) is not None:
            raise ValueError(
                f"init={init!r} starts the adapter from the whole base weight, which is sharded here: add the adapter before "
                "the model is sharded (the LoRA callback does; with FSDP2, call apply_peft before fully_shard)."
            )
        if r > min(self.in_features, self.out_features):
            raise ValueError(
                f"init={init!r} takes r={r} components of a {self.out_features}x{self.in_features} weight, which has at most "
                f"{min(self.in_features, self.out_features)}: use a smaller r (rank_pattern for this module)."
            )

    def _from_weight(self, spec: LoRASpec) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A0, B0)`` from the base weight ``W`` (out x in): PiSSA, ``s B0 A0`` = the top-r singular part of ``W``,
        ``A0 = sqrt(S_r / s) V_r^T``, ``B0 = U_r sqrt(S_r / s)`` (a randomized SVD with ``niter`` iterations for
        ``pissa_niter_K``); OLoRA, ``W = Q R``: ``A0 = R[:r]``, ``B0 = Q[:, :r]``. As Hugging Face PEFT computes them,
        in float32 (float64 for a float64 base)."""
        w = self.weight.detach() if self.weight.dtype == torch.float64 else self.dense_weight()
        w = w.t() if self.fan_in_fan_out else w
        r = spec.r
        if spec.init == "olora":
            q, rr = torch.linalg.qr(w)
            return rr[:r].contiguous(), q[:, :r].contiguous()
        if spec.init == "pissa":
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
            u, sv, vh = u[:, :r], sv[:r], vh[:r]
        else:
            u, sv, v = torch.svd_lowrank(w, q=r, niter=int(spec.init.rsplit("_", 1)[1]))
            vh = v.t()
        root = torch.sqrt(sv / spec.scaling)
        return (root[:, None] * vh).contiguous(), (u * root[None, :]).contiguous()

    def _initial_update(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``s x A0^T B0^T``: the update a PiSSA/OLoRA adapter started with, subtracted from its update (no dropout), so
        the model equals the base at step 0 and the base weights themselves stay unchanged."""
        a0, b0 = self.lora_init_a[name], self.lora_init_b[name]
        if a0.dtype != x.dtype:
            a0, b0 = a0.to(x.dtype), b0.to(x.dtype)
        return _LoRADeltaFunction.apply(x, a0, b0, self.specs[name].scaling, 0.0, 0)

    def _weight_sq_norms(self) -> torch.Tensor:
        """``||W_i||^2`` of the base weight parameter, kept while it is the same tensor at the same version: the frozen
        base does not change between steps; a load (``copy_``) bumps the version, and merges clear it."""
        weight = self.weight
        key = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
        cached = self.__dict__.get("_dora_w2")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                w = dequantize(weight, None if not is_quantized(weight) else torch.float32)
                cached = (key, weight_sq_norms_of(w.t() if self.fan_in_fan_out else w))
            self.__dict__["_dora_w2"] = cached
        return cached[1]

    def _dora_norm(self, name: str, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``||W + s B A||`` of each output row for DoRA adapter ``name`` (float32, no gradient)."""
        w = self.dense_weight() if weight is None else weight
        w = w.t() if self.fan_in_fan_out else w
        return dora_weight_norm(w, self.lora_a[name], self.lora_b[name], self.specs[name].scaling)

    def delta_weight(self, name: Optional[str] = None) -> torch.Tensor:
        """``s * B A`` of adapter ``name`` (the only one by default) in the base weight's layout, in float32."""
        if name is None:
            name = self._only_name()
        self._check_known(name)
        delta = self.lora_b[name].float() @ self.lora_a[name].float()  # (out, in)
        if name in self.lora_init_a:  # PiSSA/OLoRA: the update is s (B A - B0 A0)
            delta -= self.lora_init_b[name].float() @ self.lora_init_a[name].float()
        delta *= self.specs[name].scaling
        return delta.t() if self.fan_in_fan_out else delta

    @classmethod
    def peft_shapes(cls, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of ``A`` and ``B`` in a PEFT file for a rank-``r`` adapter on ``module`` (this layer, or the plain
        module it would wrap); the tensors here hold the same values as ``(r, in_features)`` and ``(out_features, r)``."""
        in_f, out_f = (module.in_features, module.out_features) if isinstance(module, LoRALinear) else cls._geometry(module)[:2]
        return (r, in_f), (out_f, r)

    def _only_name(self) -> str:
        self._only()
        return next(iter(self.specs))

    def _fusable(self, name: str) -> bool:
        """Whether ``base + _update(x, name)`` may be computed by one fused function (``_LoRAFunction``, or
        ``_DoRAFunction`` for DoRA; the same value, less memory traffic). A variant without one returns False."""
        return name not in self.lora_gate

    def _operands(self, x: torch.Tensor, name: str, dropout: bool) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        a, b, spec = self.lora_a[name], self.lora_b[name], self.specs[name]
        if a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        return a, b, spec.scaling, (spec.dropout if dropout and self.training else 0.0)

    def _update(self, x: torch.Tensor, name: str, dropout: bool = True) -> torch.Tensor:
        """The update adapter ``name`` adds to the base output for input ``x``: ``g(x) * s * drop(x) A^T B^T`` (the
        gate only when the adapter has one; dropout only in training and when ``dropout``). Every forward path adds
        this, or the fused equivalent of it for a plain adapter."""
        a, b, s, p = self._operands(x, name, dropout)
        if name in self.lora_magnitude:  # DoRA: (k - 1) drop(x) W^T + k s drop(x) A^T B^T, k = m / ||W + s B A||
            mask = _dropout_mask(x, p, _draw_seed()) if p > 0 else None
            out = dora_update(x, self.weight, a, b, self.lora_magnitude[name], s, mask, self.fan_in_fan_out)
        elif p > 0 and torch.compiler.is_compiling():
            # under torch.compile: plain ops (the compiler fuses them; a host-side seed would break the graph)
            out = (F.dropout(x, p, training=True) @ a.t()) @ b.t() * s
        else:
            out = _LoRADeltaFunction.apply(x, a, b, s, p, _draw_seed() if p > 0 else 0)
        if name in self.lora_init_a:
            out = out - self._initial_update(x, name)
        return out * self.lora_gate[name](x) if name in self.lora_gate else out

    def _base_plus_update(self, x: torch.Tensor, weight, bias, name: str) -> torch.Tensor:
        """``base_linear(x) + _update(x, name)`` for a fusable adapter, in one autograd function."""
        a, b, s, p = self._operands(x, name, True)
        if p > 0 and torch.compiler.is_compiling():
            return base_linear(x, weight, bias, self.fan_in_fan_out) + self._update(x, name)
        if name in self.lora_magnitude:
            m = self.lora_magnitude[name]
            return dora_linear(
                x, weight, bias, a, b, m if m.dtype == x.dtype else m.to(x.dtype), s, p, _draw_seed() if p > 0 else 0, self.fan_in_fan_out,
                self._weight_sq_norms(),
            )
        if name in self.lora_init_a and p == 0:
            # PiSSA/OLoRA without dropout: the update and the subtracted start are one rank-2r product [B | -B0] [A ; A0]
            a_blocks, b_blocks = _factors(self, name)
            a, b = torch.cat([t.to(a.dtype) for t in a_blocks]), torch.cat([t.to(b.dtype) for t in b_blocks], 1)
            return _LoRAFunction.apply(x, weight, bias, a, b, s, 0.0, 0, self.fan_in_fan_out)
        out = _LoRAFunction.apply(x, weight, bias, a, b, s, p, _draw_seed() if p > 0 else 0, self.fan_in_fan_out)
        return out - self._initial_update(x, name) if name in self.lora_init_a else out

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                return self._forward(x.to(dtype), dtype)
        return self._forward(x, None)

    def _forward(self, x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if dtype is not None:
            weight = weight if is_quantized(weight) else weight.to(dtype)  # quantized: dequantized in the function
            bias = bias.to(dtype) if bias is not None else None
        if self.sample_adapters is not None:
            return self._routed_forward(x, weight, bias)
        wanted = [] if self.disabled else [n for n in self.active if n in self.specs]
        add = [n for n in wanted if n not in self.merged_adapters]
        fused = next((n for n in add if self._fusable(n)), None)
        if fused is not None:
            out = self._base_plus_update(x, weight, bias, fused)
            add.remove(fused)
        else:
            out = self._base_out(x, weight, bias)
        for name in add:
            out = out + self._update(x, name)
        for name in self.merged_adapters:  # merged into the weight but not wanted now: take the update back out
            if name not in wanted:
                if any(n in self.lora_magnitude for n in wanted if n not in self.merged_adapters):
                    raise RuntimeError(
                        f"Adapter {name!r} is merged into the weight and switched off, while a DoRA adapter, which rescales "
                        "the whole weight, is applied: the two do not separate. Unmerge first (unmerge_adapters(model))."
                    )
                if name in self.lora_magnitude:
                    raise RuntimeError(
                        f"DoRA adapter {name!r} is merged into the weight, which it rescales: it cannot be switched off "
                        "while merged. Unmerge it first (unmerge_adapters(model))."
                    )
                out = out - self._update(x, name, dropout=False)
        return out

    def _base_out(self, x: torch.Tensor, weight, bias) -> torch.Tensor:
        """The base layer's output (a variant of another geometry overrides it: embeddings, convolutions)."""
        return base_linear(x, weight, bias, self.fan_in_fan_out)

    def _routed_forward(self, x: torch.Tensor, weight, bias) -> torch.Tensor:
        """Row ``i`` through adapter ``sample_adapters[i]`` (a :class:`~lightning_peft.core.Routing`).

        Plain adapters take one fused function (:class:`_RoutedLoRAFunction`: the base matmul once, one dropout seed
        for the layer, each adapter its rows of that mask, views when the rows are sorted by adapter). DoRA, gated,
        PiSSA/OLoRA adapters and the embedding/convolution variants add ``_update(x[rows])`` per adapter: the same
        values, with dropout drawn per adapter (right in distribution, not the masks an adapter draws alone).
        """
        routing = self.sample_adapters
        if self.merged_adapters:
            raise RuntimeError("Per-sample adapter selection needs unmerged adapters: call unmerge_adapters(model) first.")
        if x.shape[0] != len(routing):
            raise ValueError(
                f"adapter_names has {len(routing)} entries but the batch has {x.shape[0]} rows: give one adapter "
                "name (or None for the base model) per sample."
            )
        groups = [] if self.disabled else [n for n, _ in routing.groups if n is not None and n in self.specs]
        if not groups:
            return self._base_out(x, weight, bias)
        plain = type(self)._base_out is LoRALinear._base_out and all(
            self._fusable(n) and n not in self.lora_magnitude and n not in self.lora_init_a for n in groups
        )
        if plain and not torch.compiler.is_compiling():
            plan, factors = [], []
            for n in groups:
                a, b, s, p = self._operands(x, n, True)
                plan.append((routing.index(n, x.device), s, p))
                factors += [a, b]
            seed = _draw_seed() if any(p > 0 for _, _, p in plan) else 0
            return _RoutedLoRAFunction.apply(x, weight, bias, tuple(plan), seed, self.fan_in_fan_out, *factors)
        out = self._base_out(x, weight, bias)
        for n in groups:
            rows = routing.indices(n, x.device)
            out = out.index_add(0, rows, self._update(x.index_select(0, rows), n))
        return out

    # -- merge --------------------------------------------------------------------------------------
    def _unmerged(self, names: Optional[list[str]]) -> list[str]:
        """The adapters ``merge(names)`` would fold in (default: the active ones), not yet merged."""
        return [n for n in (self.active if names is None else names) if n in self.specs and n not in self.merged_adapters]

    def merge_problem(self) -> Optional[str]:
        gated = [n for n in self._unmerged(None) if n in self.lora_gate]
        if gated:
            return f"LoRA adapter(s) {gated} are gated (UniPELT): the gate depends on the input, so the update cannot be folded into the weight"
        return _non_finite_problem(
            self, [f"{part}.{n}" for n in self._unmerged(None) for part in ("lora_a", "lora_b", "lora_magnitude") if part != "lora_magnitude" or n in self.lora_magnitude]
        )

    @torch.no_grad()
    def merge(self, names: Optional[list[str]] = None) -> None:
        """Fold adapters (default: the active ones) into the base weight. Merging twice is a no-op."""
        names = self._unmerged(names)
        gated = [n for n in names if n in self.lora_gate]
        if gated:
            raise ValueError(
                f"LoRA adapter(s) {gated} are gated (UniPELT): the gate depends on the input, so the update cannot be "
                "folded into the base weight. Run the model unmerged."
            )
        dora = [n for n in names if n in self.lora_magnitude]
        if dora and (len(names) > 1 or self.merged_adapters):
            raise ValueError(
                f"DoRA adapter(s) {dora} rescale the base weight and are defined on it alone: merge a DoRA adapter only when no "
                f"other adapter of the layer is merged or merged with it (merging {names}, merged already {self.merged_adapters}). "
                "Activate the DoRA adapter alone (set_active_adapters) and merge it, or run unmerged."
            )
        for name in names:
            weight = self.dense_weight()
            if name in self.lora_magnitude:  # W' = k (W + s B A), k = m / ||W + s B A|| per output row
                norm = self._dora_norm(name, weight)
                factor = self.lora_magnitude[name].to(norm.dtype) / norm
                factor = factor.view(1, -1) if self.fan_in_fan_out else factor.view(-1, 1)
                merged = (weight.to(norm.dtype) + self.delta_weight(name).to(norm.dtype)) * factor
            else:
                merged = weight + self.delta_weight(name)
            self._check_finite(merged, f"LoRA adapter {name!r} (r={self.specs[name].r})")
            self._write_weight(merged, f"LoRA adapter {name!r}")
            if name in self.lora_magnitude:
                self._dora_norms[name] = norm
            self.__dict__.pop("_dora_w2", None)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weight (no-op when none is merged)."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_magnitude:  # W = W' / k - s B A, with the norm of the merge
                norm = self._dora_norms.pop(name).to(self.weight.device)
                factor = self.lora_magnitude[name].to(norm.dtype) / norm
                factor = factor.view(1, -1) if self.fan_in_fan_out else factor.view(-1, 1)
                self._write_weight(self.dense_weight().to(norm.dtype) / factor - self.delta_weight(name).to(norm.dtype), f"the unmerge of {name!r}")
            else:
                self._write_weight(self.dense_weight() - self.delta_weight(name), f"the unmerge of {name!r}")
            self.__dict__.pop("_dora_w2", None)

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{n}(r={s.r}, alpha={s.alpha:g}, scaling={s.scaling:.4g}, dropout={s.dropout:g}{', dora' if s.use_dora else ''}"
            f"{', init=' + s.init if from_weight(s.init) else ''}{', gated' if n in self.lora_gate else ''})"
            for n, s in self.specs.items()
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{adapters}], "
            f"active={self.active}, merged={self.merged_adapters}"
        )


def pattern_value(name: str, pattern: Optional[dict], default):
    """The value of the first key of ``pattern`` that matches ``name`` as Hugging Face PEFT matches its
    ``rank_pattern``/``alpha_pattern`` keys (a regular expression matching the end of the name at a dot), else ``default``."""
    for key, value in (pattern or {}).items():
        if re.match(_pattern_regex(key), name):
            return value
    return default


def _pattern_regex(key: str) -> str:
    """PEFT's rule for a ``rank_pattern``/``alpha_pattern`` key: a regular expression matching the end of a module
    name at a dot."""
    return rf"(.*\.)?({key})$"


def check_patterns(names: list[str], patterns: dict[str, Optional[dict]], require_match: bool = True) -> None:
    """Every ``rank_pattern`` / ``alpha_pattern`` key is a valid regular expression and (``require_match``) selects
    at least one of the adapted modules ``names`` (a typo would otherwise leave every module at the default)."""
    for arg, pattern in patterns.items():
        for key in pattern or {}:
            try:
                regex = re.compile(_pattern_regex(key))
            except re.error as err:
                raise ValueError(f"{arg} key {key!r} is not a valid regular expression: {err}.") from None
            if require_match and not any(regex.match(n) for n in names):
                shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
                raise ValueError(
                    f"{arg} key {key!r} matches none of the adapted modules (a typo?): [{shown}]. Keys are regular "
                    "expressions matched against the end of a module's name (e.g. 'v_proj' or 'layers\\.0\\.self_attn\\.q_proj')."
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
    adapter_name: str = "default",
    rank_pattern: Optional[dict[str, int]] = None,
    alpha_pattern: Optional[dict[str, float]] = None,
    gate: bool = False,
    strict: bool = True,
    use_dora: bool = False,
) -> list[str]:
    """Wrap the matching layers of ``model`` in :class:`LoRALinear`, in place; returns their names.

    With ``gate``, each new update sits behind a learned gate read from its layer's input (UniPELT; see
    :meth:`LoRALinear.add_gate`).

    Layers that are already :class:`LoRALinear` get ``adapter_name`` as an additional named adapter.
    ``rank_pattern`` / ``alpha_pattern`` override ``r`` / ``alpha`` per module (keys are regular
    expressions matched against the end of the module name, as in Hugging Face PEFT).

    All targets are validated and all new layers built before the first one is swapped in, so an
    error leaves ``model`` unchanged. Every entry of a ``target_modules`` / ``exclude_modules`` list and every
    pattern key must match a module (``strict=False`` for defaults that span model families and for configs
    written elsewhere, such as PEFT files).
    """
    check_lora_args(r, alpha, dropout, init)
    check_adapter_name(adapter_name)
    if gate and use_dora:
        raise ValueError("gate=True (UniPELT) gates plain LoRA updates; it cannot be combined with use_dora=True. Choose one.")
    if gate and from_weight(init):
        raise ValueError(f"gate=True (UniPELT) gates adapters that start at zero; it cannot be combined with init={init!r}. Choose one.")
    if use_dora and from_weight(init):
        raise ValueError(f"init={init!r} with use_dora=True is not supported: DoRA's magnitude is read from the base weight, which PiSSA/OLoRA split. Use one of them.")
    for key, value in (rank_pattern or {}).items():
        check_lora_args(value, alpha, dropout, init)
    for key, value in (alpha_pattern or {}).items():
        check_lora_args(r, value, dropout, init)
    classes = _layer_classes()
    # "all-linear" stays linear: embeddings and convolutions are adapted when named
    linear_only = isinstance(target_modules, str) and target_modules == "all-linear"
    supported = classes[-1].supported_types() if linear_only else tuple(t for c in classes for t in c.supported_types())
    names = find_targets(
        model, target_modules, exclude_modules, supported=supported, method="LoRA", extend=(LoRALinear,), each_entry=strict,
        recomputes_linear=True,
    )
    if linear_only:
        names = [n for n in names if not isinstance(model.get_submodule(n), classes[:-1])]
    check_patterns(names, {"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}, require_match=strict)
    clash = [n for n in names if isinstance(model.get_submodule(n), LoRALinear) and adapter_name in model.get_submodule(n).specs]
    if clash:
        raise ValueError(
            f"{len(clash)} target layer(s) already carry a LoRA adapter named {adapter_name!r}, e.g. {clash[0]!r}. "
            "Give the new adapter another name (adapter_name=...), or delete the old one first."
        )
    settings = {
        n: dict(r=pattern_value(n, rank_pattern, r), alpha=pattern_value(n, alpha_pattern, alpha), dropout=dropout, use_rslora=use_rslora, init=init, use_dora=use_dora)
        for n in names
    }
    new = {
        n: _layer_class(model.get_submodule(n), classes)(model.get_submodule(n), adapter_name=adapter_name, **settings[n])
        for n in names if not isinstance(model.get_submodule(n), LoRALinear)
    }
    if gate:  # before anything is swapped in: a layer that cannot be gated fails here
        not_linear = [n for n in names if n not in new and not model.get_submodule(n).wraps_linear]
        if not_linear:
            raise ValueError(f"Gates (UniPELT) are for LoRA on linear layers, not on {not_linear[0]!r} ({type(model.get_submodule(not_linear[0])).__name__}).")
        for layer in new.values():
            layer.add_gate(adapter_name)
    for name in names:
        if name in new:
            model.set_submodule(name, new[name])
        else:
            model.get_submodule(name).add_adapter(adapter_name, **settings[name])
            if gate:
                model.get_submodule(name).add_gate(adapter_name)
    return names


def _factors(layer: LoRALinear, name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The ``A`` and ``B`` blocks whose product ``[B | -B0] [A ; A0]`` is adapter ``name``'s update over ``s``."""
    if name in layer.lora_init_a:
        return [layer.lora_a[name], layer.lora_init_a[name]], [layer.lora_b[name], -layer.lora_init_b[name]]
    return [layer.lora_a[name]], [layer.lora_b[name]]


_LAYER_CLASSES: list[type[LoRALinear]] = []


def register_layer_class(cls: type[LoRALinear]) -> type[LoRALinear]:
    """Make ``inject_lora`` wrap ``cls.supported_types()`` in ``cls``, a :class:`LoRALinear` of another geometry
    (:mod:`lightning_peft.methods.lora_layers` registers embeddings and convolutions; importing
    ``lightning_peft.methods`` imports it)."""
    _LAYER_CLASSES.insert(0, cls)
    return cls


def _layer_classes() -> tuple[type[LoRALinear], ...]:
    """The LoRA layer classes, the plain linear one last."""
    return (*_LAYER_CLASSES, LoRALinear)


def _layer_class(module: nn.Module, classes: tuple[type[LoRALinear], ...]) -> type[LoRALinear]:
    return next(c for c in classes if isinstance(module, c.supported_types()))


@torch.no_grad()
def add_weighted_adapter(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: Literal["linear", "cat"] = "cat",
    heads_from: Optional[str] = None,
) -> nn.Module:
    """Add ``adapter_name``, a weighted combination of existing LoRA adapters, to every layer holding one of them.

    * ``"cat"``: ``A`` and ``B`` are concatenated (rank = the sum of ranks), so the update is exactly
      ``sum_i w_i * s_i * B_i A_i``.
    * ``"linear"``: ``A = sum_i sqrt(w_i s_i) A_i`` and ``B = sum_i sqrt(w_i s_i) B_i`` (equal ranks
      required), as Hugging Face PEFT's ``"linear"``; the product has cross terms, so it is not the
      weighted sum of the updates.

    The new adapter has scaling 1, is frozen and not active: :func:`~lightning_peft.core.set_active_adapters` it.

    Modules trained in full per adapter (a classification head each, :mod:`lightning_peft.module_copies`) do not
    combine: ``heads_from`` names the adapter whose copies the new adapter gets (required when there are any).
    """
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"Give one weight per adapter: adapters={adapters!r}, weights={weights!r}.")
    if combination_type not in ("linear", "cat"):
        raise ValueError(f"combination_type must be 'linear' or 'cat', got {combination_type!r}.")
    check_adapter_name(adapter_name)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear) and any(a in m.specs for a in adapters)]
    known = {n for m in model.modules() if isinstance(m, LoRALinear) for n in m.specs}
    missing = [a for a in adapters if a not in known]
    if missing:
        raise ValueError(f"No LoRA adapter named {missing[0]!r} in this model; its adapters are {sorted(known)}.")
    if adapter_name in known:
        raise ValueError(f"An adapter named {adapter_name!r} already exists; choose another name.")
    copies = [(n, m) for n, m in model.named_modules() if isinstance(m, ModuleCopies) and any(a in m.modules_to_save for a in adapters)]
    if copies and heads_from is None:
        raise ValueError(
            f"Adapters {adapters} have their own copies of {[n for n, _ in copies]} (e.g. a head each), which do not "
            "combine: pass heads_from=<one of them> to give the new adapter that adapter's copies."
        )
    if heads_from is not None and heads_from not in adapters:
        raise ValueError(f"heads_from={heads_from!r} must be one of the combined adapters {adapters}.")
    dora = sorted({a for m in layers for a in adapters if a in m.lora_magnitude})
    if dora:
        raise ValueError(f"add_weighted_adapter combines plain LoRA updates; {dora} are DoRA adapters, whose magnitudes do not combine linearly.")
    if combination_type == "linear":
        initial = sorted({a for m in layers for a in adapters if a in m.lora_init_a})
        if initial:
            raise ValueError(f"combination_type='linear' needs adapters that start at zero; {initial} start from the base weight (PiSSA/OLoRA): use 'cat'.")
        ranks = {m.specs[a].r for m in layers for a in adapters if a in m.specs}
        if len(ranks) != 1:
            raise ValueError(f"combination_type='linear' needs adapters of one rank, found ranks {sorted(ranks)}; use 'cat'.")
    for m in layers:
        present = [(a, w) for a, w in zip(adapters, weights) if a in m.specs]
        if combination_type == "cat":  # PiSSA/OLoRA adapters: s (B A - B0 A0) = s [B | -B0] [A ; A0]
            a_new = torch.cat([t.float() * (w * m.specs[a].scaling) for a, w in present for t in _factors(m, a)[0]], 0)
            b_new = torch.cat([t.float() for a, _ in present for t in _factors(m, a)[1]], 1)
        else:
            a_new = sum(m.lora_a[a].float() * math.copysign(math.sqrt(abs(w * m.specs[a].scaling)), w * m.specs[a].scaling) for a, w in present)
            b_new = sum(m.lora_b[a].float() * math.sqrt(abs(w * m.specs[a].scaling)) for a, w in present)
        r = a_new.shape[0]
        m.add_adapter(adapter_name, r=r, alpha=float(r), active=False)
        m.lora_a[adapter_name].copy_(a_new)
        m.lora_b[adapter_name].copy_(b_new)
        m.frozen.add(adapter_name)
        m.lora_a[adapter_name].requires_grad_(False)
        m.lora_b[adapter_name].requires_grad_(False)
    owners = model.__dict__.get(STATE_ATTR, {}).get("owners", {})  # the record, where this model holds it
    for name, m in copies:
        if heads_from in m.modules_to_save:
            m.set_adapter_frozen(adapter_name, True)
            m.add_copy(adapter_name, values=m.modules_to_save[heads_from])
            if name in owners:
                owners[name].append(adapter_name)
    return model
