"""AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang et al., ICLR 2023).

Each frozen linear map ``W`` (out x in) gains an update in SVD form::

    h = x W^T + b + s * dropout(x) (A * E)^T B^T,     A: r x in,  E: r x 1 (zero at init),  B: out x r
    s = alpha / init_r                                (fixed: pruning a triplet does not rescale the others)

Row ``i`` of ``A``, entry ``E_i`` and column ``i`` of ``B`` form a *triplet*. A :class:`RankAllocator` scores
every triplet during training and keeps the best ones under a shrinking global budget (total rank):

* per element ``I = |theta * grad|``; sensitivity ``S = EMA_beta1(I)``; uncertainty ``U = EMA_beta2(|I - S|)``;
  element score ``S * U``;
* triplet score ``score(E_i) + mean_j score(A_ij) + mean_k score(B_ki)``;
* budget: ``init_r * n`` for the first ``tinit`` steps, then cubic decrease to ``target_r * n`` at
  ``total_steps - tfinal``, fixed afterwards; every ``delta_t`` steps the lowest triplets (global threshold)
  are masked, i.e. their ``E_i`` is set to zero after the optimizer step. They keep training and can be
  chosen again at the next reallocation, as in the paper.
* the budget counts triplets (total rank, the paper's and ``peft``'s unit) or, with ``budget="params"``,
  parameters: a triplet of an ``in x out`` layer costs ``in + out + 1``, the final budget is the parameter
  count of rank ``target_r`` everywhere (LoRA ``r=target_r``'s count plus one ``E`` entry per triplet), and the
  best triplets are kept while their summed cost fits. With a triplet budget, triplets moved to wide layers
  (a 384 x 1536 feed-forward matrix) cost more parameters than LoRA's uniform rank; a parameter budget caps that.

An orthogonality penalty ``R = mean over matrices of ||A A^T - I||_F and ||B^T B - I||_F`` (the reference
implementation's and Hugging Face PEFT's form; the paper writes squared norms) keeps ``A`` and ``B`` close
to singular vectors. At the end the layers are pruned to their allocated ranks (:meth:`AdaLoRALinear.prune`).

Same forward as ``peft``'s ``SVDLinear`` (which divides by ``init_r + 1e-5``), same budget schedule as its
``RankAllocator.budget_schedule``, same masking rule given the same scores (ties aside: exactly ``budget``
triplets are kept here).
"""

from __future__ import annotations

import contextlib
import math
from contextlib import AbstractContextManager
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.core import PEFT_PREFIX, AdapterLayer
from lightning_peft.methods._linear import LinearAdapter
from lightning_peft.targeting import TargetSpec, find_targets, linear_types

__all__ = [
    "BUDGET_UNITS",
    "AdaLoRALinear",
    "RankAllocator",
    "WholeTensors",
    "budget_schedule",
    "check_adalora_args",
    "check_schedule",
    "from_peft",
    "inject_adalora",
    "orthogonal_regularization",
    "orthogonal_regularization_grads",
    "to_peft",
]

