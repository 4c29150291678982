"""What adapters need from Lightning's sharding strategies; installed on the Trainer's strategy by the PEFT callbacks
and :class:`~lightning_peft.PEFTMixin`, so that switching the strategy is all a user does.

``ModelParallelStrategy`` (FSDP2, ``fully_shard``; tensor parallel):

- **Saving** gathers only the adapter (and trained base) parameters, never the frozen base: Lightning's own
  ``lightning_module_state_dict`` gathers the whole model on rank 0 for a single-file checkpoint, and the PEFT hook
  then drops the base.
- **Resuming** checks the checkpoint against the model before anything loads (the strategy pops
  ``checkpoint["state_dict"]`` and loads it itself, before the LightningModule's ``on_load_checkpoint`` could),
  and a sharded (distributed) checkpoint holding the adapter only loads: torch's loader otherwise requires every
  base key. The check runs first, so a checkpoint missing an adapter key still fails, naming it.

``FSDPStrategy`` (FSDP1): one-file checkpoints gather the adapter one wrapped unit at a time (the adapter shares each
unit's flat parameter with the base), not the whole model on rank 0; resume checks names (FSDP1 holds flattened
shards, so not shapes) before the strategy loads.

``DeepSpeedStrategy`` (ZeRO-1/2/3):

- **Saving** leaves the frozen base out (``exclude_frozen_parameters``): otherwise ZeRO-2 writes the whole model and
  ZeRO-3 every rank's fragments of the base.
- **Resuming** checks the checkpoint (its trainable parameter names and shapes, and the record) before DeepSpeed's
  engine loads it: the engine loads non-strictly (the base is not in the files) and would skip a missing adapter key.

Each strategy object is adapted once (instance attributes; the class is left alone).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_peft.callbacks._checkpoints import (
    CHECKED_KEY,
    _kept_names,
    check_adapter_checkpoint,
    deepspeed_model_states,
    read_checkpoint,
)
from lightning_peft.core import canonical_name, peft_state

__all__ = ["support_strategy"]

_DONE = "_lightning_peft_supported"


def support_strategy(trainer: pl.Trainer) -> None:
    """Adapt ``trainer.strategy`` for adapter-only checkpoints (no-op for strategies that need nothing)."""
    strategy = trainer.strategy
    if strategy.__dict__.get(_DONE):
        return
    from lightning.pytorch.strategies import ModelParallelStrategy

    if isinstance(strategy, ModelParallelStrategy):
        _support_model_parallel(strategy)
    elif _is_fsdp1(strategy):
        import lightning.pytorch.strategies.fsdp as pytorch_fsdp

        _support_fsdp1_saving(strategy)
        _check_before_loading(strategy, pytorch_fsdp, shapes=False, key="model")
    elif _is_deepspeed(strategy):
        _support_deepspeed(strategy)
    strategy.__dict__[_DONE] = True


def _is_fsdp1(strategy: Any) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


def _is_deepspeed(strategy: Any) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(strategy, DeepSpeedStrategy)


def _has_adapter(strategy: Any) -> bool:
    module = strategy.lightning_module
    return module is not None and bool(peft_state(module)["methods"] or peft_state(module)["trainable"])


def _support_model_parallel(strategy: Any) -> None:
    own_state_dict = strategy.lightning_module_state_dict

    def lightning_module_state_dict() -> dict[str, Any]:
        if not _has_adapter(strategy):
            return own_state_dict()
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        # a unit whose trainable parameter is read outside its own forward (a soft prompt in the root unit, read by a
        # hook of the embedding module) is left unsharded after backward: its registered parameters are then not the
        # sharded ones the optimizer holds, and the optimizer state dict that follows fails to name them
        for m in strategy.model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

        keep = _kept_names(strategy.lightning_module)
        full = not strategy._save_distributed_checkpoint
        out = {}
        for name, p in strategy.model.named_parameters():
            key = canonical_name(name)
            if key not in keep:
                continue  # the frozen base: not gathered, not saved
            if full:  # one file written by rank 0: this tensor alone is gathered (a collective: every rank runs it)
                value = p.full_tensor() if isinstance(p, DTensor) else p
                if strategy.global_rank == 0:
                    out[key] = value.detach().to("cpu", copy=True)
            else:  # a distributed checkpoint: each rank writes its own shard
                out[key] = p.detach()
        return out

    strategy.lightning_module_state_dict = lightning_module_state_dict
    import lightning.fabric.strategies.model_parallel as fabric_model_parallel

    _check_before_loading(strategy, fabric_model_parallel, key="state_dict")


def _support_fsdp1_saving(strategy: Any) -> None:
    """One-file checkpoints (``state_dict_type="full"``): gather the adapter one wrapped unit at a time instead of
    Lightning's full state dict, which collects the whole model on rank 0 before the PEFT hook drops the base."""
    own_state_dict = strategy.lightning_module_state_dict

    def lightning_module_state_dict() -> dict[str, Any]:
        if not _has_adapter(strategy) or strategy._state_dict_type != "full":
            return own_state_dict()
        from lightning_peft.distributed import gather_adapter

        module = strategy.lightning_module
        gathered = gather_adapter(module, root=strategy.model)  # collective; keyed as state dicts spell them
        return gathered if strategy.global_rank == 0 else {}

    strategy.lightning_module_state_dict = lightning_module_state_dict


