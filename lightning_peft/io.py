"""Adapter files in Hugging Face PEFT's directory layout, both ways, loaded safely.

A directory holds ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` / ``lora_B.weight`` and, for base modules stored whole
(PEFT's ``modules_to_save``), ``base_model.model.<module path>.<param>`` (``base_model.<module path>.<param>``
for the prompt-learning methods). Paths are relative to the Hugging Face model inside a LightningModule (or to
the module itself), so ``peft.PeftModel.from_pretrained(hf_model, path)`` loads a directory written here, and
:func:`load_adapter` loads one written by ``peft``.

Stored whole, as PEFT does: the modules trained in full (``trainable_modules``) and, for a sequence or token
classifier (``task_type`` ``SEQ_CLS`` / ``TOKEN_CLS``), its head ``classifier`` / ``score``, trained or not (PEFT's
classifier models always load the head from the file). PEFT up to 0.21 took every module whose qualified name
*ends with* a ``modules_to_save`` entry (``"classifier"`` also took DistilBERT's ``pre_classifier``), with all its
parameters (RoBERTa's ``classifier.dense`` and ``classifier.out_proj``); files are written by that rule, which
both old and new PEFT load. PEFT 0.22 matches at dots (``pre_classifier`` is no ``classifier``; its ``SEQ_CLS``
models name ``pre_classifier`` instead): reading, a module matched at dots must be in the file whole, one matched
only by the old suffix rule is loaded if the file holds it (whole), and may be absent.
``task_type`` is ``CAUSAL_LM``, ``SEQ_CLS`` or ``TOKEN_CLS`` from the model class (else null: PEFT's plain
``PeftModel``), and ``base_model_name_or_path`` the path the base was loaded from, so ``peft.AutoPeftModelFor...``
can load the directory alone. The config holds PEFT's fields only (PEFT warns about others); the safetensors
header records the lightning-peft version and the base fingerprint.

Safety: only JSON and safetensors are read unless the caller passes ``allow_pickle=True`` for a
``.bin`` file; the config is validated field by field; every tensor's shape is checked against the
model before the model is changed; a file written here records a fingerprint of its base model and
loading it onto a different base is refused unless ``check_base=False``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import warnings
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lightning_peft._version import __version__
from lightning_peft.core import (
    PEFT_PREFIX,
    AdapterLayer,
    NamedAdapters,
    adapter_modules,
    adapter_param_names,
    canonical_name,
    layer_adapter_names,
    mark_trainable,
    peft_state,
    sharding_of,
)
from lightning_peft.module_copies import ModuleCopies, copy_owner as copy_owner_of, keep_per_adapter_copies, module_copy, tied_elsewhere
from lightning_peft.methods.lora import LoRALinear, _factors, _layer_class as _lora_layer_class, _layer_classes as _lora_layer_classes, from_weight, inject_lora, pattern_value
from lightning_peft.quant import weight_shape
from lightning_peft.targeting import find_targets, linear_types

__all__ = ["AdapterFileError", "base_fingerprint", "find_base_model", "load_adapter", "register_peft_format", "save_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
_FINGERPRINT_KEY = "lightning_peft_base"
_LIBRARY_KEY = "lightning_peft"  # safetensors metadata: which lightning-peft wrote the file
_DIGEST_KEY = "lightning_peft_sha256"  # safetensors metadata: digest of every tensor (names, dtypes, shapes, bytes)
_CONFIG_DIGEST_KEY = "lightning_peft_config_sha256"  # safetensors metadata: digest of the adapter_config.json written with it
#: PEFT's sequence and token classification models always save these heads (``modules_to_save``).
_HEAD_NAMES = ("classifier", "score")
_CLASSIFIER_TASKS = ("SEQ_CLS", "TOKEN_CLS")


class AdapterFileError(ValueError):
    """An adapter directory that cannot be loaded: bad config, bad tensors, or another base model."""


@dataclass(frozen=True)
class PeftFormat:
    """How one method maps to Hugging Face PEFT's files.

    ``to_peft(model, layers, adapter_name) -> (config, tensors)``: config fields (``peft_type`` included)
    and tensors keyed ``base_model.model.<path>...`` for the adapter layers ``[(path, layer), ...]``.
    ``from_peft(model, config, tensors, adapter_name) -> list[str]``: inject and load into ``model``;
    it must validate everything (shapes included) before it changes ``model``.
    ``fields``: required config fields and their accepted types, checked before ``from_peft`` runs.
    ``key_prefix``: how trained base parameters (``modules_to_save``) are keyed; PEFT's prompt-learning methods
    (prompt tuning, P-tuning, prefix tuning) use ``base_model.`` and store their one tensor as ``prompt_embeddings``.
    ``modules_to_save``: whether the method's PEFT config has that field (PEFT's adaption prompt has not).
    ``record(base, config, adapter_name, injected, saved_modules) -> dict``: the settings of the method's callback
    that re-create the loaded adapter (recorded on the model, so that its checkpoints can be loaded back with
    ``load_adapter_checkpoint``), or None where that callback cannot re-create this adapter; ``record`` itself None for
    a method whose callback cannot re-create a loaded adapter (AdaLoRA; P-tuning and prefix tuning, which load folded).
    """

    peft_type: str
    layer_type: type[AdapterLayer]
    to_peft: Callable[..., tuple[dict[str, Any], dict[str, torch.Tensor]]]
    from_peft: Callable[..., list[str]]
    fields: dict[str, tuple[type, ...]]
    key_prefix: str = PEFT_PREFIX
    modules_to_save: bool = True
    record: Optional[Callable[..., Optional[dict[str, Any]]]] = None


_FORMATS: dict[str, PeftFormat] = {}


def register_peft_format(fmt: PeftFormat) -> None:
    """Make a method's PEFT format known to :func:`save_adapter` and :func:`load_adapter`."""
    _FORMATS[fmt.peft_type] = fmt


