"""The adapter protocol and the free functions every layer above uses.

An adapter layer is an ``nn.Module`` that subclasses :class:`AdapterLayer`. It

* keeps the base module's own parameters under their original names (``weight``, ``bias``), so a
  checkpoint of the base model loads into the adapted model unchanged;
* names its own parameters with the method's prefix (``lora_a``, ``lora_b``, ...) and lists them in
  :meth:`AdapterLayer.adapter_params`;
* can be switched off (``disabled``) and, where the method allows it, merged into the base weights.

Everything else (training flags, checkpoints, counts) is derived from that protocol here.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "AdapterLayer",
    "adapter_names",
    "delete_adapter",
    "set_active_adapters",
    "set_adapter_trainable",
    "NamedAdapters",
    "layer_adapter_names",
    "per_sample_adapters",
    "Routing",
    "unload",
    "ParameterCounts",
    "adapter_modules",
    "adapter_param_names",
    "adapter_state_dict",
    "canonical_name",
    "check_adapter_name",
    "count_parameters",
    "disable_adapters",
    "mark_trainable",
    "peft_state",
    "sharding_of",
    "PEFT_PREFIX",
    "merge_adapters",
    "structure_snapshot",
    "unmerge_adapters",
]


class AdapterLayer(nn.Module):
    """Base class of every adapter layer (the adapter protocol).

    Subclasses set ``adapter_prefix`` (the method's name, e.g. ``"lora_"``) and implement
    :meth:`adapter_params`; mergeable methods implement :meth:`_delta_merge`.
    """

    adapter_prefix: str = ""
    mergeable: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.disabled = False
        self.merged = False

    def adapter_params(self, trainable_only: bool = False) -> list[str]:
        """Names (relative to this module) of the parameters the adapter adds.

        A parameter belongs to the adapter when a component of its name starts with ``adapter_prefix``
        (``lora_a.default``, ``ia3_scale``). Layers that hold several named adapters leave frozen ones out
        when ``trainable_only``.
        """
        prefix = self.adapter_prefix
        return [n for n, _ in self.named_parameters(recurse=True) if prefix and any(p.startswith(prefix) for p in n.split("."))]

    def merge_problem(self) -> str | None:
        """Why :meth:`merge` would fail now (None: it can merge). Checked for every layer before any is merged."""
        if not self.mergeable:
            return f"{type(self).__name__} cannot be merged into the base weights"
        return _non_finite_problem(self, self.adapter_params())

    def merge(self) -> None:
        """Fold the adapter into the base weights. Safe to call twice."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights.")

    def unmerge(self) -> None:
        """Undo :meth:`merge`. Safe to call when not merged."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights.")

    def base_layer(self) -> nn.Module:
        """A plain module equivalent to the base (used by ``unload``); the adapter is dropped."""
        raise NotImplementedError


class NamedAdapters:
    """The multi-adapter protocol: a layer that holds several named adapters of one method (LoRA's layers do).

    The state it declares (read it freely; change it through the core functions, which keep every layer of a model
    consistent: :func:`set_active_adapters`, :func:`set_adapter_trainable`, :func:`delete_adapter`,
    :func:`merge_adapters`, :func:`per_sample_adapters`):

    - ``active``: the adapters whose updates the forward applies, in order;
    - ``frozen``: adapters whose parameters never train;
    - ``merged_adapters``: adapters folded into the base weight, in the order merged;
    - ``sample_adapters``: per-sample routing (a :class:`Routing`: one name, or ``None`` for the base, per row), or
      ``None``.

    A layer implements :meth:`adapter_names`, :meth:`delete_adapter` and ``merge(names=None)`` over them.
    """

    active: list[str]
    frozen: set[str]
    merged_adapters: list[str]
    sample_adapters: Routing | None
    #: At most one of the layer's adapters may be active (copies of a module do not add up: module_copies).
    exclusive: bool = False

    def _init_named_adapters(self) -> None:
        self.active, self.frozen, self.merged_adapters, self.sample_adapters = [], set(), [], None

    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:
        raise NotImplementedError

    def set_adapter_active(self, name: str, active: bool) -> None:
        """Apply adapter ``name`` (appended after the active ones) or stop applying it."""
        if active and name not in self.active:
            self.active.append(name)
        elif not active:
            self.active = [n for n in self.active if n != name]

    def set_adapter_frozen(self, name: str, frozen: bool) -> None:
        (self.frozen.add if frozen else self.frozen.discard)(name)


ADAPTER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
"""What an adapter name may be: it is part of module and file names (``lora_a.<name>``, ``<save_dir>/<name>``)."""


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise ValueError(
            f"Adapter names must be non-empty identifiers (letters, digits, '_' or '-', no dots), got {name!r}."
        )


def layer_adapter_names(layer: AdapterLayer) -> list[str]:
    """The adapter names ``layer`` holds: its named adapters, or ``["default"]`` for a single-adapter layer."""
    return layer.adapter_names() if isinstance(layer, NamedAdapters) else ["default"]


def _non_finite_problem(layer: nn.Module, names: list[str]) -> str | None:
    bad = [n for n in names if not bool(torch.isfinite(layer.get_parameter(n)).all())]
    if bad:
        return (f"adapter parameter(s) {bad[:3]} hold NaN/inf: merging would write them into the base weight (check the "
                "training run, or reload the adapter)")
    return None


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Yield ``(qualified name, layer)`` for every adapter layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def adapter_param_names(model: nn.Module, trainable_only: bool = False) -> list[str]:
    """Qualified names of every adapter parameter in ``model`` (the parameters a method adds).

    With ``trainable_only``, the parameters of frozen named adapters (see :func:`set_adapter_trainable`) are left out.
    """
    names = []
    for mod_name, module in adapter_modules(model):
        prefix = f"{mod_name}." if mod_name else ""
        names.extend(prefix + p for p in module.adapter_params(trainable_only=trainable_only))
    return names


_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def canonical_name(name: str) -> str:
    """``name`` without the segments wrappers insert (FSDP1's ``_fsdp_wrapped_module``, activation checkpointing's
    ``_checkpoint_wrapped_module``, ``torch.compile``'s ``_orig_mod``): the name in the unwrapped model, which is how
    state dicts, checkpoints and adapter files spell it."""
    if not any(seg in name for seg in _WRAPPER_SEGMENTS):
        return name
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def sharding_of(module: nn.Module) -> str | None:
    """How ``module``'s parameters are split across processes: ``"dtensor"`` (FSDP2 ``fully_shard``, tensor
    parallel), ``"deepspeed"`` (ZeRO-3 partitions), ``"fsdp1"`` (``FullyShardedDataParallel`` flat parameters), or
    None (every rank holds whole tensors: one process, DDP, ZeRO-1/2). Reads types only: imports nothing."""
    for m in module.modules():
        if type(m).__name__ == "FullyShardedDataParallel" and type(m).__module__.startswith("torch.distributed.fsdp"):
            return "fsdp1"
    for p in module.parameters():
        if type(p).__name__ == "DTensor" and type(p).__module__.startswith("torch.distributed"):
            return "dtensor"
        if hasattr(p, "ds_id"):  # DeepSpeed marks the parameters it partitions (ZeRO-3)
            return "deepspeed"
    return None


PEFT_PREFIX = "base_model.model."
"""How Hugging Face PEFT's adapter files spell a module path: its ``PeftModel`` wraps the model twice."""

STATE_ATTR = "_lightning_peft"
"""The attribute of a model's ``__dict__`` that holds its lightning-peft record (see :func:`peft_state`)."""


def peft_state(module: nn.Module) -> dict[str, Any]:
    """The record of what was injected into ``module``: ``{"methods": [each method's settings], "trainable": [qualified
    names of base parameters trained in full]}``. Created empty on first use; it lives in the module's ``__dict__``
    (not a submodule or buffer), so it is never part of a ``state_dict``."""
    state = module.__dict__.get(STATE_ATTR)
    if state is None:
        state = {"methods": [], "trainable": []}
        module.__dict__[STATE_ATTR] = state
    return state


def mark_trainable(model: nn.Module, extra: list[str] | tuple[str, ...] = ()) -> None:
    """Freeze everything except the (non-frozen) adapter parameters and the qualified parameter names in ``extra``.

    The flags are recomputed from scratch each time, so a frozen named adapter never becomes trainable again
    as a side effect of adding or loading another one.
    """
    trainable = set(adapter_param_names(model, trainable_only=True)) | set(extra)
    # a parameter shared under several names (a tied output head) trains if any of its names is listed
    flags: dict[int, tuple[nn.Parameter, bool]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        flags[id(param)] = (param, flags.get(id(param), (param, False))[1] or name in trainable)
    for param, flag in flags.values():
        param.requires_grad_(flag)


def adapter_state_dict(model: nn.Module, extra: list[str] | tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The subset of ``model.state_dict()`` an adapter file or checkpoint needs.

    Args:
        model: a model carrying adapters.
        extra: qualified names of base parameters that are trained too (``trainable_modules``).
    """
    keep = set(adapter_param_names(model)) | set(extra)
    return {k: v for k, v in model.state_dict().items() if k in keep}


@dataclass(frozen=True)
class ParameterCounts:
    """Typed parameter counts: never one number that mixes them.

    Attributes:
        trainable: parameters with ``requires_grad`` (adapter parameters plus base parameters trained too).
        added: parameters the adapters add to the model.
        changed: base parameters that training changes (``trainable_modules``, biases for BitFit, ...).
        adapter_bytes: bytes of the tensors an adapter file stores (added + changed, in their dtypes).
        base_total: parameters of the base model (everything that is not added).
    """

    trainable: int
    added: int
    changed: int
    adapter_bytes: int
    base_total: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / max(self.base_total, 1)

    def __str__(self) -> str:
        return (
            f"trainable {self.trainable:,} ({self.trainable_percent:.3f}% of base) | added {self.added:,} | "
            f"changed in base {self.changed:,} | adapter file {self.adapter_bytes / 1024:,.1f} KiB | "
            f"base {self.base_total:,}"
        )


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Count parameters by type (see :class:`ParameterCounts`). Shared parameters are counted once."""
    added_names = set(adapter_param_names(model))
    seen: set[int] = set()
    trainable = added = changed = nbytes = base = 0
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = param.numel()
        if name in added_names:
            added += n
        else:
            base += n
            if param.requires_grad:
                changed += n
        if param.requires_grad:
            trainable += n
        if name in added_names or param.requires_grad:
            nbytes += n * param.element_size()
    return ParameterCounts(trainable, added, changed, nbytes, base)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone: every adapter layer in ``model`` is switched off inside the block.

    Example::

        with disable_adapters(model):
            base_logits = model(x)
    """
    layers = [m for _, m in adapter_modules(model)]
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, state in zip(layers, before):
            m.disabled = state


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weights (idempotent). Returns ``model``.

    All or nothing: every layer is checked first (:meth:`AdapterLayer.merge_problem`), and if one layer's merge
    still fails (e.g. non-finite adapter values), the layers merged by this call are unmerged again, so the model
    is never left half-merged.
    """
    layers = list(adapter_modules(model))
    problems = _merge_problems(layers, model)
    if problems:
        listed = "\n  ".join(sorted({f"{name}: {problem}" for name, _, problem in problems})[:10])
        kind = NotImplementedError if any(not m.mergeable for _, m in layers) else ValueError  # a method vs its values
        raise kind(
            f"merge_adapters: nothing was merged, {len(problems)} adapter layer(s) cannot be:\n  {listed}\n"
            "Run the model unmerged, or unload(model) the adapters that cannot merge before merging the others."
        )
    _merge_all(layers)
    return model


def _merge_problems(layers: list[tuple[str, AdapterLayer]], model: nn.Module) -> list[tuple[str, AdapterLayer, str]]:
    """``(name, layer, why)`` for every layer that cannot merge now (:meth:`AdapterLayer.merge_problem`, or a base
    weight that other modules share: tied input and output embeddings)."""
    problems = [(name or type(m).__name__, m, problem) for name, m in layers if (problem := m.merge_problem())]
    holders: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(pname)
    for name, m in layers:
        weight = getattr(m, "weight", None)
        # something left to fold into the weight: an active adapter not merged yet (one unnamed adapter: not merged)
        pending = any(a not in m.merged_adapters for a in m.active) if isinstance(m, NamedAdapters) else not m.merged
        others = [h for h in holders.get(id(weight), []) if h.rpartition(".")[0] != name] if isinstance(weight, nn.Parameter) else []
        if m.mergeable and pending and others and not any(n == name for n, _, _ in problems):
            problems.append((name, m, f"its base weight is shared with {others[:3]} (tied weights): merging would change those modules too"))
    return problems


def _merge_all(layers: list[tuple[str, AdapterLayer]]) -> None:
    """Merge every layer (each was checked); if one still fails (an update that overflows), the layers merged here are
    put back as they were and the error propagates."""

    def merged_names(m: AdapterLayer) -> list[str]:
        return list(m.merged_adapters) if isinstance(m, NamedAdapters) else []

    before = [(m, merged_names(m), m.merged) for _, m in layers]
    try:
        for _, m in layers:
            m.merge()
    except BaseException:
        for m, names, was_merged in before:  # back to what each layer held before this call
            if m.merged and (merged_names(m) != names or not was_merged):
                m.unmerge()
                if names:
                    m.merge(names)
        raise


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapters` (idempotent). Returns ``model``."""
    for _, m in adapter_modules(model):
        m.unmerge()
    return model


# -- several named adapters on one base ------------------------------------------------------------
def _named_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """Adapter layers that hold named adapters (the :class:`NamedAdapters` protocol)."""
    layers = list(adapter_modules(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} carries no adapter layers: inject or load an adapter first.")
    named = [(n, m) for n, m in layers if isinstance(m, NamedAdapters)]
    other = sorted({type(m).__name__ for _, m in layers if not isinstance(m, NamedAdapters)})
    if other:
        raise NotImplementedError(
            f"Named adapters are implemented for LoRA layers, soft prompts (prompt tuning, P-tuning, prefix tuning) and modules trained per adapter; this model also carries {other}, which hold a single "
            "adapter each. Keep one model per adapter for those methods."
        )
    return named


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters in ``model``, in the order they were added."""
    return list(dict.fromkeys(name for _, m in _named_layers(model) for name in m.adapter_names()))


def _check_names(model: nn.Module, names: list[str]) -> None:
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"No adapter named {unknown[0]!r} in {type(model).__name__}: its adapters are {known}.")


def set_active_adapters(model: nn.Module, names: str | list[str]) -> nn.Module:
    """Apply exactly the adapters ``names`` (one name, or several whose updates add up). Returns ``model``.

    Example::

        set_active_adapters(model, "sst2")        # switch
        set_active_adapters(model, ["a", "b"])    # both updates at once
    """
    names = [names] if isinstance(names, str) else list(names)
    _check_names(model, names)
    layers = _named_layers(model)
    for qual, m in layers:
        held = [n for n in names if n in m.adapter_names()]
        if m.exclusive and len(held) > 1:
            raise ValueError(
                f"Adapters {held} each have their own copy of {qual or type(m).__name__} (e.g. a classification head), "
                "and copies do not add up: activate one of them. Nothing was changed."
            )
    for _, m in layers:
        for n in m.adapter_names():
            m.set_adapter_active(n, False)
        for n in names:
            if n in m.adapter_names():
                m.set_adapter_active(n, True)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove the adapter ``name`` from every layer of ``model`` (layers left without adapters are unwrapped).

    A module the adapter alone trained in full (``trainable_modules``, trained in place while no other adapter declares
    it) stops training and is no longer saved with adapters; it keeps the values training gave it (no copy of its
    original values was kept).
    """
    _check_names(model, [name])
    layers = _named_layers(model)
    for _, m in layers:
        if name in m.merged_adapters:
            raise RuntimeError(f"Adapter {name!r} is merged into the base weights: call unmerge_adapters(model) first.")
    for qual, m in layers:
        if name in m.adapter_names():
            m.delete_adapter(name)
            parent, _, attr = qual.rpartition(".")
            # unwrapped, unless the layer took itself out (a soft prompt: no placeholder is left where it was)
            if not m.adapter_names() and model.get_submodule(parent)._modules.get(attr) is m:
                model.set_submodule(qual, m.base_layer())
    state = peft_state(model)
    owners = state.get("owners", {})
    for module_name in list(owners):  # modules trained per adapter (module_copies): the adapter no longer owns its copy
        owners[module_name] = [n for n in owners[module_name] if n != name]
        if owners[module_name]:
            continue
        del owners[module_name]
        module = model.get_submodule(module_name)
        if not isinstance(module, AdapterLayer):  # trained in place for this adapter alone: it stops training
            own = {f"{module_name}.{p}": p_ for p, p_ in module.named_parameters()}
            trained = [t for t in state.get("trainable", []) if t in own]
            state["trainable"] = [t for t in state.get("trainable", []) if t not in own]
            for name in trained:  # its own parameters only: an adapter another adapter put inside it trains on
                own[name].requires_grad_(False)
    return model


def set_adapter_trainable(model: nn.Module, name: str, trainable: bool = True, extra: list[str] | tuple[str, ...] = ()) -> nn.Module:
    """Mark the adapter ``name`` trainable or frozen, then recompute every ``requires_grad`` flag of ``model``.

    ``extra`` are qualified names of base parameters that train too (``trainable_modules``).
    """
    _check_names(model, [name])
    for _, m in _named_layers(model):
        if name in m.adapter_names():
            m.set_adapter_frozen(name, not trainable)
    mark_trainable(model, extra)
    return model


class Routing(tuple):
    """Which adapter each row of a batch goes through: a tuple of names (``None``: the base model), one per row,
    plus the row groups, computed once per batch (not once per layer).

    ``groups`` is ``((name, rows), ...)`` in order of first appearance, where ``rows`` is a ``slice`` when the name's
    rows are contiguous (a batch sorted by adapter: every layer then works on views, no copies) and a list of row
    indices otherwise. :meth:`index` gives the rows as something a tensor can be indexed with on a device,
    :meth:`indices` always as an index tensor.
    """

    groups: tuple[tuple[str | None, slice | list[int]], ...]

    def __new__(cls, names) -> "Routing":
        self = super().__new__(cls, names)
        rows: dict[str | None, list[int]] = {}
        for i, n in enumerate(self):
            rows.setdefault(n, []).append(i)
        self.groups = tuple(
            (n, slice(r[0], r[-1] + 1) if r[-1] - r[0] + 1 == len(r) else r) for n, r in rows.items()
        )
        self._rows = rows
        self._index_cache: dict[tuple[str | None, torch.device], torch.Tensor] = {}
        return self

    @property
    def contiguous(self) -> bool:
        """Whether every adapter's rows are one slice (a batch sorted by adapter)."""
        return all(isinstance(r, slice) for _, r in self.groups)

    def index(self, name: str | None, device: torch.device) -> slice | torch.Tensor:
        """The rows of ``name``: a slice when they are contiguous, else an index tensor on ``device``."""
        rows = self._rows[name]
        return slice(rows[0], rows[-1] + 1) if rows[-1] - rows[0] + 1 == len(rows) else self.indices(name, device)

    def indices(self, name: str | None, device: torch.device) -> torch.Tensor:
        """The rows of ``name`` as an index tensor on ``device`` (built once per device)."""
        key = (name, torch.device(device))
        if key not in self._index_cache:
            self._index_cache[key] = torch.tensor(self._rows[name], dtype=torch.long, device=device)
        return self._index_cache[key]


@contextlib.contextmanager
def per_sample_adapters(model: nn.Module, names: list[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row ``i`` of each batch goes through adapter ``names[i]`` (``None``: the base model).

    In evaluation the result equals running each sample alone with its adapter active. In training each row trains
    its own adapter only: a step over a mixed batch equals the sum of the steps each adapter would take over its
    rows of the same batch (same seed: a LoRA layer draws one dropout mask for the whole batch and each adapter uses
    its rows of it, as it would alone, provided the adapters cover the same layers). Adapters must not be merged.
    Sort the rows by adapter (``MultiTaskData`` does) and every layer works on slices, without copies. With activation
    checkpointing, call ``backward`` inside the block too: the forward runs again during backward
    (``MultiTaskClassifier`` does this for you).

    Example::

        with per_sample_adapters(model, ["sst2", "cola", None]):
            logits = model(**batch_of_three)
    """
    if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
        raise TypeError(f"per_sample_adapters: names must be a list with one adapter name (or None) per row, got {names!r}.")
    routing = Routing(names)
    bad = [n for n in routing if n is not None and not isinstance(n, str)]
    if bad:
        raise TypeError(f"per_sample_adapters: each name must be a string or None, got {bad[0]!r}.")
    _check_names(model, [n for n, _ in routing.groups if n is not None])
    layers = [m for _, m in _named_layers(model)]
    for m in layers:
        m.sample_adapters = routing
    try:
        yield model
    finally:
        for m in layers:
            m.sample_adapters = None


def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Replace every adapter layer by its plain base layer (``type(layer) is nn.Linear`` again). Returns ``model``.

    With ``merge=True`` the active mergeable adapters are folded into the base weights first (a merged,
    adapter-free model for serving); otherwise merged adapters are taken out first and the base comes back
    as it was. The module's lightning-peft record is cleared.
    """
    layers = list(adapter_modules(model))
    if merge:
        # the same check as merge_adapters, for every layer before any changes (a gated LoRA layer is of a mergeable
        # type, but cannot merge)
        problems = _merge_problems(layers, model)
        if problems:
            cannot = sorted({type(m).__name__ for _, m, _ in problems})
            name, _, why = problems[0]
            raise ValueError(
                f"unload(merge=True): {cannot} cannot be merged into the base weights ({len(problems)} layer(s), e.g. "
                f"{name}: {why}); nothing was changed. Use unload(merge=False)."
            )
        _merge_all(layers)  # all or nothing: a merge that fails (an overflowing update) leaves every layer as it was
    for name, m in layers:
        if not merge and m.merged:
            m.unmerge()
        if name:
            model.set_submodule(name, m.base_layer())
    model.__dict__.pop(STATE_ATTR, None)
    for p in model.parameters():
        if p.is_floating_point():  # a quantized base weight (int8/uint8 codes) cannot require grad
            p.requires_grad_(True)
    return model


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_INSTANCE_ATTRS = ("strict_loading", "_strict_loading", "on_save_checkpoint", "on_load_checkpoint", "configure_model")


class StructureSnapshot:
    """What injection can change in ``model``, recorded so that :meth:`restore` undoes it exactly: the module tree
    (the same module objects), parameters and buffers (the same tensor objects; values are not copied), forward and
    state-dict hooks, ``requires_grad`` flags, the lightning-peft record, and the instance attributes the Lightning
    glue sets (``strict_loading``, wrapped checkpoint hooks, a wrapped ``configure_model``)."""

    _MISSING = object()

    def __init__(self, model: nn.Module) -> None:
        import copy

        self.model = model
        self.saved = [
            (m, dict(m._modules), dict(m._parameters), dict(m._buffers), [dict(getattr(m, h, {})) for h in _HOOK_DICTS])
            for m in model.modules()
        ]
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        record = model.__dict__.get(STATE_ATTR, self._MISSING)
        self.record = record if record is self._MISSING else copy.deepcopy(record)
        self.attrs = {a: model.__dict__.get(a, self._MISSING) for a in _INSTANCE_ATTRS}

    def restore(self) -> None:
        for m, modules, params, buffers, hooks in self.saved:
            for attr, value in (("_modules", modules), ("_parameters", params), ("_buffers", buffers), *zip(_HOOK_DICTS, hooks)):
                current = getattr(m, attr, None)
                if current is not None:
                    current.clear()
                    current.update(value)
        for p, flag in self.flags:
            p.requires_grad_(flag)
        for attr, value in ((STATE_ATTR, self.record), *self.attrs.items()):
            if value is self._MISSING:
                self.model.__dict__.pop(attr, None)
            else:
                self.model.__dict__[attr] = value


@contextlib.contextmanager
def structure_snapshot(model: nn.Module) -> Iterator[nn.Module]:
    """All or nothing: if the block raises, ``model`` gets back what injection can change (see
    :class:`StructureSnapshot`: its module tree, the same parameter objects, hooks, ``requires_grad`` flags and its
    lightning-peft record), then the error propagates.

    Injection only adds modules, hooks and flags and swaps submodules, so this undoes it exactly::

        with structure_snapshot(model):
            inject(model)
            check(model)      # raises: model is as it was before inject
    """
    snapshot = StructureSnapshot(model)
    try:
        yield model
    except BaseException:
        snapshot.restore()
        raise