BUDGET_UNITS = ("rank", "params")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_adalora_args(
    init_r: int, target_r: int, alpha: float = 16.0, dropout: float = 0.0, beta1: float = 0.85, beta2: float = 0.85,
    orth_reg_weight: float = 0.5, tinit: int = 0, tfinal: int = 0, delta_t: int = 1, budget: str = "rank",
) -> None:
    """Raise ``ValueError`` naming the bad value and the fix (everything but the total number of steps)."""
    if not _is_int(init_r) or init_r <= 0:
        raise ValueError(f"AdaLoRA init_r must be a positive integer, got init_r={init_r!r}. The paper uses init_r = 1.5 * target_r, e.g. 12 for 8.")
    if not _is_int(target_r) or target_r <= 0:
        raise ValueError(f"AdaLoRA target_r must be a positive integer, got target_r={target_r!r}.")
    if target_r > init_r:
        raise ValueError(
            f"AdaLoRA target_r={target_r} is larger than init_r={init_r}: the budget only shrinks during training. "
            f"Set init_r >= target_r (e.g. init_r={math.ceil(1.5 * target_r)})."
        )
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"AdaLoRA alpha must be > 0, got alpha={alpha!r}. The update is scaled by alpha / init_r.")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"AdaLoRA dropout must be in [0, 1), got dropout={dropout!r}.")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not isinstance(beta, (int, float)) or not 0.0 < beta < 1.0:
            raise ValueError(f"AdaLoRA {name} is an EMA factor and must lie in (0, 1), got {name}={beta!r}. The paper uses 0.85.")
    if not isinstance(orth_reg_weight, (int, float)) or not orth_reg_weight >= 0:
        raise ValueError(f"AdaLoRA orth_reg_weight must be >= 0, got {orth_reg_weight!r}. Use 0 to switch the regularizer off.")
    for name, v in (("tinit", tinit), ("tfinal", tfinal)):
        if not _is_int(v) or v < 0:
            raise ValueError(f"AdaLoRA {name} is a number of optimizer steps and must be an integer >= 0, got {name}={v!r}.")
    if not _is_int(delta_t) or delta_t < 1:
        raise ValueError(f"AdaLoRA delta_t (steps between reallocations) must be an integer >= 1, got delta_t={delta_t!r}.")
    if budget not in BUDGET_UNITS:
        raise ValueError(f"AdaLoRA budget={budget!r}: choose 'rank' (the budget counts triplets, as the paper) or 'params' (it counts parameters).")


def check_schedule(tinit: int, tfinal: int, total_steps: int) -> None:
    """The schedule needs a budgeting phase: ``tinit < total_steps - tfinal`` (``peft``'s rule)."""
    if not _is_int(total_steps) or total_steps <= 0:
        raise ValueError(f"AdaLoRA total_steps must be a positive integer, got {total_steps!r}.")
    if tinit + tfinal >= total_steps:
        raise ValueError(
            f"AdaLoRA schedule leaves no budgeting phase: tinit={tinit} + tfinal={tfinal} >= total_steps={total_steps} "
            "(optimizer steps). Decrease tinit/tfinal or train longer; typical choices are tinit ~ 10% and tfinal ~ 20-30% "
            "of the steps."
        )


def budget_schedule(step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int, total_steps: int, delta_t: int) -> tuple[int, bool]:
    """``(budget, reallocate now)`` at optimizer step ``step`` (0-based), exactly ``peft``'s formula."""
    if step <= tinit:
        return init_budget, False
    if step > total_steps - tfinal:
        return target_budget, True
    mul = 1 - (step - tinit) / (total_steps - tfinal - tinit)
    return int((init_budget - target_budget) * mul**3 + target_budget), step % delta_t == 0