def find_base_model(module: nn.Module) -> tuple[str, nn.Module]:
    """``(prefix, model)``: the Hugging Face model inside ``module`` (``prefix`` ends with a dot), else ``("", module)``."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return "", module
    for name, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel):
            return (f"{name}." if name else ""), sub
    return "", module


# -- base-model fingerprint ---------------------------------------------------------------------------
def _architecture(model: nn.Module) -> str:
    archs = getattr(getattr(model, "config", None), "architectures", None)
    if archs:
        return archs[0]
    cls = type(model)
    if cls.__name__.startswith("FSDP") and len(cls.__bases__) == 2:  # FSDP2's fully_shard: class FSDP<C>(FSDPModule, C)
        cls = cls.__bases__[1]
    return cls.__name__


def base_fingerprint(model: nn.Module, targets: Optional[list[str]] = None) -> dict[str, Any]:
    """What identifies a base model: architecture, parameter count, a digest of parameter names and shapes
    (adapter parameters excluded), and the weight shapes of the adapted modules ``targets``."""
    added = {canonical_name(n) for n in adapter_param_names(model)}  # names as in the unwrapped model (FSDP1 wraps)
    base = [(canonical_name(n), tuple(weight_shape(p))) for n, p in model.named_parameters() if canonical_name(n) not in added]
    digest = hashlib.sha256("\n".join(f"{n}:{list(s)}" for n, s in sorted(base)).encode()).hexdigest()[:16]
    modules = {canonical_name(n): m for n, m in model.named_modules()}
    shapes = {t: list(weight_shape(modules[t].weight)) for t in (targets or []) if t in modules and hasattr(modules[t], "weight")}
    return {"architecture": _architecture(model), "num_parameters": sum(math.prod(s) for _, s in base), "digest": digest, "target_shapes": shapes}


def _check_fingerprint(model: nn.Module, saved: dict[str, Any], where: Path) -> None:
    now = base_fingerprint(model, list(saved.get("target_shapes", {})))
    problems = []
    if saved.get("architecture") != now["architecture"]:
        problems.append(f"architecture: adapter made for {saved.get('architecture')}, this model is {now['architecture']}")
    for name, shape in saved.get("target_shapes", {}).items():
        if name not in now["target_shapes"]:
            problems.append(f"module {name}: in the adapter's base (weight {shape}), missing here")
        elif now["target_shapes"][name] != shape:
            problems.append(f"module {name}: weight {shape} in the adapter's base, {now['target_shapes'][name]} here")
    if not problems and saved.get("digest") != now["digest"]:
        problems.append(
            f"parameter names or shapes differ elsewhere ({saved.get('num_parameters'):,} parameters in the adapter's "
            f"base, {now['num_parameters']:,} here)"
        )
    if problems:
        listed = "\n  ".join(problems[:10])
        raise AdapterFileError(
            f"The adapter in {where} was trained on a different base model:\n  {listed}\n"
            "Load it onto the base it was trained on, or pass check_base=False to load it anyway."
        )


# -- reading files safely -------------------------------------------------------------------------------
def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if directory.is_file():
        raise AdapterFileError(
            f"{directory} is a file; an adapter is a directory (holding {CONFIG_NAME} and {WEIGHTS_NAME}): pass "
            f"{directory.parent} instead."
        )
    if not directory.is_dir():
        raise FileNotFoundError(f"Adapter directory {directory} does not exist.")
    if not path.is_file():
        raise AdapterFileError(f"{directory} has no {CONFIG_NAME}: it is not a Hugging Face PEFT / lightning-peft adapter directory.")
    def no_constant(name: str) -> None:
        raise AdapterFileError(f"{path} holds {name}, which is not a number an adapter config can use; write a finite value.")

    try:
        config = json.loads(path.read_text(), parse_constant=no_constant)  # JSON's Infinity / -Infinity / NaN refused
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path} is not valid JSON: {err}.") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, found {type(config).__name__}.")
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise AdapterFileError(f"{path} has no 'peft_type' field (e.g. \"LORA\"); it is not a PEFT adapter config.")
    if peft_type not in _FORMATS:
        raise AdapterFileError(f"{path}: peft_type {peft_type!r} is not supported by lightning-peft; supported: {sorted(_FORMATS)}.")
    for field, types in _FORMATS[peft_type].fields.items():
        if field not in config:
            raise AdapterFileError(f"{path}: the {peft_type} config is missing the required field {field!r}.")
        _check_field(path, field, config[field], types)
    for field, types in _OPTIONAL_FIELDS.items():  # typed strictly where present: "false" is a string, not False
        if config.get(field) is not None:
            _check_field(path, field, config[field], types)
    return config


#: Optional config fields the loaders read, with their types (PEFT's), checked when present and not null.
_OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {
    "use_rslora": (bool,), "fan_in_fan_out": (bool,), "inference_mode": (bool,), "use_dora": (bool,), "lora_bias": (bool,),
    "lora_dropout": (int, float), "lora_alpha": (int, float), "r": (int,), "init_lora_weights": (bool, str),
    "rank_pattern": (dict,), "alpha_pattern": (dict,), "target_modules": (str, list), "exclude_modules": (str, list),
    "modules_to_save": (list,), "task_type": (str,), "peft_type": (str,), "num_virtual_tokens": (int,),
}


def _check_field(path: Path, field: str, value: Any, types: tuple[type, ...]) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join(t.__name__ for t in types)
        hint = " (a JSON string, not a JSON boolean: write true or false without quotes)" if bool in types and isinstance(value, str) else ""
        raise AdapterFileError(f"{path}: field {field!r} must be {names}, found {type(value).__name__} {value!r}{hint}.")


def _read_tensors(directory: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = directory / WEIGHTS_NAME
    if path.is_file():
        try:  # one pass over the file: header metadata and tensors
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise AdapterFileError(
                f"{path} is not a valid safetensors file (truncated or corrupted?): {err}. Nothing was loaded; "
                "save the adapter again."
            ) from None
    pickled = directory / PICKLE_NAME
    if pickled.is_file():
        if not allow_pickle:
            raise AdapterFileError(
                f"{directory} holds only {PICKLE_NAME}, a pickle file, which can run arbitrary code when loaded; it is "
                "refused by default. If you trust its source, pass allow_pickle=True (it is then read with "
                "torch.load(weights_only=True)), or convert it to safetensors."
            )
        try:
            return torch.load(pickled, map_location="cpu", weights_only=True), {}
        except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
            raise AdapterFileError(f"{pickled} could not be read: {err}.") from None
    raise AdapterFileError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME} (nor {PICKLE_NAME}).")


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of ``tensors``: names, dtypes, shapes and bytes, in name order (the integrity record of a file)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _check_tensors(directory: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The file's tensors match the digest it records (written here since integrity hashes exist; a file from
    peft has none), and every floating-point tensor is finite."""
    recorded = metadata.get(_DIGEST_KEY)
    if recorded is not None and recorded != tensor_digest(tensors):
        raise AdapterFileError(
            f"{directory / WEIGHTS_NAME}: the tensors do not match the integrity digest recorded when the file was written "
            "(the file was changed or corrupted after saving). Nothing was loaded; save the adapter again."
        )
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise AdapterFileError(
            f"{directory}: tensor(s) {bad[:5]} hold NaN or infinite values (training diverged, or the file is corrupted). "
            "Nothing was loaded; use an adapter saved before the values went non-finite."
        )


