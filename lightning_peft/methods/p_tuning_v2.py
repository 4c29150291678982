"""P-tuning v2 (Liu et al., 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally
Across Scales and Tasks").

Deep prompts: ``n`` learned key/value pairs at every attention layer, trained *directly* (no reparameterizing
MLP), which works for classification and sequence-labelling heads as well as for LMs::

    head_l(x) = softmax(q [P_k^l ; K_l(x)]^T / sqrt(d)) [P_v^l ; V_l(x)],   P = prefix_kv ∈ R^{n × (layers·2·kv_heads·head_dim)}

It is prefix tuning without the projection, so it reuses :class:`~lightning_peft.methods.prefix_tuning.PrefixKV`
(``projection=False``) and exports as Hugging Face PEFT's ``PREFIX_TUNING`` with ``prefix_projection=false``, which
is what PEFT itself documents as P-tuning v2.
"""

from __future__ import annotations

from torch import nn

from lightning_peft.methods._prompt import attach_prompt
from lightning_peft.methods.prefix_tuning import PrefixKV

__all__ = ["DeepPrompt", "inject_p_tuning_v2"]


class DeepPrompt(PrefixKV):
    """Per-layer prompts (``prefix_kv``) trained directly: :class:`PrefixKV` without the MLP.

    Args:
        model: the Hugging Face model.
        num_virtual_tokens: ``n``, the prompt length at every layer.
    """

    attr_name = "p_tuning_v2"

    def __init__(self, model: nn.Module, num_virtual_tokens: int = 20, projection: bool = False) -> None:
        if projection:
            raise ValueError("P-tuning v2 trains its prompts directly (projection=False); for the reparameterized form use prefix tuning.")
        super().__init__(model, num_virtual_tokens, projection=False)


def inject_p_tuning_v2(module: nn.Module, num_virtual_tokens: int = 20) -> list[str]:
    """Add a :class:`DeepPrompt` to the Hugging Face model in ``module``; returns the new layer's name."""
    return attach_prompt(module, lambda m: DeepPrompt(m, num_virtual_tokens))