class AdaLoRALinear(LinearAdapter):
    """A linear layer (``nn.Linear`` or HF ``Conv1D``) with an SVD-form update ``s * B (A * E)``.

    Adds ``adalora_a`` (r x in, N(0, 0.02)), ``adalora_e`` (r x 1, zero) and ``adalora_b`` (out x r, N(0, 0.02)),
    in the base weight's dtype and device; the base keeps ``weight``/``bias``. ``rank_mask`` (a non-persistent
    buffer) marks the triplets the allocator keeps; :meth:`apply_mask` zeroes the others' ``E``,
    :meth:`prune` removes them physically.

    Args:
        base: the layer to adapt; its parameters are shared, not copied.
        r: initial rank (``init_r``).
        alpha: scale numerator, ``s = alpha / r``.
        dropout: dropout probability on the adapter's input.
    """

    adapter_prefix = "adalora_"

    def __init__(self, base: nn.Module, r: int = 12, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__(base)  # refuses a base that is not a linear layer
        check_adalora_args(r, 1, alpha, dropout)
        w = self.weight
        dtype = self.adapter_dtype
        self.adalora_a = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=w.device))
        self.adalora_e = nn.Parameter(torch.zeros(r, 1, dtype=dtype, device=w.device))
        self.adalora_b = nn.Parameter(torch.empty(self.out_features, r, dtype=dtype, device=w.device))
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=w.device), persistent=False)
        self.init_r, self.alpha, self.dropout = r, float(alpha), float(dropout)
        self.scaling = alpha / r
        self.kept = list(range(r))  # which of the init_r triplets are still physically here
        if not w.is_meta:
            with torch.no_grad():
                nn.init.normal_(self.adalora_a, std=0.02)
                nn.init.normal_(self.adalora_b, std=0.02)

    @property
    def r(self) -> int:
        """Rows physically present (``init_r`` until :meth:`prune`); read from the mask, whose length is also right
        while a sharding strategy partitions the parameters."""
        return self.rank_mask.numel()

    @property
    def rank(self) -> int:
        """The allocated rank: triplets kept by the mask."""
        return int(self.rank_mask.sum())

    def rank_pattern(self) -> list[bool]:
        """PEFT's ``rank_pattern`` entry: which of the ``init_r`` triplets are allocated."""
        pattern = [False] * self.init_r
        for i, keep in zip(self.kept, self.rank_mask.tolist()):
            pattern[i] = keep
        return pattern

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero ``E`` of the triplets outside the mask."""
        self.adalora_e.masked_fill_(~self.rank_mask.view(-1, 1), 0.0)

    @torch.no_grad()
    def prune(self) -> None:
        """Drop the masked triplets physically (smaller tensors; the output does not change after :meth:`apply_mask`)."""
        if self.merged:
            raise RuntimeError("Unmerge the AdaLoRA layer before pruning it.")
        idx = self.rank_mask.nonzero().view(-1)
        self.apply_mask()
        self.adalora_a = nn.Parameter(self.adalora_a[idx].clone(), requires_grad=self.adalora_a.requires_grad)
        self.adalora_e = nn.Parameter(self.adalora_e[idx].clone(), requires_grad=self.adalora_e.requires_grad)
        self.adalora_b = nn.Parameter(self.adalora_b[:, idx].clone(), requires_grad=self.adalora_b.requires_grad)
        self.kept = [self.kept[i] for i in idx.tolist()]
        self.rank_mask = torch.ones(len(self.kept), dtype=torch.bool, device=self.rank_mask.device)

    def orth_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(||A A^T - I||_F, ||B^T B - I||_F)``, differentiable."""
        return _orth_terms(self.adalora_a, self.adalora_b)

    def delta_weight(self) -> torch.Tensor:
        """``s * B (A * E)`` in the base weight's layout, in float32."""
        delta = self.adalora_b.float() @ (self.adalora_a.float() * self.adalora_e.float()) * self.scaling  # (out, in)
        return delta.t() if self.fan_in_fan_out else delta

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_forward(x)

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
        ae = self.adalora_a * self.adalora_e  # (r, in)
        dtype = x.dtype if not torch.is_autocast_enabled(x.device.type) else torch.get_autocast_dtype(x.device.type)
        return (x.to(dtype) @ ae.to(dtype).t()) @ self.adalora_b.to(dtype).t() * self.scaling  # (..., out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base(x)
        if self.disabled and self.merged:  # the base alone = merged weights minus the update
            return out - self._delta(x).to(out.dtype)
        if self.disabled or self.merged:
            return out
        return out + self._delta(x).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        merged = self.dense_weight() + self.delta_weight()
        self._check_finite(merged, f"this AdaLoRA adapter (rank {self.rank})")
        self._write_weight(merged, "the AdaLoRA merge")
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self._write_weight(self.dense_weight() - self.delta_weight(), "the AdaLoRA unmerge")
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, init_r={self.init_r}, r={self.r}, "
            f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:.4g}, dropout={self.dropout}, merged={self.merged}"
        )


