"""UniPELT (Mao et al., 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning").

LoRA, prefix tuning and a serial bottleneck adapter in every block, each behind a learned gate computed from the
submodule's input, so the model learns per task (and per input) which submodule to rely on::

    LoRA (query, value):  h = W x + G_L(x) * s * B A x,            G_L(x) = sigmoid(W_GL x + b)   x: attention input
    prefix tuning:        P_k^l, P_v^l scaled by G_P = sigmoid(W_GP x + b) (a key and a value gate), x: attention input
    adapter (after FFN):  h_A = h_F + G_A(h_F) * W_up relu(W_down h_F),  G_A = sigmoid(W_GA h_F + b)   h_F: FFN output

The gates are the optional gates of the existing layers (:class:`~lightning_peft.methods._gate.Gate`, off by default
elsewhere): ``lora_gate`` on :class:`~lightning_peft.methods.lora.LoRALinear`, ``houlsby_gate`` on
:class:`~lightning_peft.methods.houlsby.HoulsbyAdapter`, ``prefix_gate`` on
:class:`~lightning_peft.methods.prefix_tuning.PrefixKV`. The LoRA and adapter gates are per token, as the paper's
formulas; the prefix gate is one value per sample (the mean over its real tokens), because the prefixes enter each
layer through the key/value cache, shared by every query token (see :mod:`lightning_peft.methods._prompt`).

Defaults (the paper's, through AdapterHub's UniPELT configuration): LoRA r = 8 on the query and value projections,
prefix length 10, adapter after the feed-forward sublayer with bottleneck hidden / 16 (48 for BERT-base, 24 for
all-MiniLM-L6-v2). LoRA alpha defaults to 16 (this package's LoRA default).

It is a composition: :func:`~lightning_peft.methods.lora.inject_lora`, then
:func:`~lightning_peft.methods.prefix_tuning.inject_prefix_tuning`, then
:func:`~lightning_peft.methods.houlsby.inject_houlsby`, each with ``gate=True``, in that order.

At init LoRA (``B = 0``) and the adapter (``W_up = 0``) add exactly zero whatever their gates: the model equals
the base model with the gated prefixes alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from torch import nn

from lightning_peft.methods._families import block_list
from lightning_peft.methods._hybrid import inject_in_order
from lightning_peft.methods._prompt import SoftPromptLayer, check_num_virtual_tokens
from lightning_peft.methods.houlsby import Activation, BottleneckLayer, Site, check_bottleneck_args, inject_houlsby
from lightning_peft.methods.lora import LoRALinear, check_lora_args, inject_lora
from lightning_peft.methods.prefix_tuning import inject_prefix_tuning
from lightning_peft.targeting import TargetSpec

__all__ = ["DEFAULT_LORA_TARGETS", "check_unipelt_args", "gate_means", "inject_unipelt"]

#: The query and value projections: BERT ``query`` / ``value``, Llama / Qwen2 / Mistral ``q_proj`` / ``v_proj``.
DEFAULT_LORA_TARGETS = ("query", "value", "q_proj", "v_proj")


def check_unipelt_args(r: int, alpha: float, lora_dropout: float, num_virtual_tokens: int, bottleneck_size: Optional[int],
                       reduction_factor: Optional[float], activation: str, adapter_sites: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the bad value and the fix."""
    check_lora_args(r, alpha, lora_dropout)
    check_num_virtual_tokens(num_virtual_tokens)
    check_bottleneck_args("UniPELT adapter", bottleneck_size, reduction_factor, activation, adapter_sites)