# -- save --------------------------------------------------------------------------------------------
def _format_for(layers: list[tuple[str, AdapterLayer]]) -> PeftFormat:
    kinds = {type(m) for _, m in layers}
    for fmt in _FORMATS.values():
        if kinds and all(issubclass(k, fmt.layer_type) for k in kinds):
            return fmt
    names = sorted(k.__name__ for k in kinds)
    raise NotImplementedError(
        f"No Hugging Face PEFT format for this combination of adapter layers: {names}. Supported: "
        f"{sorted(f.layer_type.__name__ for f in _FORMATS.values())}, one method per adapter file."
    )


def save_adapter(module: nn.Module, directory: Union[str, Path], adapter_name: Optional[str] = None) -> Path:
    """Write ``module``'s adapter to ``directory`` in Hugging Face PEFT's format; returns the directory.

    Args:
        module: a model (or LightningModule) carrying adapters.
        directory: created if needed.
        adapter_name: which named adapter to write. By default every adapter: the ``"default"`` one (or the
            only one) at ``directory``, any other in ``directory/<name>`` (the layout ``peft`` writes).
    """
    kind = sharding_of(module)
    if kind is not None and not module.__dict__.get("_lightning_peft_gathered"):
        raise RuntimeError(
            f"{type(module).__name__} is sharded across processes ({kind}): each rank holds pieces of its adapter. Call "
            "lightning_peft.distributed.save_sharded_adapter(model, directory) on every rank instead; it gathers the "
            "adapter (not the base) and rank 0 writes it."
        )
    prefix, base = find_base_model(module)
    layers = _method_layers(base)
    if not layers:
        raise ValueError(f"{type(module).__name__} carries no adapter to save: inject one first (e.g. LoRA(...).inject(model)).")
    names = _adapter_names(layers)
    if adapter_name is not None and adapter_name not in names:
        raise ValueError(f"No adapter named {adapter_name!r}: this model carries {names}.")
    out = Path(directory).expanduser()
    chosen = [adapter_name] if adapter_name is not None else names
    targets = {name: out if (adapter_name is not None or name == "default" or len(names) == 1) else out / name for name in chosen}
    for name in chosen:
        _save_one(module, prefix, base, layers, name, targets[name])
    if adapter_name is None and out.is_dir():  # every adapter was written: sub-adapter folders of adapters gone are stale
        for sub in sorted(out.iterdir()):
            if sub.is_dir() and (sub / CONFIG_NAME).is_file() and sub not in targets.values():
                shutil.rmtree(sub)
                warnings.warn(f"Removed {sub}: a saved adapter {sub.name!r} that this model no longer carries.", stacklevel=2)
    return out


def check_savable(module: nn.Module) -> None:
    """Raise ``NotImplementedError`` (naming the layer types) unless :func:`save_adapter` has a file format for every
    adapter ``module`` carries. Writes nothing: the callbacks call it before training when ``save_dir`` is set."""
    _, base = find_base_model(module)
    layers = _method_layers(base)
    for name in _adapter_names(layers):
        _format_for([(n, m) for n, m in layers if name in layer_adapter_names(m)])


def _method_layers(base: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """The adapter layers of a method (a :class:`ModuleCopies`, a module kept per adapter, is written with its
    adapter as ``modules_to_save``, not as a method's layer)."""
    return [(n, m) for n, m in adapter_modules(base) if not isinstance(m, ModuleCopies)]


def _module_names(base: nn.Module) -> list[str]:
    """Qualified module names of ``base`` as PEFT sees the model: the per-adapter copies inside a
    :class:`ModuleCopies` are not modules of their own."""
    return [n for n, _ in base.named_modules() if n and ".modules_to_save." not in n and not n.endswith(".modules_to_save")]


def _adapter_names(layers: list[tuple[str, AdapterLayer]]) -> list[str]:
    names = [n for _, m in layers for n in layer_adapter_names(m)]
    return list(dict.fromkeys(names))


def _save_one(module, prefix, base, layers, name, directory: Path) -> None:
    mine = [(canonical_name(n), m) for n, m in layers if name in layer_adapter_names(m)]  # file names: no wrapper segments
    fmt = _format_for(mine)
    config, tensors = fmt.to_peft(base, mine, name)
    state = peft_state(module)
    trained = [n[len(prefix):] for n in state["trainable"] if n.startswith(prefix)]
    for owned, holders in state.get("owners", {}).items():  # modules trained per adapter: this adapter's copy
        if name in holders and owned.startswith(prefix):
            trained += [f"{owned[len(prefix):]}.{p}" for p, _ in module_copy(module, owned, name).named_parameters()]
    task = config.get("task_type") or _peft_task_type(base)
    heads = _HEAD_NAMES if task in _CLASSIFIER_TASKS else ()
    adapted = _adapted_heads(base, heads)
    if adapted:
        if config.get("task_type"):  # the method's own format names the task: it cannot be dropped
            raise NotImplementedError(f"classification head {adapted} carries adapter layers")
        # an adapted layer inside the classification head: PEFT's classifier tasks save the head whole (and adapt
        # nothing inside it), so the adapter is written as a plain (task-less) one, in which the head keeps its layers
        task, heads = None, ()
    entries, saved = _modules_to_save(base, trained, heads)
    for mname in saved:
        for key, value in module_copy(base, mname, name).state_dict().items():
            tensors[f"{fmt.key_prefix}{mname}.{key}"] = value.detach()
    name_or_path = getattr(getattr(base, "config", None), "_name_or_path", None)
    config = {
        "peft_type": fmt.peft_type,
        "base_model_name_or_path": str(name_or_path) if name_or_path else None,
        **config,
        "task_type": task,
        "modules_to_save": entries or None,
        "inference_mode": True,
    }
    if not entries and not fmt.modules_to_save:
        del config["modules_to_save"]  # a field this method's PEFT config does not have (peft would warn)
    fingerprint = base_fingerprint(base, [n for n, _ in mine])
    directory.mkdir(parents=True, exist_ok=True)
    # our provenance lives in the safetensors header: peft warns about any config field it does not know
    # copies: serialising marks a tensor's storage as not resizable, which a live parameter's must stay (FSDP)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    config_text = json.dumps(config, indent=2) + "\n"
    metadata = {
        "format": "pt", _FINGERPRINT_KEY: json.dumps(fingerprint), _LIBRARY_KEY: f"lightning-peft {__version__}",
        _DIGEST_KEY: tensor_digest(tensors), _CONFIG_DIGEST_KEY: hashlib.sha256(config_text.encode()).hexdigest(),
    }
    _warn_if_replacing_another_adapter(directory, config)
    # each file via a temporary file and an atomic rename, the config last: an interrupted save leaves the old pair,
    # or new weights whose recorded config digest does not match the old config (refused on load), never a mix
    # that loads silently
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    _atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(config_text))


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _warn_if_replacing_another_adapter(directory: Path, config: dict[str, Any]) -> None:
    path = directory / CONFIG_NAME
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    differs = [f for f in ("peft_type", "target_modules", "task_type") if old.get(f) != config.get(f)]
    if differs:
        warnings.warn(
            f"{directory} held another adapter ({', '.join(f'{f}={old.get(f)!r}' for f in differs)}); it is replaced by this "
            "one. Save to a new directory to keep both.",
            stacklevel=4,
        )


