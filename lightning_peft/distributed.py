"""Adapters on sharded models: FSDP2 (``fully_shard``, DTensor parameters), DeepSpeed ZeRO-3 and FSDP1.

Pure ``torch.distributed`` (DeepSpeed imported only when its parameters are found); no Lightning.

A sharded model holds on each rank a piece of every parameter (a DTensor shard, a ZeRO-3 partition) or of a flat
parameter (FSDP1). Writing the adapter needs every rank: :func:`gather_adapter` collects full copies of the adapter
(and trained base) tensors, and only those, never the frozen base; :func:`save_sharded_adapter` then writes them
on rank 0 in Hugging Face PEFT's format. Both are collective: call them on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from lightning_peft.core import adapter_param_names, canonical_name, peft_state, sharding_of
from lightning_peft.io import save_adapter
from lightning_peft.methods.adalora import WholeTensors

__all__ = ["FSDP1Tensors", "ShardedTensors", "gather_adapter", "save_sharded_adapter", "sharding_of"]


def _kept(module: nn.Module) -> list[str]:
    """The adapter and trained base parameter names of ``module``, in ``named_parameters`` order (the same on every rank)."""
    keep = set(adapter_param_names(module)) | set(peft_state(module)["trainable"])
    keep |= {n for n, _ in module.named_parameters() if canonical_name(n) in keep}
    return [n for n, _ in module.named_parameters() if n in keep]


def gather_adapter(module: nn.Module, root: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
    """Full CPU copies of ``module``'s adapter (and trained base) parameters, keyed by their names in the unwrapped
    ``module`` (as state dicts spell them: without FSDP1's wrapper segments).

    Collective when ``module`` is sharded (every rank must call it, and every rank receives the full tensors); the
    frozen base is not gathered, except under FSDP1, whose flat parameters mix it with the adapter (one unit at a time).
    On an unsharded model, plain copies. ``root``: under FSDP1, the outermost ``FullyShardedDataParallel`` (Lightning's
    ``trainer.strategy.model``), when it wraps ``module`` from outside.
    """
    return {canonical_name(k): v for k, v in _gather(module, root).items()}


def _gather(module: nn.Module, root: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
    """:func:`gather_adapter` keyed by the names in ``module`` as it is (what :func:`full_parameters` takes)."""
    names = _kept(module)
    params = dict(module.named_parameters())
    kind = sharding_of(module)
    if kind == "deepspeed":
        import deepspeed

        chosen = [params[n] for n in names]
        with deepspeed.zero.GatheredParameters(chosen, modifier_rank=None):
            return {n: params[n].detach().to("cpu", copy=True) for n in names}
    if kind == "fsdp1":
        return _gather_fsdp1_units(module, root if root is not None else module, names)
    out = {}
    for n in names:
        p = params[n]
        if kind == "dtensor" and _is_dtensor(p):
            out[n] = p.full_tensor().detach().to("cpu", copy=True)  # all-gather of this tensor only
        else:
            out[n] = p.detach().to("cpu", copy=True)
    return out


def _gather_fsdp1_units(module: nn.Module, root: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Full copies of ``module``'s parameters ``names`` under FSDP1 (``use_orig_params=True``, Lightning's default),
    one wrapped unit at a time: the adapter shares each unit's flat parameter with frozen base weights, so a unit
    holding one is gathered whole, copied from and released before the next; units without any are not gathered.
    The peak is one unit, not the model. Collective: every rank makes the same calls."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    chosen = set(names)
    wanted = {id(p): n for n, p in module.named_parameters() if n in chosen}
    out: dict[str, torch.Tensor] = {}
    for unit, own in _fsdp1_units_holding([p for p in module.parameters() if id(p) in wanted], root):
        with FSDP.summon_full_params(unit, writeback=False, recurse=False):
            for p in own:
                out[wanted[id(p)]] = p.detach().to("cpu", copy=True)
    missing = [n for n in names if n not in out]
    if missing:  # outside every unit (not sharded): plain copies
        params = dict(module.named_parameters())
        out.update({n: params[n].detach().to("cpu", copy=True) for n in missing})
    return {n: out[n] for n in names}


def _fsdp1_owners(root: nn.Module) -> dict[int, nn.Module]:
    """``{id(parameter): the innermost FSDP1 unit whose flat parameter holds it}`` under ``root``."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    owners: dict[int, nn.Module] = {}
    for unit in FSDP.fsdp_modules(root):
        nested = {id(p) for sub in FSDP.fsdp_modules(unit) if sub is not unit for p in sub.parameters()}
        for p in unit.parameters():
            if id(p) not in nested:
                owners.setdefault(id(p), unit)
    return owners


def _fsdp1_units_holding(
    params: list[nn.Parameter], root: nn.Module, owners: Optional[dict[int, nn.Module]] = None,
) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """``params`` grouped by the FSDP1 unit that holds them, units in first-seen order (the same on every rank);
    parameters outside every unit are left out."""
    owners = _fsdp1_owners(root) if owners is None else owners
    groups: dict[int, tuple[nn.Module, list[nn.Parameter]]] = {}
    for p in params:
        unit = owners.get(id(p))
        if unit is not None:
            groups.setdefault(id(unit), (unit, []))[1].append(p)
    return list(groups.values())


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@contextlib.contextmanager
def full_parameters(module: nn.Module, full: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """On this rank only (no collective): the parameters named in ``full`` temporarily replaced by plain parameters
    holding the full values, so that code written for an unsharded model (the file format) reads them. Restored
    on exit, the same objects as before."""
    swapped = []
    try:
        for name, value in full.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            old = owner._parameters[leaf]
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
            swapped.append((owner, leaf, old))
        yield module
    finally:
        for owner, leaf, old in reversed(swapped):
            owner._parameters[leaf] = old


def save_sharded_adapter(
    module: nn.Module, directory: Union[str, Path], adapter_name: Optional[str] = None, root: Optional[nn.Module] = None,
) -> Path:
    """Collective :func:`~lightning_peft.save_adapter` for a model sharded across processes: every rank gathers the
    adapter (not the frozen base; FSDP1: the whole model, whose flat parameters mix the two), rank 0 writes it. An
    error on rank 0 is raised on every rank (no rank is left waiting). Without a process group, the same as
    ``save_adapter``. ``root``: under FSDP1, the outermost ``FullyShardedDataParallel`` when it wraps ``module``."""
    if not (dist.is_available() and dist.is_initialized()):
        return save_adapter(module, directory, adapter_name)
    kind = sharding_of(module)
    error: list[Optional[str]] = [None]

    def write() -> None:
        if dist.get_rank() == 0:
            try:
                with _unsharded_view(module):
                    save_adapter(module, directory, adapter_name)
            except Exception as err:  # noqa: BLE001 - passed on to every rank below
                error[0] = f"{type(err).__name__}: {err}"

    if kind == "fsdp1":  # the whole model unsharded on every rank while rank 0 writes (base shapes are read too)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(root if root is not None else module, writeback=False, recurse=True):
            write()
    else:
        with full_parameters(module, _gather(module) if kind else {}):
            write()
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise RuntimeError(f"Writing the adapter to {directory} failed on rank 0: {error[0]}")
    return Path(directory).expanduser()


@contextlib.contextmanager
def _unsharded_view(module: nn.Module) -> Iterator[None]:
    """Lets ``save_adapter`` accept ``module`` on rank 0 once its adapter tensors are full (the base stays sharded:
    only its logical shapes are read)."""
    module.__dict__["_lightning_peft_gathered"] = True
    try:
        yield
    finally:
        module.__dict__.pop("_lightning_peft_gathered", None)


def _deepspeed_stage(p: torch.Tensor) -> int:
    """3 for a ZeRO-3 partitioned parameter, 2 for one a ZeRO-1/2 optimizer maps to its fp32 partition, else 0."""
    return 3 if hasattr(p, "ds_id") else 2 if hasattr(p, "_hp_mapping") else 0


class ShardedTensors(WholeTensors):
    """Whole parameters and gradients of adapters sharded by FSDP2 (DTensor) or DeepSpeed ZeRO-1/2/3, for code that
    works on whole tensors (AdaLoRA's allocator and orthogonal regularizer); plain parameters pass through. Every
    call on a sharded parameter is collective: make the same calls in the same order on every rank."""

    sharded = True

    def value(self, p: nn.Parameter) -> torch.Tensor:
        if _is_dtensor(p):
            return p.detach().full_tensor()
        if _deepspeed_stage(p):
            from deepspeed.utils import safe_get_full_fp32_param

            return safe_get_full_fp32_param(p).detach()  # the optimizer's fp32 copy, which the step updates
        return super().value(p)

    def grad(self, p: nn.Parameter) -> Optional[torch.Tensor]:
        if _is_dtensor(p):
            return None if p.grad is None else p.grad.full_tensor()
        if _deepspeed_stage(p):
            from deepspeed.utils import safe_get_full_grad

            return safe_get_full_grad(p)  # reduced (averaged over ranks) like FSDP's and DDP's
        return super().grad(p)

    def add_grad(self, p: nn.Parameter, g: torch.Tensor) -> None:
        if _is_dtensor(p):
            local = self._local(p, g.to(p.dtype))
            if p.grad is None:
                p.grad = local
            else:
                p.grad.add_(local)
        elif _deepspeed_stage(p):
            from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

            current = safe_get_full_grad(p)
            safe_set_full_grad(p, g if current is None else current + g.to(current.dtype))
        else:
            super().add_grad(p, g)

    @torch.no_grad()
    def write(self, p: nn.Parameter, value: torch.Tensor) -> None:
        if _is_dtensor(p):
            p.to_local().copy_(self._local(p, value).to_local())
            return
        stage = _deepspeed_stage(p)
        if stage:
            import deepspeed
            from deepspeed.utils import safe_set_full_fp32_param

            if stage == 3:  # the module's partition: gathered, set (the same value on every rank), partitioned again
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    p.data.copy_(value.view(p.shape).to(p.dtype))
            else:  # ZeRO-1/2 keep the whole parameter on every rank
                p.data.copy_(value.to(p.dtype))
            safe_set_full_fp32_param(p, value.float())  # and the optimizer's fp32 copy, else the next step restores it
            return
        super().write(p, value)

    @staticmethod
    def _local(p: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
        """``whole`` laid out like the DTensor ``p``: this rank's piece, no communication (every rank has ``whole``)."""
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(whole.detach(), p.device_mesh, p.placements, src_data_rank=None)


class FSDP1Tensors(WholeTensors):
    """:class:`ShardedTensors` for FSDP1 (``use_orig_params=True``), where a parameter is a view into its wrapped
    unit's flat shard: calls are batched in :meth:`session`, which gathers the units holding the given parameters one
    at a time (with their gradients) into copies on entry, serves the calls from the copies, and on exit writes the
    changed parameters and added gradients back, again one unit at a time. ``root``: a callable returning the
    outermost ``FullyShardedDataParallel`` (it exists only once the strategy has wrapped the model). Collective."""

    sharded = True

    def __init__(self, root) -> None:
        self._root = root
        self._units: Optional[dict[int, nn.Module]] = None
        self._values: dict[int, torch.Tensor] = {}
        self._grads: dict[int, Optional[torch.Tensor]] = {}
        self._added: dict[int, torch.Tensor] = {}
        self._written: set[int] = set()

    def _by_unit(self, params: list[nn.Parameter]) -> list[tuple[nn.Module, list[nn.Parameter]]]:
        if self._units is None:
            self._units = _fsdp1_owners(self._root())
        return _fsdp1_units_holding(params, self._root(), self._units)

    @contextlib.contextmanager
    def session(self, params: list[nn.Parameter], grads: bool = True) -> Iterator[None]:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        groups = self._by_unit(params)
        for unit, own in groups:
            with FSDP.summon_full_params(unit, recurse=False, writeback=False, with_grads=grads):
                for p in own:
                    self._values[id(p)] = p.detach().clone()
                    self._grads[id(p)] = None if p.grad is None else p.grad.detach().clone()
        try:
            yield
            for unit, own in groups:  # the same decisions on every rank: they come from the same whole tensors
                changed = [p for p in own if id(p) in self._written or id(p) in self._added]
                if not changed:
                    continue
                with_grads = any(id(p) in self._added for p in changed)
                with FSDP.summon_full_params(unit, recurse=False, writeback=True, with_grads=with_grads), torch.no_grad():
                    for p in changed:
                        if id(p) in self._written:
                            p.copy_(self._values[id(p)])
                        if id(p) in self._added:
                            p.grad.add_(self._added[id(p)].to(p.grad.dtype))
        finally:
            self._values, self._grads, self._added, self._written = {}, {}, {}, set()

    def value(self, p: nn.Parameter) -> torch.Tensor:
        return self._values[id(p)]

    def grad(self, p: nn.Parameter) -> Optional[torch.Tensor]:
        return self._grads[id(p)]

    def add_grad(self, p: nn.Parameter, g: torch.Tensor) -> None:
        if self._grads[id(p)] is None:
            raise RuntimeError("FSDP1Tensors.add_grad: the parameter has no gradient to add to.")
        self._added[id(p)] = self._added[id(p)] + g if id(p) in self._added else g.detach().clone()
        self._grads[id(p)] = self._grads[id(p)] + g.to(self._grads[id(p)].dtype)

    def write(self, p: nn.Parameter, value: torch.Tensor) -> None:
        self._values[id(p)] = value.detach().clone()
        self._written.add(id(p))