def inject_unipelt(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    lora_dropout: float = 0.0,
    lora_target_modules: TargetSpec = DEFAULT_LORA_TARGETS,
    num_virtual_tokens: int = 10,
    prefix_hidden_size: Optional[int] = None,
    bottleneck_size: Optional[int] = None,
    reduction_factor: Optional[float] = None,
    activation: Activation = "relu",
    adapter_sites: Sequence[Site] = ("ffn",),
    adapter_target_modules: Optional[TargetSpec] = None,
) -> list[str]:
    """Gated LoRA, gated prefix tuning and gated serial adapters, in place; returns the new layers' names.

    Args:
        model: a module holding a Hugging Face model (encoder or decoder LM).
        r: LoRA rank.
        alpha: LoRA scale numerator (``s = alpha / r``).
        lora_dropout: dropout on LoRA's input.
        lora_target_modules: LoRA's layers (default: the query and value projections, see :data:`DEFAULT_LORA_TARGETS`).
        num_virtual_tokens: prefix length.
        prefix_hidden_size: width of the prefixes' reparameterizing MLP; None: the model's hidden size.
        bottleneck_size: adapter bottleneck; or ``reduction_factor`` (hidden / factor; default 16).
        reduction_factor: see ``bottleneck_size``.
        activation: the adapter's nonlinearity.
        adapter_sites: with default adapter targets, ``"ffn"`` (the paper) and/or ``"attention"``.
        adapter_target_modules: modules whose output gets an adapter; None: found by name (see ``adapter_sites``).

    All or nothing: if a later part cannot be placed, the earlier ones are taken out again.
    """
    check_unipelt_args(r, alpha, lora_dropout, num_virtual_tokens, bottleneck_size, reduction_factor, activation, adapter_sites)
    targets = lora_target_modules if isinstance(lora_target_modules, str) else list(lora_target_modules)
    return inject_in_order(model, [
        lambda m: inject_lora(m, targets, r=r, alpha=alpha, dropout=lora_dropout, gate=True, strict=tuple(targets) != DEFAULT_LORA_TARGETS),
        lambda m: inject_prefix_tuning(m, num_virtual_tokens, projection=True, encoder_hidden_size=prefix_hidden_size, gate=True),
        lambda m: inject_houlsby(m, adapter_target_modules, None, bottleneck_size, reduction_factor, activation, tuple(adapter_sites), gate=True),
    ])


def gate_means(model: nn.Module) -> dict[str, float]:
    """The mean value of every gate in ``model`` at its last forward, keyed ``layer<i>/<gate>``.

    ``<gate>``: ``lora_<module>`` (e.g. ``lora_query``), ``prefix_key`` / ``prefix_value``, ``adapter`` (or
    ``adapter_<module path in the block>`` when a block has several). Gates that have not run yet are left out;
    gates outside the transformer blocks are keyed by their module name.
    """
    _, blocks = block_list(model)

    def where(name: str) -> tuple[str, str]:
        for i, block in enumerate(blocks):
            if name.startswith(block + "."):
                return f"layer{i}", name[len(block) + 1:]
        return "", name

    found: list[tuple[str, str, str, float]] = []  # (layer, label, path in block, value)
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            layer, path = where(name)
            for adapter, gate in m.lora_gate.items():
                if gate.last_mean is not None:
                    label = f"lora_{path.rsplit('.', 1)[-1]}" + ("" if adapter == "default" else f"_{adapter}")
                    found.append((layer, label, path, gate.last_mean.mean().item()))
        elif isinstance(m, BottleneckLayer) and m.gate is not None and m.gate.last_mean is not None:
            layer, path = where(name)
            found.append((layer, m.adapter_prefix.rstrip("_") if m.adapter_prefix != "houlsby_" else "adapter", path, m.gate.last_mean.mean().item()))
        elif isinstance(m, SoftPromptLayer) and m.gated:
            for i, gate in enumerate(m.prefix_gate):
                if gate.last_mean is not None:
                    found.append((f"layer{i}", "prefix_key", "", gate.last_mean[0].item()))
                    found.append((f"layer{i}", "prefix_value", "", gate.last_mean[1].item()))
    labels = [(layer, label) for layer, label, _, _ in found]
    out = {}
    for layer, label, path, value in found:
        if labels.count((layer, label)) > 1:  # e.g. adapters after both attention and FFN outputs
            label = f"{label}_{path.replace('.', '_')}"
        out[f"{layer}/{label}" if layer else label] = value
    return out