def _orth_terms(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.linalg.matrix_norm(a @ a.t() - eye), torch.linalg.matrix_norm(b.t() @ b - eye)


def orthogonal_regularization(layers: list[AdaLoRALinear]) -> torch.Tensor:
    """Mean over every ``A`` and ``B`` of ``||A A^T - I||_F`` / ``||B^T B - I||_F`` (as ``peft`` adds to the loss)."""
    terms = [t for layer in layers for t in layer.orth_terms()]
    return torch.stack([t.float() for t in terms]).mean()


class WholeTensors:
    """How :class:`RankAllocator` and :func:`orthogonal_regularization_grads` read and write whole parameters and
    gradients. This one is for ordinary parameters; ``lightning_peft.distributed.ShardedTensors`` does the same for
    parameters sharded by FSDP2 or DeepSpeed (collectively: every rank makes the same calls in the same order)."""

    sharded = False

    def session(self, params: list[nn.Parameter], grads: bool = True) -> AbstractContextManager:
        """Around a batch of calls on ``params``: an implementation may gather them on entry and write back on exit."""
        return contextlib.nullcontext()

    def value(self, p: nn.Parameter) -> torch.Tensor:
        """The whole parameter, detached (here: a view, no copy)."""
        return p.detach()

    def grad(self, p: nn.Parameter) -> Optional[torch.Tensor]:
        """The whole accumulated gradient, or None."""
        return p.grad

    def add_grad(self, p: nn.Parameter, g: torch.Tensor) -> None:
        """Add the whole-tensor ``g`` to the gradient of ``p``."""
        if p.grad is None:
            p.grad = g.to(p.dtype)
        else:
            p.grad.add_(g.to(p.grad.dtype))

    @torch.no_grad()
    def write(self, p: nn.Parameter, value: torch.Tensor) -> None:
        """Set the whole parameter to ``value`` (and whatever copy the optimizer keeps of it)."""
        p.copy_(value)


def orthogonal_regularization_grads(layers: list[AdaLoRALinear], weight: float, access: Optional[WholeTensors] = None) -> torch.Tensor:
    """Add the gradient of ``weight * orthogonal_regularization(layers)`` to the ``A``/``B`` gradients (through
    ``access``, so on whole tensors also when they are sharded); returns the weighted regularizer, detached."""
    access = access or WholeTensors()
    pairs = [(m.adalora_a, m.adalora_b) for m in layers]
    leaves = [(access.value(a).requires_grad_(a.requires_grad), access.value(b).requires_grad_(b.requires_grad)) for a, b in pairs]
    with torch.enable_grad():
        reg = torch.stack([t.float() for a, b in leaves for t in _orth_terms(a, b)]).mean() * weight
        trained = [(p, leaf) for pair, leaf_pair in zip(pairs, leaves) for p, leaf in zip(pair, leaf_pair) if p.requires_grad]
        grads = torch.autograd.grad(reg, [leaf for _, leaf in trained]) if trained else []
    for (p, _), g in zip(trained, grads):
        access.add_grad(p, g)
    return reg.detach()


def inject_adalora(
    model: nn.Module, target_modules: TargetSpec, exclude_modules: Optional[TargetSpec] = None, r: int = 12,
    alpha: float = 16.0, dropout: float = 0.0,
) -> list[str]:
    """Wrap the matching layers of ``model`` in :class:`AdaLoRALinear` (initial rank ``r``), in place; returns their names.

    All targets are validated and all layers built before the first swap, so an error leaves ``model`` unchanged.
    """
    check_adalora_args(r, 1, alpha, dropout)
    modules = dict(model.named_modules())
    try:
        names = find_targets(model, target_modules, exclude_modules, supported=linear_types(), method="AdaLoRA")
    except ValueError as err:
        lora_family = sorted({type(m).__name__ for m in modules.values() if isinstance(m, AdapterLayer)})
        if lora_family and "already carry an adapter" in str(err):
            raise ValueError(
                f"AdaLoRA cannot wrap layers that already carry an adapter ({', '.join(lora_family)}): {err} AdaLoRA owns the "
                "rank of its layers (it prunes and reallocates it), so it cannot share them with LoRA or another "
                "adapter. Remove the other callback, or give the two methods disjoint target_modules/exclude_modules."
            ) from None
        raise
    new = {n: AdaLoRALinear(modules[n], r=r, alpha=alpha, dropout=dropout) for n in names}
    for name, layer in new.items():
        model.set_submodule(name, layer)
    return names


class RankAllocator:
    """Importance scores, budget schedule and masks for a set of :class:`AdaLoRALinear` layers (no Trainer needed).

    Call :meth:`update_and_allocate` once per optimizer step with the accumulated, unscaled gradients in
    ``.grad`` (before the step), and :meth:`apply_masks` after the step.

    Args:
        layers: ``{name: layer}``, all unpruned.
        target_r: final average rank; the final budget is ``target_r * len(layers)``.
        tinit, tfinal, delta_t, total_steps: the schedule, in optimizer steps (see :func:`budget_schedule`).
        beta1, beta2: EMA factors of the sensitivity and of the uncertainty.
        budget: ``"rank"``: the budget counts triplets; ``"params"``: it counts parameters (a triplet costs
            ``in + out + 1``; the final budget is ``target_r`` triplets' cost in every layer).
    """

    def __init__(
        self, layers: dict[str, AdaLoRALinear], target_r: int, tinit: int = 0, tfinal: int = 0, delta_t: int = 1,
        beta1: float = 0.85, beta2: float = 0.85, total_steps: Optional[int] = None, budget: str = "rank",
    ) -> None:
        init_r = max((m.init_r for m in layers.values()), default=target_r)
        check_adalora_args(init_r, target_r, beta1=beta1, beta2=beta2, tinit=tinit, tfinal=tfinal, delta_t=delta_t, budget=budget)
        if not layers:
            raise ValueError("RankAllocator needs at least one AdaLoRALinear layer.")
        self.layers = dict(layers)
        self.target_r, self.tinit, self.tfinal, self.delta_t, self.beta1, self.beta2 = target_r, tinit, tfinal, delta_t, beta1, beta2
        self.unit = budget
        self.costs = {n: m.in_features + m.out_features + 1 if budget == "params" else 1 for n, m in self.layers.items()}
        self.init_budget = sum(m.r * self.costs[n] for n, m in self.layers.items())
        self.target_budget = target_r * sum(self.costs.values())
        if self.target_budget > self.init_budget:
            raise ValueError(f"target budget {self.target_budget} exceeds the initial budget {self.init_budget}: some layers have init_r < target_r={target_r}.")
        self.total_steps: Optional[int] = None
        if total_steps is not None:
            self.set_total_steps(total_steps)
        self.step = -1  # last optimizer step processed
        self.finalized = False
        self.ema_ipt: dict[str, dict[str, torch.Tensor]] = {}
        self.ema_unc: dict[str, dict[str, torch.Tensor]] = {}
        self.access = WholeTensors()  # the callback sets lightning_peft.distributed.ShardedTensors on sharded models

    def set_total_steps(self, total_steps: int) -> None:
        check_schedule(self.tinit, self.tfinal, total_steps)
        self.total_steps = int(total_steps)

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        if self.total_steps is None:
            raise RuntimeError("RankAllocator.total_steps is not set: call set_total_steps(n) first.")
        return budget_schedule(step, self.init_budget, self.target_budget, self.tinit, self.tfinal, self.total_steps, self.delta_t)

    @staticmethod
    def _params(layer: AdaLoRALinear) -> dict[str, nn.Parameter]:
        return {"a": layer.adalora_a, "e": layer.adalora_e, "b": layer.adalora_b}

    @torch.no_grad()
    def update_importance(self) -> None:
        """One EMA step of sensitivity and uncertainty from ``|theta * grad|`` (a missing grad counts as zero)."""
        for name, layer in self.layers.items():
            ipt_s, unc_s = self.ema_ipt.setdefault(name, {}), self.ema_unc.setdefault(name, {})
            for key, p in self._params(layer).items():
                value, grad = self.access.value(p), self.access.grad(p)
                ipt = (value.float() * grad.float()).abs() if grad is not None else torch.zeros_like(value, dtype=torch.float32)
                s = ipt_s.get(key)
                s = torch.zeros_like(ipt) if s is None else s.to(ipt.device)
                u = unc_s.get(key)
                u = torch.zeros_like(ipt) if u is None else u.to(ipt.device)
                s = self.beta1 * s + (1 - self.beta1) * ipt
                ipt_s[key], unc_s[key] = s, self.beta2 * u + (1 - self.beta2) * (ipt - s).abs()

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """``{name: (r,) scores}``: ``score(E_i) + mean_j score(A_ij) + mean_k score(B_ki)``, score = S * U."""
        scores = {}
        for name, layer in self.layers.items():
            if name not in self.ema_ipt:
                scores[name] = torch.zeros(layer.r)
                continue
            s = {k: self.ema_ipt[name][k] * self.ema_unc[name][k] for k in ("a", "e", "b")}
            scores[name] = (s["e"].view(-1) + s["a"].mean(dim=1) + s["b"].mean(dim=0)).cpu()
        return scores

    def mask_to_budget(self, budget: int) -> dict[str, torch.Tensor]:
        """Keep the best triplets over all layers (a global threshold) whose summed cost fits ``budget``: exactly
        ``budget`` triplets with the rank unit; set the layers' masks."""
        scores = self.triplet_scores()
        flat = torch.cat([scores[n] for n in self.layers])
        costs = torch.cat([torch.full((m.r,), self.costs[n], dtype=torch.long) for n, m in self.layers.items()])
        order = torch.sort(flat, descending=True, stable=True).indices  # ties: the earlier triplet wins
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[order[torch.cumsum(costs[order], 0) <= budget]] = True
        masks, start = {}, 0
        for name, layer in self.layers.items():
            masks[name] = keep[start : start + layer.r]
            start += layer.r
            layer.rank_mask.copy_(masks[name].to(layer.rank_mask.device))
        return masks

    def update_and_allocate(self, step: int) -> bool:
        """Process optimizer step ``step`` (gradients in ``.grad``); returns whether the masks were recomputed.

        Mirrors ``peft``'s ``AdaLoraModel.update_and_allocate``: scores are updated before ``total_steps - tfinal``,
        the final allocation (target budget) happens at that step, and the masks stay fixed after it.
        """
        if self.total_steps is None:
            raise RuntimeError("RankAllocator.total_steps is not set: call set_total_steps(n) first.")
        self.step = step
        final = self.total_steps - self.tfinal
        if step < final:
            self.update_importance()
            budget, now = self.budget_schedule(step)
            if now:
                self.mask_to_budget(budget)
            return now
        if not self.finalized:
            self.finalize()
            return True
        return False

    def finalize(self) -> None:
        """Final allocation at the target budget; scores are dropped (as ``peft`` does) and the masks then stay fixed."""
        self.mask_to_budget(self.target_budget)
        self.ema_ipt, self.ema_unc = {}, {}
        self.finalized = True

    def apply_masks(self) -> None:
        """Zero ``E`` of the masked triplets (through :attr:`access`: also the optimizer's copy, on sharded models)."""
        if not self.access.sharded:
            for layer in self.layers.values():
                layer.apply_mask()
            return
        for layer in self.layers.values():
            e = layer.adalora_e
            self.access.write(e, self.access.value(e).masked_fill(~layer.rank_mask.view(-1, 1).to(e.device), 0.0))

    def ranks(self) -> dict[str, int]:
        return {n: m.rank for n, m in self.layers.items()}

    def budget(self) -> int:
        """The budget in use: kept triplets, or their parameters with ``budget="params"``."""
        return sum(m.rank * self.costs[n] for n, m in self.layers.items())

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "finalized": self.finalized,
            "total_steps": self.total_steps,
            "masks": {n: m.rank_mask.detach().cpu().clone() for n, m in self.layers.items()},
            "ema_ipt": {n: {k: v.detach().cpu().clone() for k, v in d.items()} for n, d in self.ema_ipt.items()},
            "ema_unc": {n: {k: v.detach().cpu().clone() for k, v in d.items()} for n, d in self.ema_unc.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        masks = state["masks"]
        problems = [f"missing layer {n}" for n in self.layers if n not in masks]
        problems += [f"unexpected layer {n}" for n in masks if n not in self.layers]
        problems += [f"{n}: mask of {masks[n].numel()} triplets, layer has {m.r}" for n, m in self.layers.items() if n in masks and masks[n].numel() != m.r]
        if problems:
            raise ValueError(f"The AdaLoRA allocator state does not fit these layers: {'; '.join(problems)}. Resume with the same targets and init_r.")
        for n, m in self.layers.items():
            m.rank_mask.copy_(masks[n].to(m.rank_mask.device))
        self.step, self.finalized = int(state["step"]), bool(state["finalized"])
        dev = {n: m.adalora_a.device for n, m in self.layers.items()}
        self.ema_ipt = {n: {k: v.to(dev[n]) for k, v in d.items()} for n, d in state["ema_ipt"].items()}
        self.ema_unc = {n: {k: v.to(dev[n]) for k, v in d.items()} for n, d in state["ema_unc"].items()}


# -- Hugging Face PEFT's on-disk format (peft_type "ADALORA") -----------------------------------------
def to_peft(model: nn.Module, layers: list[tuple[str, AdaLoRALinear]], adapter_name: str = "default") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config fields, tensors)`` as ``peft``'s ``save_pretrained`` writes an AdaLoRA adapter.

    Tensors are pruned to the allocated triplets (``base_model.model.<path>.lora_A`` / ``lora_E`` / ``lora_B``, no
    ``.weight``); ``rank_pattern`` maps ``<path>.lora_E`` to the ``init_r`` booleans. Paths are relative to ``model``.
    Schedule fields come from ``layer.schedule`` when the AdaLoRA callback set it, else neutral values.
    """
    if not layers:
        raise ValueError("to_peft needs at least one AdaLoRALinear layer.")
    first = layers[0][1]
    for path, m in layers:
        if (m.init_r, m.alpha, m.dropout) != (first.init_r, first.alpha, first.dropout):
            raise NotImplementedError(f"PEFT's AdaLoRA format has one init_r/alpha/dropout; {path} differs from {layers[0][0]}.")
    tensors, rank_pattern = {}, {}
    for path, m in layers:
        idx = m.rank_mask.nonzero().view(-1)
        e = m.adalora_e.detach()[idx].clone()
        e[e == 0] = 0.0  # -0.0 -> 0.0
        tensors[f"{PEFT_PREFIX}{path}.lora_A"] = m.adalora_a.detach()[idx]
        tensors[f"{PEFT_PREFIX}{path}.lora_E"] = e
        tensors[f"{PEFT_PREFIX}{path}.lora_B"] = m.adalora_b.detach()[:, idx]
        rank_pattern[f"{path}.lora_E"] = m.rank_pattern()
    schedule = {"target_r": first.init_r, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5, "total_step": 1}
    schedule.update(getattr(first, "schedule", None) or {})
    config = {
        "init_r": first.init_r,
        **schedule,
        "r": 8,  # unused by AdaLoRA; peft warns when it differs from its default
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout,
        "rank_pattern": rank_pattern,
        "target_modules": sorted(p for p, _ in layers),
        "fan_in_fan_out": first.fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True,
    }
    return config, tensors


def from_peft(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], adapter_name: str = "default") -> list[str]:
    """Inject :class:`AdaLoRALinear` layers as a ``peft`` AdaLoRA ``config`` describes, prune them to its
    ``rank_pattern`` and load ``tensors`` (modules_to_save excluded). Validates every shape before changing ``model``."""
    if config.get("peft_type", "ADALORA") != "ADALORA":
        raise ValueError(f"from_peft reads AdaLoRA adapters, got peft_type={config.get('peft_type')!r}.")
    for field, ok in (("bias", ("none", None)), ("use_dora", (False, None)), ("layers_to_transform", (None,))):
        if config.get(field) not in ok:
            raise NotImplementedError(f"This AdaLoRA adapter uses {field}={config[field]!r}, which lightning-peft does not support.")
    init_r, alpha = int(config["init_r"]), float(config["lora_alpha"])
    dropout = float(config.get("lora_dropout") or 0.0)
    targets = config["target_modules"]
    targets = targets if isinstance(targets, str) else sorted(targets)
    names = find_targets(model, targets, config.get("exclude_modules"), supported=linear_types(), method="AdaLoRA", each_entry=False)
    pattern = {k.replace(f".{adapter_name}", "").replace(".default", ""): v for k, v in (config.get("rank_pattern") or {}).items()}

    def norm(key: str) -> str:
        for suffix in (".weight", f".{adapter_name}", ".default"):
            key = key[: -len(suffix)] if key.endswith(suffix) else key
        return key

    given = {norm(k): v for k, v in tensors.items()}
    modules = dict(model.named_modules())
    expected, patterns = {}, {}
    for n in names:
        w = modules[n].weight
        in_f, out_f = (w.shape[1], w.shape[0]) if isinstance(modules[n], nn.Linear) else (w.shape[0], w.shape[1])
        keep = pattern.get(f"{n}.lora_E", [True] * init_r)
        if len(keep) != init_r:
            raise ValueError(f"rank_pattern[{n + '.lora_E'!r}] has {len(keep)} entries, expected init_r={init_r}.")
        patterns[n] = keep
        r = sum(bool(k) for k in keep)
        expected.update({f"{PEFT_PREFIX}{n}.lora_A": (r, in_f), f"{PEFT_PREFIX}{n}.lora_E": (r, 1), f"{PEFT_PREFIX}{n}.lora_B": (out_f, r)})
    problems = [f"missing {k} (expected shape {list(s)})" for k, s in expected.items() if k not in given]
    problems += [f"{k}: expected shape {list(s)}, found {list(given[k].shape)}" for k, s in expected.items() if k in given and tuple(given[k].shape) != s]
    problems += [f"unexpected tensor {k}: no such adapted module in this model" for k in sorted(set(given) - set(expected))]
    if problems:
        raise ValueError(f"the AdaLoRA tensors do not fit this model ({len(problems)} problem(s)):\n  " + "\n  ".join(problems[:20]))
    injected = inject_adalora(model, names, None, r=init_r, alpha=alpha, dropout=dropout)
    with torch.no_grad():
        for n in injected:
            layer = model.get_submodule(n)
            layer.rank_mask.copy_(torch.tensor([bool(k) for k in patterns[n]]))
            layer.prune()
            layer.adalora_a.copy_(given[f"{PEFT_PREFIX}{n}.lora_A"])
            layer.adalora_e.copy_(given[f"{PEFT_PREFIX}{n}.lora_E"])
            layer.adalora_b.copy_(given[f"{PEFT_PREFIX}{n}.lora_B"])
    return injected
