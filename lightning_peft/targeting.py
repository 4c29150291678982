"""Which modules of a model an adapter wraps.

``target_modules`` follows Hugging Face PEFT's rules, so configs carry over:

* ``"all-linear"``: every ``nn.Linear`` (and Hugging Face GPT-2 ``Conv1D``) except the output head
  (``get_output_embeddings()``, ``lm_head``, and classification heads named ``classifier`` or ``score``);
* any other string: a regular expression that must match the whole qualified module name;
* a list of strings: each one matches a module whose qualified name equals it or ends with ``"." + it``
  (a dotted suffix such as ``"self_attn.q_proj"`` works too).

``exclude_modules`` takes the same forms and removes modules from the match.

Methods whose layer recomputes the linear map from the wrapped module's weight (LoRA, (IA)³, AdaLoRA) refuse a
subclass of ``nn.Linear``/``Conv1D`` that overrides ``forward``: its own forward would be silently lost (see
:func:`overrides_linear_forward`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Optional, Union

from torch import nn

from lightning_peft.core import AdapterLayer

__all__ = ["TargetSpec", "find_targets", "linear_types", "match_name", "output_head_names", "overrides_linear_forward"]

TargetSpec = Union[str, Sequence[str]]

#: Names of classification heads that ``"all-linear"`` leaves alone (as Hugging Face PEFT does).
_HEAD_NAMES = ("lm_head", "classifier", "score")


def linear_types() -> tuple[type[nn.Module], ...]:
    """``nn.Linear`` and, when ``transformers`` is installed, its GPT-2 style ``Conv1D``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


#: ``nn.Linear`` subclasses (``module.qualname``) whose own ``forward`` computes exactly ``x W^T + b``: Falcon's, which
#: only leaves the bias add unfused. Wrapping them loses nothing but that extra rounding step.
_PLAIN_FORWARD_LINEARS = frozenset({"transformers.models.falcon.modeling_falcon.FalconLinear"})


def overrides_linear_forward(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer whose ``forward`` is its own rather than the plain linear map.

    False for ``nn.Linear`` and ``Conv1D`` themselves, for subclasses that keep their base's ``forward`` (torch's
    ``NonDynamicallyQuantizableLinear``), for quantized linears (:class:`~lightning_peft.quant.QuantLinear`, and
    bitsandbytes' ``Linear4bit``/``Linear8bitLt`` once their weight is quantized; adapter layers compute those through
    :func:`~lightning_peft.quant.frozen_linear`), for Falcon's ``FalconLinear`` (the same map, bias added unfused),
    and for any module that is not a linear type.
    """
    from lightning_peft.quant import QuantLinear, is_quantized

    cls = type(module)
    for base in linear_types():
        if isinstance(module, base) and (cls is base or cls.forward is base.forward):
            return False
    if not isinstance(module, linear_types()) or isinstance(module, QuantLinear):
        return False
    weight = getattr(module, "weight", None)
    if weight is not None and is_quantized(weight):
        return False
    return f"{cls.__module__}.{cls.__qualname__}" not in _PLAIN_FORWARD_LINEARS


def output_head_names(model: nn.Module) -> set[str]:
    """Qualified names of the output head(s) that ``"all-linear"`` excludes.

    The module returned by ``get_output_embeddings()`` of the model or of any Hugging Face model inside it
    (a LightningModule usually holds one), and every module named ``lm_head``, ``classifier`` or ``score``.
    """
    modules = list(model.named_modules())
    heads = {name for name, _ in modules if name.split(".")[-1] in _HEAD_NAMES}
    outputs = []
    for _, module in modules:
        get_out = getattr(module, "get_output_embeddings", None)
        if callable(get_out):
            try:
                out = get_out()
            except (NotImplementedError, AttributeError):
                out = None
            if isinstance(out, nn.Module):
                outputs.append(out)
    heads |= {name for name, m in modules if any(m is out for out in outputs)}
    return heads


def match_name(name: str, spec: TargetSpec) -> bool:
    """Whether a qualified module name is selected by ``spec`` (see the module docstring)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _candidates(modules: dict[str, nn.Module], supported: tuple[type[nn.Module], ...]) -> str:
    """The short names of the modules a method could wrap (else of every module), for error messages."""
    names = sorted({n.split(".")[-1] for n, m in modules.items() if n and isinstance(m, supported)})
    names = names or sorted({n.split(".")[-1] for n in modules if n})
    return ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")


def _under(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes if p) or "" in prefixes


