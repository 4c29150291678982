"""Houlsby adapters (Houlsby et al., 2019): a bottleneck after the attention and feed-forward outputs.

Each block's attention output projection and feed-forward output projection ``f`` get a residual
bottleneck on their output::

    h = f(x)
    h = h + W_up act(W_down h + b_down) + b_up,      W_down: m x d,  W_up: d x m,  W_up = b_up = 0 at init

``m`` (the bottleneck size) is given directly or as ``d / reduction_factor``. ``W_up`` and ``b_up`` start
at zero, so the model's outputs are unchanged at step 0; ``W_down`` starts like ``nn.Linear``'s weight.
The block's own residual connection and LayerNorm come after, as in the paper. The nonlinearity makes
the adapter unmergeable.

The bottleneck is shared with :mod:`lightning_peft.methods.parallel_adapter`.

Gate (optional, off by default; UniPELT, Mao et al., 2022): :meth:`BottleneckLayer.add_gate` scales the
bottleneck's output by a learned gate read from the adapter's input, per token (``houlsby_gate``)::

    h = h + g(h) * bottleneck(h),      g(h) = sigmoid(h W_g^T + b_g)

Wrapping keeps names. The adapter layer takes over the wrapped module's own parameters and children under
their names (a wrapped ``o_proj`` still has ``o_proj.weight``; a wrapped ``mlp`` still has
``mlp.down_proj.weight``) and calls the original module's ``forward``, so base checkpoints load unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.core import AdapterLayer
from lightning_peft.methods._gate import Gate
from lightning_peft.methods._families import describe, output_projections
from lightning_peft.targeting import TargetSpec, find_targets, linear_types

__all__ = ["BottleneckLayer", "HoulsbyAdapter", "check_bottleneck_args", "inject_houlsby", "resolve_bottleneck"]

Activation = Literal["relu", "gelu", "silu", "tanh"]
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
Site = Literal["attention", "ffn"]


def check_bottleneck_args(
    method: str, bottleneck_size: Optional[int], reduction_factor: Optional[float], activation: str, sites: Any = ("attention",)
) -> None:
    """Raise ``ValueError`` naming the bad value and the fix."""
    if bottleneck_size is not None and reduction_factor is not None:
        raise ValueError(
            f"{method}: give bottleneck_size or reduction_factor, not both (got bottleneck_size={bottleneck_size!r}, "
            f"reduction_factor={reduction_factor!r})."
        )
    if bottleneck_size is not None and (not isinstance(bottleneck_size, int) or isinstance(bottleneck_size, bool) or bottleneck_size <= 0):
        raise ValueError(f"{method}: bottleneck_size must be a positive integer, got {bottleneck_size!r}. Typical values: 16, 64.")
    if reduction_factor is not None and (not isinstance(reduction_factor, (int, float)) or isinstance(reduction_factor, bool) or not reduction_factor > 0):
        raise ValueError(f"{method}: reduction_factor must be > 0, got {reduction_factor!r}. Typical values: 16, 32 (bottleneck = hidden / factor).")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{method}: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}.")
    if isinstance(sites, str) or not sites or any(s not in ("attention", "ffn") for s in sites):
        raise ValueError(f"{method}: sites must be a non-empty list of 'attention' and/or 'ffn', got {sites!r}.")


def resolve_bottleneck(hidden: int, bottleneck_size: Optional[int], reduction_factor: Optional[float]) -> int:
    """The bottleneck width: ``bottleneck_size``, else ``hidden / reduction_factor`` (default factor 16), at least 1."""
    if bottleneck_size is not None:
        return bottleneck_size
    return max(1, round(hidden / (reduction_factor if reduction_factor is not None else 16.0)))


def _hidden_size(module: nn.Module) -> int:
    """Output width of a linear layer, or of the last linear layer inside a sublayer."""
    linears = [m for m in module.modules() if isinstance(m, linear_types())]
    if not linears:
        raise TypeError(
            f"A bottleneck adapter needs the hidden size of {type(module).__name__}, read from its (last) linear "
            "layer, and it has none. Target a linear layer or a sublayer that contains one."
        )
    last = linears[-1]
    return last.weight.shape[1] if not isinstance(last, nn.Linear) else last.weight.shape[0]


class BottleneckLayer(AdapterLayer):
    """Wraps a module and owns a bottleneck ``x -> W_up act(W_down x + b_down) + b_up`` (``W_up = 0`` at init).

    The wrapped module's direct parameters, buffers and children are registered on this layer under
    their own names; ``forward`` still runs the original module. Subclasses set ``adapter_prefix`` and
    write ``forward``.
    """

    def __init__(self, base: nn.Module, bottleneck: int, activation: Activation = "relu", hidden: Optional[int] = None) -> None:
        super().__init__()
        hidden = hidden if hidden is not None else _hidden_size(base)
        self.__dict__["_base"] = base  # not a child: its parameters are registered below under their own names
        for name, p in base.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in base.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in base._non_persistent_buffers_set)
        for name, child in base.named_children():
            self.add_module(name, child)
        ref = next(base.parameters(), None)
        dtype = ref.dtype if ref is not None and ref.dtype.is_floating_point else torch.float32
        device = ref.device if ref is not None else None
        p = self.adapter_prefix
        self.register_parameter(f"{p}down", nn.Parameter(torch.empty(bottleneck, hidden, dtype=dtype, device=device)))
        self.register_parameter(f"{p}down_bias", nn.Parameter(torch.zeros(bottleneck, dtype=dtype, device=device)))
        self.register_parameter(f"{p}up", nn.Parameter(torch.zeros(hidden, bottleneck, dtype=dtype, device=device)))
        self.register_parameter(f"{p}up_bias", nn.Parameter(torch.zeros(hidden, dtype=dtype, device=device)))
        self.hidden, self.bottleneck, self.activation = hidden, bottleneck, activation
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        p = self.adapter_prefix
        down = getattr(self, f"{p}down")
        if down.is_meta:
            return
        with torch.no_grad():
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # nn.Linear's default
            for name in ("down_bias", "up", "up_bias"):
                getattr(self, f"{p}{name}").zero_()

    def bottleneck_forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.adapter_prefix
        down, down_b = getattr(self, f"{p}down"), getattr(self, f"{p}down_bias")
        up, up_b = getattr(self, f"{p}up"), getattr(self, f"{p}up_bias")
        z = _ACTIVATIONS[self.activation](F.linear(x, down.to(x.dtype), down_b.to(x.dtype)))  # (..., m)
        return F.linear(z, up.to(x.dtype), up_b.to(x.dtype))  # (..., d)

    @property
    def gate(self) -> Optional[Gate]:
        """The gate (``<prefix>gate``) if :meth:`add_gate` was called, else None."""
        return self._modules.get(f"{self.adapter_prefix}gate")

    def add_gate(self) -> Gate:
        """Scale the bottleneck's output by ``sigmoid(x W_g^T + b_g)`` read from the adapter's input ``x`` (UniPELT)."""
        if self.gate is None:
            down = getattr(self, f"{self.adapter_prefix}down")
            self.add_module(f"{self.adapter_prefix}gate", Gate(self.hidden, 1, dtype=down.dtype, device=down.device))
        return self.gate

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``bottleneck(x)``, times the gate ``g(x)`` when there is one."""
        out = self.bottleneck_forward(x)
        gate = self.gate
        return out * gate(x) if gate is not None else out

    def run_base(self, *args: Any, **kwargs: Any) -> Any:
        base = self.__dict__["_base"]
        for name, buf in self._buffers.items():  # .to(device) replaced our buffer entries, not the base's
            base._buffers[name] = buf
        return base(*args, **kwargs)

    def base_layer(self) -> nn.Module:
        base = self.__dict__["_base"]
        for name, buf in self._buffers.items():
            base._buffers[name] = buf
        return base

    def extra_repr(self) -> str:
        return f"base={type(self.__dict__['_base']).__name__}, hidden={self.hidden}, bottleneck={self.bottleneck}, activation={self.activation}"


