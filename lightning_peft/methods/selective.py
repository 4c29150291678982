"""Selective fine-tuning: train only the parameters that patterns pick, freeze the rest.

Patterns (a list; a parameter trains if any pattern picks it):

* ``"top:K"`` / ``"bottom:K"``: the last / first ``K`` transformer blocks (the model's ``nn.ModuleList`` of
  blocks: BERT ``encoder.layer``, Llama/Qwen2 ``model.layers``, GPT-2 ``transformer.h``);
* ``"blocks:I-J"`` or ``"blocks:I"``: blocks ``I`` to ``J`` inclusive, counted from 0;
* ``"head"``: the task head (modules named ``classifier``, ``score``, and an ``lm_head`` not tied to the
  input embeddings: a tied one *is* the embedding matrix);
* ``"type:REGEX"``: every module whose class name matches ``REGEX`` whole (``"type:LayerNorm"``,
  ``"type:.*Norm"`` for LayerNorm and RMSNorm);
* ``"param:REGEX"``: every parameter whose qualified name matches ``REGEX`` whole;
* anything else: a module or parameter name, or a dotted suffix of one (``"classifier"``, ``"pooler.dense"``,
  ``"LayerNorm"``, ``"bias"``).

No parameter is added: trained parameters are *changed* base parameters, and an adapter checkpoint holds
only them. :func:`select_parameters` validates every pattern and reports all that match nothing at once.
"""

from __future__ import annotations

import re

from torch import nn

from lightning_peft.methods._families import block_list
from lightning_peft.targeting import output_head_names

__all__ = ["apply_selective", "check_patterns", "head_names", "select_parameters"]

_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def check_patterns(patterns: object, what: str = "train") -> None:
    """Raise ``ValueError``/``TypeError`` for malformed patterns (before any model is seen)."""
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
        raise TypeError(f"Selective: {what} must be a list of patterns, got {type(patterns).__name__}: {patterns!r}. E.g. ['top:2', 'head'].")
    if not patterns:
        raise ValueError(f"Selective: {what}=[] selects nothing to train. E.g. ['top:2', 'head'], ['type:LayerNorm'], ['classifier'].")
    bad = []
    for p in patterns:
        if not isinstance(p, str) or not p:
            bad.append(f"{p!r} (not a non-empty string)")
        elif p.startswith(("top:", "bottom:")):
            k = p.split(":", 1)[1]
            if not k.isdigit() or int(k) < 1:
                bad.append(f"{p!r} (K must be a positive integer, e.g. 'top:4')")
        elif p.startswith("blocks:"):
            m = _RANGE.fullmatch(p.split(":", 1)[1])
            if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
                bad.append(f"{p!r} (expected 'blocks:I-J' with I <= J, or 'blocks:I')")
        elif p.startswith(("type:", "param:")):
            try:
                re.compile(p.split(":", 1)[1])
            except re.error as err:
                bad.append(f"{p!r} (not a valid regular expression: {err})")
    if bad:
        raise ValueError(f"Selective: bad pattern(s) in {what}: {'; '.join(bad)}.")


def _tied_to_input(model: nn.Module, head: nn.Module) -> bool:
    weight = getattr(head, "weight", None)
    for m in model.modules():
        get_in = getattr(m, "get_input_embeddings", None)
        if callable(get_in):
            try:
                emb = get_in()
            except (NotImplementedError, AttributeError):
                continue
            if isinstance(emb, nn.Module) and getattr(emb, "weight", None) is weight is not None:
                return True
    return False


def head_names(model: nn.Module) -> list[str]:
    """Qualified names of the task head modules (see the module docstring); tied LM heads are left out."""
    names = sorted(output_head_names(model))
    top = [n for n in names if not any(n.startswith(o + ".") for o in names)]
    return [n for n in top if not _tied_to_input(model, model.get_submodule(n))]


def _params_under(model: nn.Module, module_name: str) -> list[str]:
    prefix = f"{module_name}." if module_name else ""
    return [prefix + n for n, _ in model.get_submodule(module_name).named_parameters()]


def _blocks(model: nn.Module, pattern: str) -> list[str]:
    _, blocks = block_list(model)
    kind, arg = pattern.split(":", 1)
    if kind == "top":
        chosen = blocks[-int(arg):]
    elif kind == "bottom":
        chosen = blocks[: int(arg)]
    else:
        m = _RANGE.fullmatch(arg)
        i, j = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        chosen = blocks[i : j + 1]
    return chosen


def select_parameters(model: nn.Module, patterns: list[str]) -> list[str]:
    """Qualified names of the parameters ``patterns`` pick (see the module docstring), sorted.

    Raises:
        ValueError: patterns that match nothing, all named in one message with what the model offers.
    """
    check_patterns(patterns)
    params = [n for n, _ in model.named_parameters()]
    modules = dict(model.named_modules())
    picked: set[str] = set()
    problems = []
    for p in patterns:
        found: list[str] = []
        if p.startswith(("top:", "bottom:", "blocks:")):
            n_blocks = len(block_list(model)[1])
            if not n_blocks:
                problems.append(f"{p!r}: {type(model).__name__} has no list of transformer blocks (looked for an nn.ModuleList such as encoder.layer, model.layers, transformer.h)")
                continue
            kind, arg = p.split(":", 1)
            last = int(arg) - 1 if kind in ("top", "bottom") else int(_RANGE.fullmatch(arg).group(2) or _RANGE.fullmatch(arg).group(1))
            if last >= n_blocks:
                problems.append(f"{p!r}: out of range, the model has {n_blocks} blocks (0-{n_blocks - 1})")
                continue
            found = [q for b in _blocks(model, p) for q in _params_under(model, b)]
        elif p == "head":
            heads = head_names(model)
            if not heads:
                problems.append("'head': no task head found (looked for modules named classifier, score, or an untied lm_head)")
                continue
            found = [q for h in heads for q in _params_under(model, h)]
        elif p.startswith("type:"):
            rx = p.split(":", 1)[1]
            found = [q for n, m in modules.items() if re.fullmatch(rx, type(m).__name__) for q in _params_under(model, n)]
            if not found:
                types = sorted({type(m).__name__ for m in modules.values() if any(True for _ in m.parameters(recurse=False))})
                problems.append(f"{p!r}: no module class matches; classes with parameters: {types[:20]}")
                continue
        elif p.startswith("param:"):
            rx = p.split(":", 1)[1]
            found = [q for q in params if re.fullmatch(rx, q)]
            if not found:
                problems.append(f"{p!r}: no parameter name matches the whole regular expression, e.g. {params[:3]}")
                continue
        else:
            mods = [n for n in modules if n and (n == p or n.endswith("." + p))]
            found = [q for n in mods for q in _params_under(model, n)] + [q for q in params if q == p or q.endswith("." + p)]
            if not found:
                shown = sorted({n.split(".")[-1] for n in modules if n and not n.split(".")[-1].isdigit()})
                problems.append(f"{p!r}: no module or parameter has that name or dotted suffix; module names: {shown[:20]}")
                continue
        picked.update(found)
    if problems:
        raise ValueError(f"Selective: {len(problems)} pattern(s) matched nothing in {type(model).__name__}:\n  " + "\n  ".join(problems))
    canonical = {id(p): n for n, p in model.named_parameters()}  # a tied parameter has one name there
    return sorted({canonical[id(model.get_parameter(n))] for n in picked})


def apply_selective(model: nn.Module, patterns: list[str]) -> list[str]:
    """Freeze ``model`` except the parameters ``patterns`` pick; returns their names."""
    names = set(select_parameters(model, patterns))
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    return sorted(names)