def find_targets(
    model: nn.Module,
    target_modules: TargetSpec,
    exclude_modules: TargetSpec | None = None,
    supported: tuple[type[nn.Module], ...] | None = None,
    method: str = "adapter",
    extend: tuple[type[nn.Module], ...] = (),
    recomputes_linear: Optional[bool] = None,
    each_entry: bool = True,
) -> list[str]:
    """Qualified names of the modules to wrap, validated; raises before anything is changed.

    Args:
        model: the model to search.
        target_modules: see the module docstring.
        exclude_modules: same forms; matching modules are skipped.
        supported: the module types the method can wrap (default: :func:`linear_types`).
        method: the method's name, for error messages.
        extend: adapter layer types that may be selected again (to add another named adapter to them).
        each_entry: every entry of a ``target_modules`` / ``exclude_modules`` list must match a module (a typo such as
            ``["query", "valeu"]`` would otherwise adapt ``query`` only, silently). False for files written elsewhere
            (a PEFT config may list names the model does not have).
        recomputes_linear: the method's layer computes the linear map from the module's weight instead of calling
            the module (LoRA, (IA)³, AdaLoRA), so linear subclasses that override ``forward`` are refused. None:
            whenever every ``supported`` type is a linear type.

    Raises:
        ValueError: nothing matches (the message lists candidate names), or a target already carries an adapter.
        TypeError: a matched module is not of a supported type, or (``recomputes_linear``) it is a linear subclass
            with its own ``forward`` (:func:`overrides_linear_forward`); the message names it and the fix.
    """
    supported = supported or linear_types()
    if isinstance(target_modules, str) and target_modules != "all-linear":
        try:
            re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regular expression: {err}") from None
    if not isinstance(target_modules, str) and not target_modules:
        raise ValueError(f"target_modules is empty: name the modules the {method} should wrap, e.g. ['q_proj', 'v_proj'], or 'all-linear'.")

    modules = dict(model.named_modules())
    wrapped = {n for n, m in modules.items() if isinstance(m, AdapterLayer)}
    supported_or_extended = supported + tuple(extend)
    hf_peft = {n for n, m in modules.items() if type(m).__module__.startswith("peft.")}

    if target_modules == "all-linear":
        heads = output_head_names(model)
        selected = [n for n, m in modules.items() if isinstance(m, supported_or_extended) and n not in heads and not _under(n, heads)]
    else:
        selected = [n for n in modules if n and match_name(n, target_modules)]
    if exclude_modules:
        selected = [n for n in selected if not match_name(n, exclude_modules)]
    # submodules of an adapter layer belong to it (its base layer, its adapter weights)
    selected = [n for n in selected if not any(n.startswith(w + ".") for w in wrapped if w)]

    if not selected:
        shown = _candidates(modules, supported)
        raise ValueError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matched no module of "
            f"{type(model).__name__}. Candidate module names: [{shown}]. Use names from that list, dotted suffixes, "
            f"a regular expression matching whole names, or 'all-linear'."
        )
    if each_entry:
        for arg, spec in (("target_modules", target_modules), ("exclude_modules", exclude_modules)):
            if spec is None or isinstance(spec, str):
                continue
            unmatched = [t for t in spec if not any(n and match_name(n, [t]) for n in modules)]
            if unmatched:
                shown = _candidates(modules, supported)
                raise ValueError(
                    f"{arg} entries {unmatched} match no module of {type(model).__name__} (a typo?). Every entry must name "
                    f"a module (its name or a dotted suffix). Candidate module names: [{shown}]."
                )

    already = [n for n in selected if (n in wrapped and not isinstance(modules[n], tuple(extend))) or n in hf_peft]
    if already:
        kinds = {type(modules[n]).__name__ for n in already}
        raise ValueError(
            f"{len(already)} target module(s) already carry an adapter ({', '.join(sorted(kinds))}), e.g. "
            f"{already[0]!r}. Adapters were injected before (another PEFT callback, PEFTMixin, inject(), or "
            f"Hugging Face PEFT). Use one {method} per model (combine the target_modules in one callback), or "
            f"start from the plain base model."
        )
    if hf_peft:
        raise ValueError(
            f"{type(model).__name__} is already wrapped by Hugging Face PEFT (e.g. module {sorted(hf_peft)[0]!r}). "
            "Pass the plain base model (PeftModel.get_base_model() after unload()) to lightning-peft."
        )

    bad = [(n, type(modules[n]).__name__) for n in selected if not isinstance(modules[n], supported_or_extended)]
    if bad:
        names = ", ".join(f"{n!r} ({t})" for n, t in bad[:10])
        ok = ", ".join(t.__name__ for t in supported)
        raise TypeError(
            f"The {method} cannot wrap {len(bad)} matched module(s) of unsupported type: {names}. Supported types: "
            f"{ok}. Point target_modules at those layers (e.g. the projections inside the block) or add "
            f"the unsupported names to exclude_modules."
        )

    if recomputes_linear is None:
        recomputes_linear = all(issubclass(t, linear_types()) for t in supported)
    own = [(n, type(modules[n])) for n in selected if overrides_linear_forward(modules[n])] if recomputes_linear else []
    if own:
        names = ", ".join(f"{n!r} ({t.__module__}.{t.__qualname__})" for n, t in own[:10]) + (", ..." if len(own) > 10 else "")
        how = (
            f"add them to exclude_modules (e.g. exclude_modules={[n for n, _ in own[:3]]})"
            if target_modules == "all-linear"
            else "leave them out of target_modules (target plain nn.Linear layers instead) or add them to exclude_modules"
        )
        raise TypeError(
            f"The {method} cannot wrap {len(own)} matched linear layer(s) whose class overrides forward: {names}. "
            f"Its layer recomputes x W^T + b from their weight, so the class's own forward would be silently lost "
            f"(the adapted model would differ from the base before any training, and unloading would give back a "
            f"plain nn.Linear). Either {how}, or make the class not override forward (do the extra computation in a "
            f"parent module). The model was left unchanged."
        )
    return selected
