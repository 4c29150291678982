"""Parallel adapters (He et al., 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning").

The Houlsby bottleneck (:mod:`lightning_peft.methods.houlsby`) runs beside a whole sublayer ``f`` (the
feed-forward network, or attention) instead of after it: it reads the sublayer's input and its scaled
output is added to the sublayer's output::

    h = f(x) + s * (W_up act(W_down x + b_down) + b_up),     W_up = b_up = 0 at init

``s`` is the scaling factor (4 in the paper's "scaled parallel adapter" on the FFN, a building block of
the MAM adapter). The block's residual connection is unchanged, so the model is unchanged at step 0.

Sublayers are found by name: Llama/Qwen2 ``mlp`` / ``self_attn``, GPT-2 ``mlp`` / ``attn``, BERT ``output`` /
``attention.output``. BERT's residual lives *inside* those modules (``LayerNorm(dropout(dense(h)) +
input_tensor)``, where ``input_tensor`` is the sublayer's input ``x``), so there the adapter is added to
``input_tensor``: ``LayerNorm(dense(h) + x + s * adapter(x))``, exactly the sum above before the LayerNorm.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import nn

from lightning_peft.methods._families import describe, sublayers
from lightning_peft.methods.houlsby import (
    Activation,
    BottleneckLayer,
    Site,
    _hidden_size,
    _supported,
    check_bottleneck_args,
    resolve_bottleneck,
)
from lightning_peft.targeting import TargetSpec, find_targets

__all__ = ["ParallelAdapter", "check_scaling", "inject_parallel_adapter"]


def check_scaling(scaling: float) -> None:
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not scaling > 0:
        raise ValueError(f"Parallel adapter: scaling must be > 0, got {scaling!r}. The paper uses 4 on the feed-forward sublayer.")


class ParallelAdapter(BottleneckLayer):
    """``f(x) + s * bottleneck(x)`` around a sublayer ``f``.

    The sublayer's input ``x`` is its first positional argument or its ``hidden_states`` keyword; if its
    ``forward`` takes an ``input_tensor`` (BERT's output modules, which add the residual themselves), the
    adapter's output is added to ``input_tensor`` instead (see the module docstring). Tuple outputs
    (attention modules) get the adapter on their first element.

    Args:
        base: the sublayer.
        bottleneck: bottleneck width.
        activation: the bottleneck's nonlinearity.
        scaling: ``s``.
        hidden: the hidden size (default: the width of ``base``'s last linear layer).
    """

    adapter_prefix = "parallel_"

    def __init__(self, base: nn.Module, bottleneck: int, activation: Activation = "relu", scaling: float = 4.0, hidden: Optional[int] = None) -> None:
        check_scaling(scaling)
        super().__init__(base, bottleneck, activation, hidden)
        self.scaling = float(scaling)
        self.residual_input = "input_tensor" in inspect.signature(base.forward).parameters

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter_forward(x) * self.scaling

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled:
            return self.run_base(*args, **kwargs)
        if self.residual_input:  # BERT: forward(hidden_states, input_tensor) adds input_tensor before its LayerNorm
            if "input_tensor" in kwargs:
                x = kwargs["input_tensor"]
                kwargs["input_tensor"] = x + self._adapter(x)
            else:
                x = args[1]
                args = (args[0], x + self._adapter(x), *args[2:])
            return self.run_base(*args, **kwargs)
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        out = self.run_base(*args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        h = h + self._adapter(x)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scaling={self.scaling}"


def default_parallel_targets(model: nn.Module, sites: tuple[str, ...] = ("ffn",)) -> list[str]:
    """The feed-forward and/or attention sublayers of every block, found by known names.

    Raises:
        ValueError: none found; the message names what was looked for.
    """
    _, names = sublayers(model, tuple(sites))
    if not names:
        raise ValueError(
            f"Found no attention or feed-forward sublayer in {type(model).__name__} to put parallel adapters beside. "
            f"Looked for (family: attention + feed-forward module suffixes) {describe('sublayers')}. Pass "
            "target_modules with your blocks' sublayer modules (e.g. ['mlp'])."
        )
    return names


def inject_parallel_adapter(
    model: nn.Module,
    target_modules: Optional[TargetSpec] = None,
    exclude_modules: Optional[TargetSpec] = None,
    bottleneck_size: Optional[int] = None,
    reduction_factor: Optional[float] = None,
    activation: Activation = "relu",
    scaling: float = 4.0,
    sites: tuple[Site, ...] = ("ffn",),
) -> list[str]:
    """Put a :class:`ParallelAdapter` beside each target sublayer of ``model``, in place; returns their names.

    Args:
        model: any module; Hugging Face BERT / Llama / Qwen2 / GPT-2 sublayers are found by name.
        target_modules: sublayers to adapt; None: the feed-forward and/or attention sublayers (``sites``).
        exclude_modules: modules to leave alone.
        bottleneck_size: bottleneck width; or ``reduction_factor`` (``hidden / factor``, default 16).
        reduction_factor: see ``bottleneck_size``.
        activation: the bottleneck's nonlinearity.
        scaling: ``s``, the factor on the adapter's output.
        sites: with default targets, ``"ffn"`` and/or ``"attention"``.
    """
    check_bottleneck_args("Parallel adapter", bottleneck_size, reduction_factor, activation, sites)
    check_scaling(scaling)
    targets = target_modules if target_modules is not None else default_parallel_targets(model, tuple(sites))
    # the adapter calls the wrapped module itself, so a linear subclass keeps its own forward: no refusal needed
    names = find_targets(model, targets, exclude_modules, supported=_supported(target_modules), method="parallel adapter", recomputes_linear=False)
    new = {}
    for n in names:
        base = model.get_submodule(n)
        hidden = _hidden_size(base)
        new[n] = ParallelAdapter(base, resolve_bottleneck(hidden, bottleneck_size, reduction_factor), activation, scaling, hidden)
    for name, layer in new.items():
        model.set_submodule(name, layer)
    return names