def _check_before_loading(strategy: Any, loader_module: Any, key: str, shapes: bool = True) -> None:
    """Wrap ``strategy.load_checkpoint``: check the checkpoint against the model before the strategy pops its state
    dict and loads it itself (one file: its state dict; a distributed checkpoint: its metadata), then load a
    distributed one with ``allow_partial_load`` (``loader_module`` holds Lightning's ``_distributed_checkpoint_load``;
    ``key``: the entry a distributed checkpoint keeps the model under: ``state_dict`` for FSDP2, ``model`` for FSDP1)."""
    own_load = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if not _has_adapter(strategy):
            return own_load(checkpoint_path, *args, **kwargs)
        path = Path(strategy.broadcast(checkpoint_path))
        module = strategy.lightning_module
        if path.is_dir():  # a distributed checkpoint: shapes from its metadata, the record from its meta file
            check_adapter_checkpoint(module, _distributed_checkpoint_view(path, key), values=False, shapes=shapes)
            with _partial_distributed_load(loader_module):
                checkpoint = own_load(checkpoint_path, *args, **kwargs)
        else:
            check_adapter_checkpoint(module, read_checkpoint(path), shapes=shapes)
            checkpoint = own_load(checkpoint_path, *args, **kwargs)
        checkpoint[CHECKED_KEY] = True
        return checkpoint

    strategy.load_checkpoint = load_checkpoint


def _support_deepspeed(strategy: Any) -> None:
    own_load = strategy.load_checkpoint
    strategy.exclude_frozen_parameters = True  # read when it saves: the frozen base stays out of every checkpoint

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        path = Path(checkpoint_path)
        if not _has_adapter(strategy) or not path.is_dir():  # a single file: load_full_weights, Lightning's own path
            return own_load(checkpoint_path, *args, **kwargs)
        check_adapter_checkpoint(strategy.lightning_module, _deepspeed_checkpoint_view(path), values=False)
        checkpoint = own_load(checkpoint_path, *args, **kwargs)
        checkpoint[CHECKED_KEY] = True
        return checkpoint

    strategy.load_checkpoint = load_checkpoint


def _deepspeed_checkpoint_view(path: Path) -> dict[str, Any]:
    """``{"state_dict": {name: meta tensor of the saved shape}, **the client state}`` of a DeepSpeed checkpoint
    directory, from rank 0's model-states file (the trainable parameters' names and shapes; the tensors may live in
    the optimizer partitions)."""
    found = deepspeed_model_states(path)
    if found is None:
        raise ValueError(f"{path} is not a DeepSpeed checkpoint directory: no <tag>/*model_states.pt in it.")
    states = read_checkpoint(found)
    state_dict = {}
    for group in states.get("param_shapes") or []:
        for name, shape in group.items():
            state_dict[name] = torch.empty(tuple(shape), device="meta")
    client = {k: v for k, v in states.items() if k not in ("module", "optimizer", "param_shapes", "frozen_param_shapes", "frozen_param_fragments")}
    return {**client, "state_dict": state_dict}


def _distributed_checkpoint_view(path: Path, key: str) -> dict[str, Any]:
    """``{"state_dict": {name: meta tensor of the saved shape and dtype}, **the meta file}`` of a Lightning distributed
    checkpoint directory: what the adapter check needs, without reading a tensor."""
    from lightning.fabric.utilities.load import _METADATA_FILENAME
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = read_checkpoint(path / _METADATA_FILENAME)
    state_dict = {}
    for name, item in FileSystemReader(str(path)).read_metadata().state_dict_metadata.items():
        if name.startswith(f"{key}.") and isinstance(item, TensorStorageMetadata):
            state_dict[name[len(key) + 1:]] = torch.empty(item.size, dtype=item.properties.dtype, device="meta")
    return {**meta, "state_dict": state_dict}


@contextlib.contextmanager
def _partial_distributed_load(loader_module: Any) -> Iterator[None]:
    """Lightning's distributed-checkpoint load with ``allow_partial_load``: an adapter-only checkpoint has no base
    keys, which torch's default planner requires. Only around our own (already checked) load."""
    own = loader_module._distributed_checkpoint_load

    def load(module_state: dict[str, Any], path: Path) -> None:
        from torch.distributed.checkpoint import DefaultLoadPlanner, load as dcp_load

        dcp_load(module_state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))

    loader_module._distributed_checkpoint_load = load
    try:
        yield
    finally:
        loader_module._distributed_checkpoint_load = own
