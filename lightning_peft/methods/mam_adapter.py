"""MAM adapter (He et al., 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning").

"Mix-And-Match": the paper's best combination of its design dimensions, prefix tuning on the attention sublayer and
a scaled parallel adapter on the feed-forward sublayer of every block::

    head_l(x) = softmax(q [P_k^l ; K_l(x)]^T / sqrt(d)) [P_v^l ; V_l(x)],   P = MLP(E), l = 30 prefixes
    h = FFN(x) + s * (W_up relu(W_down x + b_down) + b_up),                  s = 4, W_up = b_up = 0 at init

The paper's defaults: prefix length 30, FFN bottleneck 512 on its 1024-wide models (hidden / 2), scaling 4. Here
the bottleneck defaults to hidden / 2 (512 for a 1024-wide model, 384 for 768, 192 for all-MiniLM-L6-v2's 384),
and the prefix MLP's width to the model's hidden size (the paper used 800 on its 1024-wide models).

It is a composition, nothing more: :func:`~lightning_peft.methods.prefix_tuning.inject_prefix_tuning` then
:func:`~lightning_peft.methods.parallel_adapter.inject_parallel_adapter`, in that order (so the same seed gives
the same parameters as the two injected by hand in that order).

At init the parallel adapters add exactly zero (``W_up = b_up = 0``): the model equals the base model with the
prefixes alone. The prefixes themselves change the attention from step 0 (as prefix tuning always does).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_peft.methods._hybrid import inject_in_order
from lightning_peft.methods._prompt import check_num_virtual_tokens
from lightning_peft.methods.houlsby import Activation, check_bottleneck_args
from lightning_peft.methods.parallel_adapter import check_scaling, inject_parallel_adapter
from lightning_peft.methods.prefix_tuning import inject_prefix_tuning
from lightning_peft.targeting import TargetSpec

__all__ = ["DEFAULT_REDUCTION_FACTOR", "check_mam_args", "inject_mam_adapter", "mam_reduction_factor"]

#: FFN bottleneck = hidden / 2 when neither a size nor a factor is given (512 on the paper's 1024-wide models).
DEFAULT_REDUCTION_FACTOR = 2.0


def mam_reduction_factor(bottleneck_size: Optional[int], reduction_factor: Optional[float]) -> Optional[float]:
    """The reduction factor the parallel adapter gets: the default (2) when neither value is given."""
    return DEFAULT_REDUCTION_FACTOR if bottleneck_size is None and reduction_factor is None else reduction_factor


def check_mam_args(num_virtual_tokens: int, bottleneck_size: Optional[int], reduction_factor: Optional[float], scaling: float, activation: str) -> None:
    """Raise ``ValueError`` naming the bad value and the fix."""
    check_num_virtual_tokens(num_virtual_tokens)
    check_bottleneck_args("MAM adapter", bottleneck_size, reduction_factor, activation, ("ffn",))
    check_scaling(scaling)


def inject_mam_adapter(
    model: nn.Module,
    num_virtual_tokens: int = 30,
    prefix_hidden_size: Optional[int] = None,
    bottleneck_size: Optional[int] = None,
    reduction_factor: Optional[float] = None,
    scaling: float = 4.0,
    activation: Activation = "relu",
    ffn_target_modules: Optional[TargetSpec] = None,
) -> list[str]:
    """Prefix tuning plus a scaled parallel adapter beside each feed-forward sublayer, in place; returns the new layers' names.

    Args:
        model: a module holding a Hugging Face model (encoder or decoder LM).
        num_virtual_tokens: prefix length ``l`` (30 in the paper).
        prefix_hidden_size: width of the prefixes' reparameterizing MLP; None: the model's hidden size.
        bottleneck_size: FFN adapter bottleneck; or ``reduction_factor``; neither: hidden / 2.
        reduction_factor: see ``bottleneck_size``.
        scaling: ``s`` on the parallel adapter's output (4 in the paper).
        activation: the bottleneck's nonlinearity.
        ffn_target_modules: the feed-forward sublayers; None: found by name (BERT ``output``, Llama/GPT-2 ``mlp``).

    All or nothing: if the parallel adapters cannot be placed, the prefix is taken out again.
    """
    check_mam_args(num_virtual_tokens, bottleneck_size, reduction_factor, scaling, activation)
    factor = mam_reduction_factor(bottleneck_size, reduction_factor)
    return inject_in_order(model, [
        lambda m: inject_prefix_tuning(m, num_virtual_tokens, projection=True, encoder_hidden_size=prefix_hidden_size),
        lambda m: inject_parallel_adapter(m, ffn_target_modules, None, bottleneck_size, factor, activation, scaling, ("ffn",)),
    ])