class HoulsbyAdapter(BottleneckLayer):
    """``h = f(x); h + bottleneck(h)``: a Houlsby adapter on the output of the wrapped module ``f``.

    If ``f`` returns a tuple (an attention module), the adapter acts on its first element.
    """

    adapter_prefix = "houlsby_"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.run_base(*args, **kwargs)
        if self.disabled:
            return out
        h = out[0] if isinstance(out, tuple) else out
        h = h + self.adapter_forward(h)
        return (h, *out[1:]) if isinstance(out, tuple) else h


def _supported(target_modules: Optional[TargetSpec]) -> tuple[type[nn.Module], ...]:
    return linear_types() if target_modules == "all-linear" else (nn.Module,)


def default_houlsby_targets(model: nn.Module, sites: tuple[str, ...] = ("attention", "ffn")) -> list[str]:
    """Attention-output and feed-forward-output projections of every block, found by known names.

    Raises:
        ValueError: none found; the message names what was looked for.
    """
    _, names = output_projections(model, tuple(sites))
    if not names:
        raise ValueError(
            f"Found no attention-output or feed-forward-output projection in {type(model).__name__} to put Houlsby "
            f"adapters after. Looked for (family: attention + feed-forward suffixes) {describe('outputs')}. "
            "Pass target_modules with the output projections of your blocks."
        )
    return names


def inject_houlsby(
    model: nn.Module,
    target_modules: Optional[TargetSpec] = None,
    exclude_modules: Optional[TargetSpec] = None,
    bottleneck_size: Optional[int] = None,
    reduction_factor: Optional[float] = None,
    activation: Activation = "relu",
    sites: tuple[Site, ...] = ("attention", "ffn"),
    gate: bool = False,
) -> list[str]:
    """Put a :class:`HoulsbyAdapter` after each target module of ``model``, in place; returns their names.

    Args:
        model: any module; Hugging Face BERT / Llama / Qwen2 / GPT-2 blocks are found by name.
        target_modules: modules whose output gets an adapter; None: the attention-output and/or
            feed-forward-output projections of every block (see ``sites``).
        exclude_modules: modules to leave alone.
        bottleneck_size: bottleneck width ``m``; or give ``reduction_factor`` (``m = d / factor``, default 16).
        reduction_factor: see ``bottleneck_size``.
        activation: the bottleneck's nonlinearity.
        sites: with default targets, ``"attention"`` and/or ``"ffn"``.
        gate: put each adapter behind a learned gate read from its input (UniPELT; :meth:`BottleneckLayer.add_gate`).

    All targets are validated and all layers built before the first one is swapped in.
    """
    check_bottleneck_args("Houlsby", bottleneck_size, reduction_factor, activation, sites)
    targets = target_modules if target_modules is not None else default_houlsby_targets(model, tuple(sites))
    # the adapter calls the wrapped module itself, so a linear subclass keeps its own forward: no refusal needed
    names = find_targets(model, targets, exclude_modules, supported=_supported(target_modules), method="Houlsby adapter", recomputes_linear=False)
    new = {}
    for n in names:
        base = model.get_submodule(n)
        hidden = _hidden_size(base)
        new[n] = HoulsbyAdapter(base, resolve_bottleneck(hidden, bottleneck_size, reduction_factor), activation, hidden)
        if gate:
            new[n].add_gate()
    for name, layer in new.items():
        model.set_submodule(name, layer)
    return names