def _peft_task_type(base: nn.Module) -> Optional[str]:
    """PEFT's ``task_type`` for the model class, for the tasks whose PEFT model class serves it as our model runs;
    None (PEFT's plain ``PeftModel``) for any other model."""
    from lightning_peft.methods._prompt import task_type

    task = task_type(base)
    return task if task in ("CAUSAL_LM", *_CLASSIFIER_TASKS) else None


def _peft_matches(module_names: list[str], entries: list[str], at_dots: bool = False) -> list[str]:
    """The modules PEFT wraps for ``modules_to_save=entries``: every module whose qualified name ends with an entry
    (PEFT <= 0.21: a plain suffix, ``"classifier"`` also takes ``pre_classifier``; ``at_dots``, PEFT >= 0.22: the
    whole name or a dotted suffix), outermost only (the others are inside them)."""
    hit = [n for n in module_names if any((n == e or n.endswith("." + e)) if at_dots else n.endswith(e) for e in entries)]
    return [n for n in hit if not any(n.startswith(o + ".") for o in hit)]


def _carrying_adapters(base: nn.Module, names: list[str]) -> list[str]:
    return [n for n in names if any(isinstance(m, AdapterLayer) and not isinstance(m, ModuleCopies) for m in base.get_submodule(n).modules())]


def _adapted_heads(base: nn.Module, heads: tuple[str, ...]) -> list[str]:
    """The classification heads (PEFT saves them whole for its classifier tasks) that carry adapter layers."""
    names = _module_names(base)
    return _carrying_adapters(base, _peft_matches(names, [h for h in heads if any(n.endswith(h) for n in names)]))


