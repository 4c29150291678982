"""Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

Every attention layer ``l`` attends to ``n`` learned key/value pairs before the real tokens::

    head_l(x) = softmax(q [P_k^l ; K_l(x)]^T / sqrt(d)) [P_v^l ; V_l(x)]

The prefixes of all layers form one matrix ``P ∈ R^{n × (layers · 2 · kv_heads · head_dim)}`` (Hugging Face
PEFT's layout). Li & Liang found training ``P`` directly unstable and reparameterize it during training::

    P = MLP(E),   E ∈ R^{n × hidden},   MLP = Linear(hidden, h) → tanh → Linear(h, width)

:meth:`PrefixKV.fold` computes ``P`` once and drops ``E`` and the MLP (for serving); the exported adapter holds
``P`` only, as PEFT's ``PREFIX_TUNING`` ``prompt_embeddings`` with ``prefix_projection=false`` (the stored tensor
*is* the per-layer prefixes, so PEFT loads it for inference or further training). Without the reparameterization
(``projection=False``) this is P-tuning v2 (:mod:`lightning_peft.methods.p_tuning_v2`).

The prefixes enter through the key/value cache (a ``DynamicCache`` holding them), so the model's own attention
is used unchanged; a model with no module taking the input and a cache is refused. See
:mod:`lightning_peft.methods._prompt` for the mask and position rules, and for gated prefixes (``gate=True``,
UniPELT: each layer's prefix keys and values scaled by a learned gate read from that layer's attention input).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from lightning_peft.methods._prompt import SoftPromptLayer, attach_prompt, check_peft_prompt_config, flat_prefixes, peft_prompt_config, prefix_width

__all__ = ["PrefixKV", "from_peft", "inject_prefix_tuning", "to_peft"]


class PrefixKV(SoftPromptLayer):
    """Per-layer key/value prefixes for a Hugging Face model, optionally through a reparameterizing MLP.

    Parameters: ``prefix_embedding`` ``(n, hidden)`` and ``prefix_mlp`` with ``projection``, else ``prefix_kv``
    ``(n, width)``. Initialised like PEFT's ``PrefixEncoder`` (standard normal embeddings, PyTorch's default
    linear init).

    Args:
        model: the Hugging Face model.
        num_virtual_tokens: ``n``, the prefix length.
        projection: train through the MLP (prefix tuning) or the prefixes directly (P-tuning v2).
        encoder_hidden_size: the MLP's hidden size ``h``; None: the model's hidden size.
        gate: gate each layer's prefix (``prefix_gate``; see :mod:`lightning_peft.methods._prompt`).
        adapter_name: the prefix's name: ``"default"`` is the model's ``prefix_tuning``, another name the sibling
            ``prefix_tuning_<name>`` (see :mod:`lightning_peft.methods._prompt`).
    """

    adapter_prefix = "prefix_"
    inserts_tokens = False
    attr_name = "prefix_tuning"

    def __init__(
        self, model: nn.Module, num_virtual_tokens: int = 20, projection: bool = True, encoder_hidden_size: Optional[int] = None, gate: bool = False,
        adapter_name: str = "default",
    ) -> None:
        super().__init__(model, num_virtual_tokens, adapter_name)
        if encoder_hidden_size is not None and (not isinstance(encoder_hidden_size, int) or encoder_hidden_size < 1):
            raise ValueError(f"encoder_hidden_size must be a positive integer or None (the model's hidden size), got {encoder_hidden_size!r}.")
        width, hidden = prefix_width(self.dims), self.dims["hidden"]
        device = model.get_input_embeddings().weight.device
        self.projection = projection
        if projection:
            h = encoder_hidden_size or hidden
            self.prefix_embedding = nn.Parameter(torch.randn(num_virtual_tokens, hidden, device=device))
            self.prefix_mlp = nn.Sequential(nn.Linear(hidden, h), nn.Tanh(), nn.Linear(h, width)).to(device)
        else:
            self.prefix_kv = nn.Parameter(torch.randn(num_virtual_tokens, width, device=device))
        if gate:
            self.add_prefix_gates()

    def flat(self) -> torch.Tensor:
        """``P``, ``(n, layers · 2 · kv_heads · head_dim)`` in PEFT's layout."""
        return self.prefix_mlp(self.prefix_embedding) if self.projection else self.prefix_kv

    def prefixes(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return flat_prefixes(self.flat(), self.dims)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the reparameterization by the prefixes it computes (serving needs no MLP). Safe to call twice."""
        if not self.projection:
            return
        flat = self.flat().detach().clone()
        del self.prefix_embedding, self.prefix_mlp
        self.prefix_kv = nn.Parameter(flat)
        self.projection = False

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, projection={self.projection}, gated={self.gated}"


def inject_prefix_tuning(
    module: nn.Module, num_virtual_tokens: int = 20, projection: bool = True, encoder_hidden_size: Optional[int] = None, gate: bool = False,
    adapter_name: str = "default",
) -> list[str]:
    """Add a :class:`PrefixKV` named ``adapter_name`` to the Hugging Face model in ``module``; returns the new layer's name."""
    return attach_prompt(module, lambda m: PrefixKV(m, num_virtual_tokens, projection, encoder_hidden_size, gate, adapter_name))


# -- Hugging Face PEFT format -----------------------------------------------------------------------
def to_peft(model: nn.Module, layers: list[tuple[str, PrefixKV]]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's ``PREFIX_TUNING`` files: the per-layer prefixes ``P`` (computed through the MLP if there is one)."""
    (_, layer), = layers
    if layer.gated:
        raise NotImplementedError(
            "Gated prefixes (UniPELT) have no Hugging Face PEFT format: PEFT's PREFIX_TUNING has no gates. Save a "
            "Lightning checkpoint instead (the callbacks keep the adapter, gates included)."
        )
    config = {
        **peft_prompt_config(model, layer, "PREFIX_TUNING"),
        "encoder_hidden_size": layer.dims["hidden"],
        "prefix_projection": False,  # the file holds the prefixes themselves
        "init_weights": None,
    }
    return config, {"prompt_embeddings": layer.flat().detach().float().cpu()}


def from_peft(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], adapter_name: str = "default") -> list[str]:
    """Add a :class:`PrefixKV` (without MLP) named ``adapter_name`` holding PEFT's prefixes to the Hugging Face ``model``."""
    probe = PrefixKV(model, config["num_virtual_tokens"], projection=False, adapter_name=adapter_name)
    expected = (probe.num_virtual_tokens, prefix_width(probe.dims))
    # PEFT records the key/value width: heads x head size of the keys (GQA models have fewer key/value heads)
    if config.get("token_dim") not in (None, probe.dims["kv_heads"] * probe.dims["head_dim"]) or config.get("num_layers") not in (None, probe.dims["layers"]):
        raise ValueError(
            f"The prefixes were made for token_dim={config.get('token_dim')}, num_layers={config.get('num_layers')}; "
            f"{type(model).__name__} has {probe.dims['kv_heads'] * probe.dims['head_dim']} and {probe.dims['layers']}."
        )
    values = check_peft_prompt_config(model, config, tensors, expected)
    with torch.no_grad():
        probe.prefix_kv.copy_(values)
    probe.attach(model)
    return [probe.module_name]
