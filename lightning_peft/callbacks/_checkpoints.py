"""Adapter-only Lightning checkpoints: what they keep, how one is checked against a model before it loads, and how a
file is read safely. Torch only; the Lightning hooks that call these live in ``base.py``, ``_strategies.py`` and
``mixin.py``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from lightning_peft.core import adapter_param_names, canonical_name, peft_state

__all__ = ["CHECKED_KEY", "adapter_checkpoint_state", "check_adapter_checkpoint", "read_checkpoint"]

#: Set on the checkpoint dict that a sharding strategy's wrapped ``load_checkpoint`` returns: its adapter was checked
#: before the strategy loaded it itself (the dict no longer holds the state dict to check). In memory only, never saved.
CHECKED_KEY = "_lightning_peft_checked"

_CKPT_KEY = "lightning_peft"


def _kept_names(module: nn.Module) -> set[str]:
    """The adapter and trained base parameter names, as state dicts spell them (without FSDP1's wrapper segments)."""
    return {canonical_name(n) for n in adapter_param_names(module)} | set(peft_state(module)["trainable"])


def _method_prefixes() -> tuple[str, ...]:
    from lightning_peft.core import AdapterLayer

    def walk(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from walk(sub)

    return tuple({c.adapter_prefix for c in walk(AdapterLayer) if c.adapter_prefix})


def adapter_checkpoint_state(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Strip ``checkpoint["state_dict"]`` to the adapter (and trained base parameters), in place."""
    state_dict = checkpoint.get("state_dict")
    if state_dict is None:  # e.g. DeepSpeed, which saves through its engine
        return
    keep = _kept_names(module)
    if not keep:
        return  # no adapter (a PEFTMixin module trained in full): the checkpoint keeps every weight
    checkpoint["state_dict"] = type(state_dict)((k, v) for k, v in state_dict.items() if k in keep)
    checkpoint[_CKPT_KEY] = {
        "format_version": 1,
        "methods": list(peft_state(module)["methods"]),
        "trainable": list(peft_state(module)["trainable"]),
        "owners": {k: list(v) for k, v in peft_state(module).get("owners", {}).items()},
        "shapes": {k: list(v.shape) for k, v in checkpoint["state_dict"].items()},
    }


def _record_key(record: dict[str, Any]) -> tuple[Any, Any]:
    return record.get("method"), record.get("adapter_name", "default")


def _record_label(record: dict[str, Any]) -> str:
    name = record.get("adapter_name", "default")
    return f"{record.get('method')}" + (f" (adapter {name!r})" if name != "default" else "")


def check_adapter_checkpoint(module: nn.Module, checkpoint: dict[str, Any], values: bool = True, shapes: bool = True) -> None:
    """Raise one ``ValueError`` naming every adapter key, shape or setting of ``checkpoint`` that does not fit ``module``.

    ``values=False`` skips the check for NaN/inf (for a view of a distributed checkpoint's metadata, which holds no
    values); ``shapes=False`` the shape check (FSDP1 holds its parameters as flattened shards: the model cannot tell
    their shapes, and FSDP's own load refuses a mismatch). A checkpoint that a sharding strategy's ``load_checkpoint`` already checked before loading it itself
    (marked with ``_strategies.CHECKED_KEY``) is not checked again: it no longer holds its state dict."""
    if checkpoint.get(CHECKED_KEY):
        return
    state_dict = checkpoint.get("state_dict", {})
    params = {canonical_name(n): p for n, p in module.named_parameters()}
    # the logical shape: a ZeRO-3 partitioned parameter holds an empty placeholder and its shape as ds_shape
    expected = {k: tuple(getattr(params[k], "ds_shape", None) or params[k].shape) for k in _kept_names(module) if k in params}
    prefixes = _method_prefixes()

    def looks_like_adapter(key: str) -> bool:
        return any(part.startswith(prefixes) for part in key.split(".")) if prefixes else False

    problems = []
    for key in sorted(expected):
        if key not in state_dict:
            problems.append(f"missing {key} (expected shape {list(expected[key])})")
        elif shapes and tuple(state_dict[key].shape) != expected[key]:
            problems.append(f"{key}: checkpoint shape {list(state_dict[key].shape)}, model shape {list(expected[key])}")
        elif values and state_dict[key].is_floating_point() and not bool(torch.isfinite(state_dict[key]).all()):
            problems.append(f"{key}: holds NaN or infinite values (training diverged before this checkpoint, or it is corrupted)")
    for key in sorted(k for k in state_dict if k not in expected and looks_like_adapter(k)):
        problems.append(f"unexpected {key} (shape {list(state_dict[key].shape)}): this model has no such adapter parameter")
    saved = checkpoint.get(_CKPT_KEY, {}).get("methods")
    current = peft_state(module)["methods"]
    if saved is not None and saved != current:
        # one record per method and adapter name: several named LoRA adapters are several records
        saved_by = {_record_key(m): m for m in saved}
        for cur in current:
            old = saved_by.get(_record_key(cur))
            if old is None:
                problems.append(f"method {_record_label(cur)}: not in the checkpoint (it has {[_record_label(m) for m in saved]})")
                continue
            for k in sorted(set(cur) | set(old)):
                if cur.get(k) != old.get(k):
                    problems.append(f"{_record_label(cur)} setting {k}: checkpoint {old.get(k)!r}, now {cur.get(k)!r}")
    if problems:
        listed = "\n  ".join(problems)
        unrecorded = ""
        if any(p.startswith("unexpected ") for p in problems):
            unrecorded = (
                " Adapter parameters the model lacks may belong to an adapter loaded from a PEFT directory whose method "
                "the checkpoint cannot re-create (AdaLoRA, P-tuning, prefix tuning): load that directory into the model "
                "first (load_adapter), then the checkpoint."
            )
        raise ValueError(
            f"The checkpoint does not match this model's adapters ({len(problems)} problem(s)):\n  {listed}\n"
            f"Resume with the same PEFT settings the checkpoint was made with, or start a new run without ckpt_path.{unrecorded}"
        )


def read_checkpoint(path: Union[str, Path], allow_types: Sequence[Any] = ()) -> dict[str, Any]:
    """Read a Lightning checkpoint file safely: ``torch.load(weights_only=True)``, which unpickles tensors and plain
    containers only, so a file cannot run code.

    Args:
        path: the ``.ckpt`` file.
        allow_types: further classes or functions the file may hold (e.g. a custom hyperparameter type of your
            LightningModule), allowed for this call only (``torch.serialization.safe_globals``). Only allow types
            from files you trust.

    Raises:
        FileNotFoundError: no such file (or a directory).
        ValueError: the file needs a type that is not allowed (named in the message, with the opt-in), or it is
            empty, truncated or not a checkpoint.
    """
    import pickle

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist{' (it is a directory)' if path.is_dir() else ''}.")
    if path.stat().st_size == 0:
        raise ValueError(f"Checkpoint {path} is empty (0 bytes): the write that made it did not finish. Use another checkpoint.")
    try:
        with torch.serialization.safe_globals(list(allow_types)):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err)
        if "weights_only" in detail or "global" in detail.lower():
            found = [line.strip() for line in detail.splitlines() if "global" in line.lower()][:1]
            raise ValueError(
                f"Checkpoint {path} holds a type that plain tensors and containers do not cover "
                f"({found[0] if found else detail.splitlines()[0]}); it was not loaded, because unpickling arbitrary "
                "types can run code. If you trust the file, allow that type: "
                "load_adapter_checkpoint(module, path, allow_types=[TheType])."
            ) from None
        raise ValueError(f"Checkpoint {path} is not a readable checkpoint (truncated or corrupted?): {err}") from None
    except (EOFError, RuntimeError, OSError, ValueError) as err:
        raise ValueError(f"Checkpoint {path} is not a readable checkpoint (truncated or corrupted?): {type(err).__name__}: {err}") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"Checkpoint {path} holds a {type(checkpoint).__name__}, not a Lightning checkpoint (a dict).")
    return checkpoint


def deepspeed_model_states(path: Path) -> Union[Path, None]:
    """Rank 0's model-states file of a DeepSpeed checkpoint directory (``<tag>/mp_rank_00_model_states.pt``, or
    ZeRO-3's ``<tag>/zero_pp_rank_0_mp_rank_00_model_states.pt``), None when ``path`` holds none."""
    states = sorted(Path(path).glob("*/*model_states.pt"))
    rank0 = [f for f in states if f.name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")]
    return (rank0 or states or [None])[0]


def read_checkpoint_directory(path: Union[str, Path], allow_types: Sequence[Any] = ()) -> dict[str, Any]:
    """A checkpoint that a sharding strategy wrote as a directory, read in this one process into the form of a
    one-file checkpoint (``{"state_dict": {name: tensor}, ...}``), without unpickling anything but plain types:

    - Lightning's distributed checkpoint (FSDP2's ``save_distributed_checkpoint``, FSDP1's ``state_dict_type="sharded"``):
      the model entry's tensors through ``torch.distributed.checkpoint``, the rest from its ``meta.pt``;
    - DeepSpeed ZeRO-1/2: rank 0's model-states file, which holds the adapter whole. ZeRO-3 keeps it only in the
      optimizer partitions, which DeepSpeed pickles with its own types: refused, with the ways that work.
    """
    path = Path(path).expanduser()
    if (path / "meta.pt").is_file() and (path / ".metadata").is_file():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        meta = read_checkpoint(path / "meta.pt", allow_types)
        entries = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        key = "state_dict" if any(k.startswith("state_dict.") for k in entries) else "model"  # FSDP2 / FSDP1
        tensors = {
            k[len(key) + 1:]: torch.empty(v.size, dtype=v.properties.dtype)
            for k, v in entries.items() if k.startswith(f"{key}.") and isinstance(v, TensorStorageMetadata)
        }
        dcp.load({key: tensors}, checkpoint_id=str(path), no_dist=True)
        return {**meta, "state_dict": tensors}
    states = deepspeed_model_states(path)
    if states is not None:
        checkpoint = read_checkpoint(states, allow_types)
        module = checkpoint.get("module") or {}
        if any(t.numel() == 0 for t in module.values()):
            raise ValueError(
                f"{path} is a DeepSpeed ZeRO-3 checkpoint: the adapter lives in the optimizer partitions, not in the model "
                "states. Write the adapter during training instead (save_dir= on the callback, or "
                "lightning_peft.distributed.save_sharded_adapter), or consolidate the checkpoint first with DeepSpeed's "
                "zero_to_fp32.py (beside it) and load that file."
            )
        return {**{k: v for k, v in checkpoint.items() if k != "module"}, "state_dict": dict(module)}
    raise ValueError(f"{path} is a directory but neither a Lightning distributed checkpoint nor a DeepSpeed checkpoint.")