def _modules_to_save(base: nn.Module, trained: list[str], heads: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """``(modules_to_save entries, modules saved whole)`` for the trained base parameters ``trained`` and, for a
    classifier task, its head (PEFT's sequence/token classification models always save ``classifier``/``score``).

    PEFT saves and loads every module an entry matches (see :func:`_peft_matches`), all its parameters and buffers,
    and fails on a file that lacks one; so every matched module is written whole, trained or not."""
    modules = dict(base.named_modules())
    names = _module_names(base)
    top = sorted(p for p in trained if "." not in p)
    if top:
        raise NotImplementedError(
            f"Trained parameters {top} belong to no submodule of {type(base).__name__}: PEFT's modules_to_save names modules. "
            "Save a Lightning checkpoint instead."
        )
    entries = [h for h in heads if any(n.endswith(h) for n in names)]  # (the caller checked they carry no adapter)
    saved = _peft_matches(names, entries)
    owners = sorted({p.rsplit(".", 1)[0] for p in trained}, key=lambda n: (n.count("."), n))
    missing = [o for o in owners if o not in modules]
    if missing:
        raise NotImplementedError(
            f"Trained base parameters of {missing} are recorded, but {type(base).__name__} has no such modules (any more); "
            "the adapter cannot be written with them. Save a Lightning checkpoint instead."
        )
    for owner in owners:
        if not any(owner == s or owner.startswith(s + ".") for s in saved):
            entries.append(owner)
            saved = _peft_matches(names, entries)
    adapted = _carrying_adapters(base, saved)
    if adapted:
        raise NotImplementedError(
            f"Modules {adapted} are trained in full (trainable_modules) and also carry adapter layers; PEFT's modules_to_save "
            "cannot hold both. Leave them out of trainable_modules or out of the adapter's target_modules."
        )
    return entries, saved


# -- load --------------------------------------------------------------------------------------------
def load_adapter(
    module: nn.Module,
    directory: Union[str, Path],
    adapter_name: str = "default",
    is_trainable: bool = False,
    activate: Optional[bool] = None,
    allow_pickle: bool = False,
    check_base: bool = True,
    check_integrity: bool = True,
) -> nn.Module:
    """Load an adapter directory (written here or by Hugging Face PEFT) into ``module``; returns ``module``.

    On a plain base model the adapter its config describes (method, targets, ranks) is injected and its
    weights loaded; on a model that already carries adapters it is added under ``adapter_name``.
    Everything (config fields, tensor names and shapes, base fingerprint) is checked before ``module``
    is changed, so a bad file leaves it as it was. An additional named adapter whose file stores base modules
    whole (a classifier's head) loads only if those hold the model's current values: the adapters share them.

    Args:
        module: the base model (or a LightningModule holding it), with or without adapters.
        directory: the adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        adapter_name: the name the adapter gets in ``module``.
        is_trainable: train this adapter (default: frozen, for inference or as a fixed component).
        activate: apply the adapter in forward. Default: only if ``module`` had no adapter before.
        allow_pickle: also read a pickled ``adapter_model.bin`` (with ``torch.load(weights_only=True)``).
        check_base: refuse an adapter whose recorded base fingerprint differs from ``module``'s base.
        check_integrity: refuse a file written here whose ``adapter_config.json`` is not the one saved with its weights
            (a torn save); pass False after editing the config by hand. The tensors' own digest is always checked.

    Example::

        model = AutoModelForSequenceClassification.from_pretrained(base_path)
        load_adapter(model, "outputs/quickstart/adapter")
    """
    directory = Path(directory).expanduser()
    config = _read_config(directory)
    tensors, metadata = _read_tensors(directory, allow_pickle)
    _check_tensors(directory, tensors, metadata)
    recorded = metadata.get(_CONFIG_DIGEST_KEY)
    if check_integrity and recorded is not None and recorded != hashlib.sha256((directory / CONFIG_NAME).read_bytes()).hexdigest():
        raise AdapterFileError(
            f"{directory}: {CONFIG_NAME} is not the config that was saved with {WEIGHTS_NAME} (an interrupted save, or the "
            "config was edited). Nothing was loaded: save the adapter again, or pass check_integrity=False if you edited the "
            "config on purpose."
        )
    prefix, base = find_base_model(module)
    had_adapters = any(True for _ in adapter_modules(base))
    if check_base and _FINGERPRINT_KEY in metadata:
        try:
            saved_fingerprint = json.loads(metadata[_FINGERPRINT_KEY])
            if not isinstance(saved_fingerprint, dict):
                raise ValueError(f"a {type(saved_fingerprint).__name__}, not an object")
        except ValueError as err:
            raise AdapterFileError(
                f"{directory / WEIGHTS_NAME}: the base fingerprint in its header is malformed ({err}); the file was changed "
                "after saving. Save the adapter again, or pass check_base=False to load it without the base check."
            ) from None
        _check_fingerprint(base, saved_fingerprint, directory)
    # modules_to_save: base modules stored whole (PEFT's classifier tasks always store their head)
    saved_modules = config.get("modules_to_save") or []
    if not isinstance(saved_modules, list) or not all(isinstance(m, str) for m in saved_modules):
        raise AdapterFileError(f"{directory / CONFIG_NAME}: 'modules_to_save' must be a list of module names or null, found {saved_modules!r}.")
    heads = list(_HEAD_NAMES) if config.get("task_type") in _CLASSIFIER_TASKS else []  # PEFT's classifier models add these
    entries = [m for m in dict.fromkeys(saved_modules + heads) if m]
    fmt = _FORMATS[config["peft_type"]]
    full, rest = _split_modules_to_save(base, tensors, entries, directory, fmt.key_prefix, adapter_name)
    module_names = _module_names(base)
    lacking = []
    required = _peft_matches(module_names, [m for m in saved_modules if m], at_dots=True)
    for m in _peft_matches(module_names, [m for m in saved_modules if m]):
        keys = [f"{m}.{k}" for k in module_copy(base, m, adapter_name).state_dict()]
        missing = [k for k in keys if k not in full]
        # matched at dots (PEFT >= 0.22's rule): required; matched by the old suffix rule only: all of it, or none
        if m in required or len(missing) < len(keys):
            lacking += missing
    if lacking:
        raise AdapterFileError(
            f"{directory}: modules_to_save lists {saved_modules}, but the file lacks {len(lacking)} of their tensors "
            f"({', '.join(lacking[:5])}{', ...' if len(lacking) > 5 else ''}); loading it would leave those modules as they "
            "are in this model (e.g. an untrained head). Save the adapter again with its modules."
        )
    # the modules stored whole: on a model that carries other adapters, each adapter gets its own copy of them
    stored = [m for m in _peft_matches(module_names, entries) if any(p.startswith(m + ".") for p in full)]
    # trainable, or other values than the model's: its own copy (frozen with the same values: the modules are shared)
    per_adapter = bool(full) and had_adapters and (bool(is_trainable) or _differs(base, full))
    if per_adapter:
        _check_copyable(base, stored, directory)
    elif full and had_adapters:
        # the same values, frozen: nothing to load, and the shared modules stay as the other adapters have them
        full, stored = {}, []
    try:
        injected = fmt.from_peft(base, config, rest, adapter_name)
    except AdapterFileError:
        raise
    except (ValueError, TypeError, KeyError) as err:
        raise AdapterFileError(f"{directory}: {err}") from err
    state = peft_state(module)
    owners = state.setdefault("owners", {})
    in_place: list[str] = []
    if full:
        if per_adapter:  # who trained these modules so far: recorded, or (an older record) every adapter already here
            others = [n for n in _adapter_names(_method_layers(base)) if n != adapter_name]
            for m in stored:
                owners.setdefault(prefix + m, [] if copy_owner_of(base, m) else others)
        in_place = keep_per_adapter_copies(module, [prefix + m for m in stored], adapter_name)
    with torch.no_grad():  # into the module this adapter uses: its copy, or the module itself
        for owner in stored:
            here = _tensors_of(module_copy(base, owner, adapter_name))
            for pname, value in full.items():
                if pname.startswith(owner + "."):
                    target = here[pname[len(owner) + 1:]]
                    target.copy_(value.to(target.dtype))
    for _, m in adapter_modules(base):  # through the multi-adapter protocol
        if isinstance(m, NamedAdapters) and adapter_name in m.adapter_names():
            if not is_trainable:
                m.set_adapter_frozen(adapter_name, True)
            m.set_adapter_active(adapter_name, not (activate is False or (activate is None and had_adapters)))
    if is_trainable and in_place:
        state["trainable"] = sorted(set(state["trainable"]) | set(in_place))
    if fmt.record is not None:
        record = fmt.record(base, config, adapter_name, list(injected or []), stored)
        if record is not None:  # None: no callback re-creates these layers (the checkpoint check then names the keys)
            state["methods"].append(record)
    mark_trainable(module, extra=state["trainable"])
    return module


def _differs(base: nn.Module, full: dict[str, torch.Tensor]) -> bool:
    """Whether the stored modules' values differ from the ones this model holds now."""
    current = _tensors_of(base)
    return any(not torch.equal(current[p].detach().cpu(), v.to(current[p].dtype)) for p, v in full.items())


def _check_copyable(base: nn.Module, stored: list[str], directory: Path) -> None:
    """Refuse (before anything changes) modules stored whole that cannot be kept per adapter: tied to other modules."""
    for m in stored:
        ties = tied_elsewhere(base, m)
        if ties:
            raise NotImplementedError(
                f"The adapter in {directory} stores {m} whole, which shares parameters with {ties[:3]} (tied weights) in this "
                "model: a copy per adapter would untie them. Load it onto a fresh base model."
            )


def _split_modules_to_save(
    base: nn.Module, tensors: dict[str, torch.Tensor], modules: list[str], where: Path, key_prefix: str = PEFT_PREFIX, adapter_name: str = "default",
):
    """``(full, rest)``: the tensors of the base modules stored whole (``modules_to_save``, matched as PEFT matches
    them: module names ending with an entry), keyed by their name in ``base``, after checking their shapes; and the
    method's own tensors, keyed as in the file."""
    current = _tensors_of(base)
    saved = _peft_matches(_module_names(base), modules)
    full, rest = {}, {}
    for key, value in tensors.items():
        if key_prefix != PEFT_PREFIX and key == "prompt_embeddings":  # a prompt-learning method's own tensor
            rest[key] = value
            continue
        if not key.startswith(key_prefix):
            raise AdapterFileError(f"{where / WEIGHTS_NAME}: tensor {key!r} does not start with {key_prefix!r} (not a PEFT adapter file).")
        path = _unwrapped(key[len(key_prefix):], adapter_name, current)
        owner = next((m for m in saved if path.startswith(m + ".")), None)
        if owner is not None and path in current:
            if tuple(value.shape) != tuple(current[path].shape):
                raise AdapterFileError(
                    f"{where}: module {owner} ({path[len(owner) + 1:]}): the model has shape "
                    f"{list(current[path].shape)}, the adapter file {list(value.shape)}."
                )
            full[path] = value
        else:
            rest[key] = value
    return full, rest


def _tensors_of(base: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``base`` by qualified name (PEFT stores a module's buffers too), tied ones
    under each of their names."""
    return {**dict(base.named_buffers(remove_duplicate=False)), **dict(base.named_parameters(remove_duplicate=False))}


def _unwrapped(path: str, adapter_name: str, known) -> str:
    """A module-to-save tensor's name in the model: peft writes ``<module>.<param>``, older versions
    ``<module>.modules_to_save.<adapter>.<param>`` or ``<module>.modules_to_save.<param>``."""
    if ".modules_to_save." not in path:
        return path
    for name in dict.fromkeys((adapter_name, "default")):
        candidate = path.replace(f".modules_to_save.{name}.", ".")
        if candidate in known:
            return candidate
    candidate = re.sub(r"\.modules_to_save\.[^.]+\.", ".", path)
    return candidate if candidate in known else path.replace(".modules_to_save.", ".")


def _lora_record(base: nn.Module, config: dict[str, Any], adapter_name: str, injected: list[str], saved_modules: list[str]) -> dict[str, Any]:
    """The ``LoRA`` callback settings recorded on the module for a loaded LoRA adapter (checkpoints and resume use it)."""
    record = {
        "method": "lora",
        "target_modules": config["target_modules"],
        "exclude_modules": config.get("exclude_modules"),
        "trainable_modules": list(saved_modules),
        "r": config["r"],
        "alpha": float(config["lora_alpha"]),
        "dropout": float(config.get("lora_dropout", 0.0) or 0.0),
        "use_rslora": bool(config.get("use_rslora", False)),
        "init": _lora_init(config),
    }
    if config.get("use_dora"):
        record["use_dora"] = True
    if adapter_name != "default":
        record["adapter_name"] = adapter_name
    if config.get("rank_pattern"):
        record["rank_pattern"] = dict(config["rank_pattern"])
    if config.get("alpha_pattern"):
        record["alpha_pattern"] = {k: float(v) for k, v in config["alpha_pattern"].items()}
    return record


# -- LoRA ------------------------------------------------------------------------------------------------
_BASE_CHANGING_INITS = ("corda", "loftq", "lora_ga")  # peft inits that change the base weights in ways not reproduced here


def _lora_init(config: dict[str, Any]) -> str:
    """Our ``init`` for a PEFT config's ``init_lora_weights``: PiSSA/OLoRA are recomputed from the base (peft does the
    same when it loads such a directory); the others only set the starting values the saved tensors replace."""
    value = config.get("init_lora_weights", True)
    if isinstance(value, str) and from_weight(value.lower()):
        return value.lower()
    return "gaussian" if value == "gaussian" else "kaiming"


def _lora_to_peft(base: nn.Module, layers: list[tuple[str, LoRALinear]], name: str):
    if any(name in m.lora_gate for _, m in layers):
        raise NotImplementedError(
            f"LoRA adapter {name!r} is gated (UniPELT): PEFT's LORA format has no gates. Save a Lightning checkpoint "
            "instead (the callbacks keep the adapter, gates included)."
        )
    specs = {path: m.specs[name] for path, m in layers}
    initial = {path for path, m in layers if name in m.lora_init_a}
    if initial and len(initial) != len(layers):
        raise NotImplementedError(f"Adapter {name!r} starts from the base weight (PiSSA/OLoRA) on some modules only; PEFT's format has one init_lora_weights.")
    if initial:  # written as plain LoRA of rank 2r, [B | -B0] [A ; A0], at the same scaling: it loads on the original base
        specs = {
            path: dataclasses.replace(s, r=2 * s.r, alpha=s.alpha * (math.sqrt(2) if s.use_rslora else 2), init="kaiming")
            for path, s in specs.items()
        }
    r = Counter(s.r for s in specs.values()).most_common(1)[0][0]
    alpha = Counter(s.alpha for s in specs.values()).most_common(1)[0][0]
    if len({s.use_rslora for s in specs.values()}) > 1:
        raise NotImplementedError(f"Adapter {name!r} mixes rsLoRA and plain LoRA scaling across modules; PEFT's format has one use_rslora.")
    if len({s.use_dora for s in specs.values()}) > 1:
        raise NotImplementedError(f"Adapter {name!r} is DoRA on some modules and plain LoRA on others; PEFT's format has one use_dora.")
    first = next(iter(specs.values()))
    tensors = {}
    for path, m in layers:
        a_blocks, b_blocks = _factors(m, name)
        a_shape, b_shape = m.peft_shapes(m, specs[path].r)
        tensors[f"{PEFT_PREFIX}{path}.{m.peft_parts[0]}"] = torch.cat([t.detach() for t in a_blocks], 0).reshape(a_shape)
        tensors[f"{PEFT_PREFIX}{path}.{m.peft_parts[1]}"] = torch.cat([t.detach() for t in b_blocks], 1).reshape(b_shape)
        if first.use_dora:
            tensors[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = m.lora_magnitude[name].detach()
    config = {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {p: s.r for p, s in specs.items() if s.r != r},
        "alpha_pattern": {p: s.alpha for p, s in specs.items() if s.alpha != alpha},
        "lora_dropout": first.dropout,
        "use_rslora": first.use_rslora,
        "target_modules": sorted(specs),
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in layers if m.wraps_linear),
        "bias": "none",
        "use_dora": first.use_dora,
        "init_lora_weights": "gaussian" if first.init == "gaussian" else True,
    }
    return config, tensors


_LORA_UNSUPPORTED = {
    "bias": ("none", None),
    "layers_to_transform": (None,),
    "layers_pattern": (None,),
    "target_parameters": (None, []),
    "lora_bias": (False, None),
    "trainable_token_indices": (None,),
    "megatron_config": (None,),
}


def _lora_from_peft(base: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], adapter_name: str) -> list[str]:
    for field, ok in _LORA_UNSUPPORTED.items():
        if field in config and config[field] not in ok:
            raise NotImplementedError(f"This LoRA adapter uses {field}={config[field]!r}, which lightning-peft does not support yet.")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for field, value in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(value, dict):
            raise AdapterFileError(f"field {field!r} must be an object mapping module names to values, found {value!r}.")
    r, alpha = config["r"], float(config["lora_alpha"])
    targets = config["target_modules"]
    targets = targets if isinstance(targets, str) else list(targets)
    exclude = config.get("exclude_modules")
    classes = _lora_layer_classes()
    supported = tuple(t for c in classes for t in c.supported_types())
    names = find_targets(base, targets, exclude, supported=supported, method="LoRA", extend=(LoRALinear,), each_entry=False, recomputes_linear=True)
    modules = dict(base.named_modules())
    use_dora = config.get("use_dora") in (True,)
    if config.get("use_dora") not in (True, False, None):
        raise AdapterFileError(f"field 'use_dora' must be true or false, found {config.get('use_dora')!r}.")
    init_value = config.get("init_lora_weights", True)
    if isinstance(init_value, str) and init_value.lower().startswith(_BASE_CHANGING_INITS):
        raise NotImplementedError(
            f"This LoRA adapter was initialised with init_lora_weights={init_value!r}, which changes the base weights in a "
            "way lightning-peft does not reproduce. In peft, save it converted to plain LoRA "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) and load that."
        )
    init = _lora_init(config)
    if init.startswith("pissa_niter_"):
        warnings.warn(
            f"This adapter was initialised with init_lora_weights={init_value!r}: loading it recomputes a randomized SVD of "
            "the base weights, so its outputs differ slightly from the trained model's. Adapters saved by lightning-peft "
            "are converted to plain LoRA and load exactly.",
            stacklevel=3,
        )
    expected: dict[str, tuple[int, ...]] = {}
    parts: dict[str, tuple[str, str]] = {}  # module -> its A and B keys' suffixes
    for n in names:
        m = modules[n]
        cls = type(m) if isinstance(m, LoRALinear) else _lora_layer_class(m, classes)
        rank = pattern_value(n, rank_pattern, r)
        a_shape, b_shape = cls.peft_shapes(m, rank)
        parts[n] = cls.peft_parts
        expected[f"{PEFT_PREFIX}{n}.{cls.peft_parts[0]}"] = a_shape
        expected[f"{PEFT_PREFIX}{n}.{cls.peft_parts[1]}"] = b_shape
        out_f = b_shape[0]
        if use_dora:
            expected[f"{PEFT_PREFIX}{n}.lora_magnitude_vector"] = (out_f,)
    # peft may keep the adapter name in keys (lora_A.<name>.weight); accept that spelling too
    normalized, spelled = {}, {}
    for original, value in tensors.items():
        key = original
        for part in ("lora_A", "lora_B"):
            key = key.replace(f".{part}.{adapter_name}.weight", f".{part}.weight").replace(f".{part}.default.weight", f".{part}.weight")
        for part in ("lora_embedding_A", "lora_embedding_B"):
            for spelling in (f".{part}.{adapter_name}", f".{part}.default"):
                if key.endswith(spelling):
                    key = key[: -len(spelling)] + f".{part}"
        for spelling in (f".lora_magnitude_vector.{adapter_name}.weight", ".lora_magnitude_vector.default.weight", ".lora_magnitude_vector.weight"):
            if key.endswith(spelling):
                key = key[: -len(spelling)] + ".lora_magnitude_vector"
        if key in normalized:
            raise AdapterFileError(
                f"the adapter file holds {spelled[key]!r} and {original!r}, two spellings of the same tensor {key!r}: it is "
                "ambiguous which one to load. Keep one of them."
            )
        normalized[key], spelled[key] = value, original
    problems = []
    for key, shape in expected.items():
        module, part = key[len(PEFT_PREFIX):].removesuffix(".weight").rsplit(".", 1)  # (lora_A / lora_B / lora_magnitude_vector)
        if key not in normalized:
            problems.append(f"missing {key} for module {module} (expected shape {list(shape)})")
        elif tuple(normalized[key].shape) != shape:
            problems.append(f"module {module} ({part}): expected shape {list(shape)}, found {list(normalized[key].shape)}")
    for key in sorted(set(normalized) - set(expected)):
        problems.append(f"unexpected tensor {key} (shape {list(normalized[key].shape)}): no such adapted module in this model")
    if problems:
        listed = "\n  ".join(problems[:20])
        raise AdapterFileError(f"the adapter's tensors do not fit this model ({len(problems)} problem(s)):\n  {listed}")
    injected = inject_lora(
        base, names, None, r=r, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0) or 0.0),
        use_rslora=bool(config.get("use_rslora", False)), init=init, adapter_name=adapter_name,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, strict=False, use_dora=use_dora,
    )
    with torch.no_grad():
        for n in injected:
            layer = base.get_submodule(n)
            a_part, b_part = parts[n]
            layer.lora_a[adapter_name].copy_(normalized[f"{PEFT_PREFIX}{n}.{a_part}"].reshape(layer.lora_a[adapter_name].shape))
            layer.lora_b[adapter_name].copy_(normalized[f"{PEFT_PREFIX}{n}.{b_part}"].reshape(layer.lora_b[adapter_name].shape))
            if use_dora:
                layer.lora_magnitude[adapter_name].copy_(normalized[f"{PEFT_PREFIX}{n}.lora_magnitude_vector"])
    return injected


register_peft_format(
    PeftFormat(
        peft_type="LORA",
        layer_type=LoRALinear,
        to_peft=_lora_to_peft,
        from_peft=_lora_from_peft,
        fields={"r": (int,), "lora_alpha": (int, float), "target_modules": (str, list)},
        record=_lora_record,
    )
)


# -- methods with one unnamed adapter per layer/model: shared wrappers --------------------------------------
def _unnamed(to_peft):
    """A method's ``to_peft(base, layers)`` as the registry's ``to_peft(base, layers, name)``."""
    return lambda base, layers, name: to_peft(base, layers)


def _default_only(from_peft, holds: str):
    """A method's ``from_peft(base, config, tensors)`` that refuses adapter names other than "default"."""

    def load(base, config, tensors, name):
        if name != "default":
            raise NotImplementedError(f"{holds}: load it as 'default', not {name!r}.")
        return from_peft(base, config, tensors)

    return load


# -- (IA)3 -----------------------------------------------------------------------------------------------
def _ia3_record(base: nn.Module, config: dict[str, Any], adapter_name: str, injected: list[str], saved_modules: list[str]) -> dict[str, Any]:
    """The ``IA3`` callback settings that re-create exactly the layers loaded (their names, and which scale the input)."""
    return {
        "method": "ia3",
        "target_modules": list(injected),
        "feedforward_modules": [n for n in injected if base.get_submodule(n).feedforward],
        "exclude_modules": None,
        "trainable_modules": list(saved_modules),
    }


def _register_ia3() -> None:
    from lightning_peft.methods import ia3

    register_peft_format(
        PeftFormat(
            peft_type="IA3", layer_type=ia3.IA3Linear, to_peft=_unnamed(ia3.to_peft),
            from_peft=_default_only(ia3.from_peft, "(IA)3 layers hold one adapter each"), fields={"target_modules": (str, list)},
            record=_ia3_record,
        )
    )


_register_ia3()


# -- AdaLoRA ---------------------------------------------------------------------------------------------
def _register_adalora() -> None:
    from lightning_peft.methods import adalora

    register_peft_format(
        PeftFormat(
            peft_type="ADALORA", layer_type=adalora.AdaLoRALinear, to_peft=adalora.to_peft, from_peft=adalora.from_peft,
            fields={"init_r": (int,), "lora_alpha": (int, float), "target_modules": (str, list)},
        )
    )


_register_adalora()


def _prompt_tuning_record(base: nn.Module, config: dict[str, Any], adapter_name: str, injected: list[str], saved_modules: list[str]) -> dict[str, Any]:
    """The ``PromptTuning`` callback settings that re-create the loaded prompt (its values come from the checkpoint)."""
    return {"method": "prompt_tuning", "num_virtual_tokens": config["num_virtual_tokens"], "init": "random", "trainable_modules": list(saved_modules)}


def _llama_adapter_record(base: nn.Module, config: dict[str, Any], adapter_name: str, injected: list[str], saved_modules: list[str]) -> Optional[dict[str, Any]]:
    """The ``LlamaAdapter`` callback settings that re-create the loaded layers (the callback adapts ``*.self_attn``)."""
    if (config.get("target_modules") or "self_attn") != "self_attn":
        return None
    return {"method": "llama_adapter", "adapter_len": config["adapter_len"], "adapter_layers": config["adapter_layers"], "trainable_modules": list(saved_modules)}


# -- soft prompts: prompt tuning, P-tuning, prefix tuning (P-tuning v2 writes PREFIX_TUNING) ------------------
def _register_soft_prompts() -> None:
    from lightning_peft.methods import p_tuning, prefix_tuning, prompt_tuning

    def named(from_peft, peft_type):
        """A prompt loaded under a name the model's soft prompts do not use yet: a further one is a sibling layer."""

        def load(base, config, tensors, name):
            if any(isinstance(m, prompt_tuning.SoftPromptLayer) and name in m.adapter_names() for m in base.modules()):
                raise NotImplementedError(
                    f"{type(base).__name__} already carries a soft prompt named {name!r}: load {peft_type} under another "
                    "adapter_name (a further prompt), or onto a fresh base model."
                )
            return from_peft(base, config, tensors, adapter_name=name)

        return load

    def prompt_tuning_record(base, config, adapter_name, injected, saved_modules):
        record = _prompt_tuning_record(base, config, adapter_name, injected, saved_modules)
        return record if adapter_name == "default" else {**record, "adapter_name": adapter_name}

    prompt_fields = {"num_virtual_tokens": (int,)}
    records = {"PROMPT_TUNING": prompt_tuning_record}  # P_TUNING and PREFIX_TUNING load folded layers no callback makes
    for peft_type, module, layer_type in (
        ("PROMPT_TUNING", prompt_tuning, prompt_tuning.PromptEmbedding),
        ("P_TUNING", p_tuning, p_tuning.PromptEncoder),
        ("PREFIX_TUNING", prefix_tuning, prefix_tuning.PrefixKV),  # prefix tuning and P-tuning v2 (PrefixKV without projection)
    ):
        register_peft_format(
            PeftFormat(
                peft_type=peft_type, layer_type=layer_type, key_prefix="base_model.", to_peft=_unnamed(module.to_peft),
                from_peft=named(module.from_peft, peft_type), fields=prompt_fields, record=records.get(peft_type),
            )
        )


# -- LLaMA-Adapter (PEFT's adaption prompt) ---------------------------------------------------------------
def _register_llama_adapter() -> None:
    from lightning_peft.methods import llama_adapter

    register_peft_format(
        PeftFormat(
            peft_type="ADAPTION_PROMPT", layer_type=llama_adapter.LlamaAdapterAttention, to_peft=_unnamed(llama_adapter.to_peft),
            from_peft=_default_only(llama_adapter.from_peft, "LLaMA-Adapter layers hold one adaption prompt each"),
            fields={"target_modules": (str,), "adapter_len": (int,), "adapter_layers": (int,)}, modules_to_save=False,
            record=_llama_adapter_record,
        )
    )


_register_soft_prompts()
_register_llama_adapter()
