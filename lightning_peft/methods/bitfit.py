"""BitFit: bias-terms fine-tuning (Ben Zaken et al., 2022).

Only the base model's bias vectors train; every weight matrix stays frozen::

    h = x W^T + b        W frozen, b trained

No parameter is added: the trained biases are *changed* base parameters (``count_parameters(...).changed``),
and an adapter checkpoint holds exactly them. ``biases`` picks a subset, e.g. the paper's query biases and
the second MLP layer's (``["query", "intermediate.dense"]`` on BERT). Models built without biases (Llama,
Mistral, Qwen2's MLP) have little or nothing to train: use (IA)³ or LoRA there.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_peft.targeting import TargetSpec, match_name

__all__ = ["apply_bitfit", "find_biases"]


def _bias_owners(model: nn.Module) -> dict[str, str]:
    """``{module name: qualified bias name}`` for every module with a trainable-shaped ``bias`` parameter."""
    owners = {}
    for mod_name, module in model.named_modules():
        bias = module._parameters.get("bias")
        if isinstance(bias, nn.Parameter):
            owners[mod_name] = f"{mod_name}.bias" if mod_name else "bias"
    return owners


def find_biases(model: nn.Module, biases: Optional[TargetSpec] = None, exclude_modules: Optional[TargetSpec] = None) -> list[str]:
    """Qualified names of the bias parameters BitFit trains.

    Args:
        model: any module.
        biases: None for every bias; else the modules whose bias trains, as a list of names / dotted
            suffixes (``["query", "output.dense"]``) or a regular expression matching whole module names.
        exclude_modules: modules whose bias stays frozen, same forms.

    Raises:
        ValueError: the model has no bias at all (the message suggests (IA)³ or LoRA), or ``biases``
            matches no module that has one (the message lists those that do).
    """
    owners = _bias_owners(model)
    if not owners:
        raise ValueError(
            f"BitFit found no bias parameter in {type(model).__name__}: its layers are built without biases "
            "(as Llama-style models are), so BitFit has nothing to train. Use IA3() or LoRA() for this model."
        )
    selected = [m for m in owners if biases is None or match_name(m, biases)]
    if exclude_modules:
        selected = [m for m in selected if not match_name(m, exclude_modules)]
    if not selected:
        shown = sorted({m.split(".")[-1] or "<root>" for m in owners})
        raise ValueError(
            f"BitFit: biases={biases!r} (exclude_modules={exclude_modules!r}) matched no module with a bias in "
            f"{type(model).__name__}. Modules with biases are named {shown[:20]}{', ...' if len(shown) > 20 else ''}; "
            "give names or dotted suffixes from that list, a regular expression matching whole names, or None for all."
        )
    return [owners[m] for m in selected]


def apply_bitfit(model: nn.Module, biases: Optional[TargetSpec] = None, exclude_modules: Optional[TargetSpec] = None) -> list[str]:
    """Freeze ``model`` except the chosen biases (see :func:`find_biases`); returns their names."""
    names = set(find_biases(model, biases, exclude_modules))
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    return sorted(names)
