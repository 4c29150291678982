"""P-tuning (Liu et al., 2021, "GPT Understands, Too").

Like prompt tuning, ``n`` virtual-token embeddings are prepended to the input embeddings, but during training they
are produced by a prompt encoder from free embeddings ``E ∈ R^{n×d}``::

    P = MLP(BiLSTM(E))                       encoder="lstm"  (the paper's)
    P = MLP(E)                               encoder="mlp"   (3 layers, ReLU; PEFT's recommended default)

which couples the virtual tokens and eases optimization. The encoder is needed only to train: :meth:`PromptEncoder.fold`
replaces it by ``P`` (plain embeddings), and the exported adapter (Hugging Face PEFT's ``P_TUNING``,
``prompt_embeddings`` ``(n, d)``) holds ``P`` only, which PEFT serves without an encoder. The layers follow PEFT's
``PromptEncoder`` (same shapes, hidden size ``encoder_hidden_size``, default ``d``).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import nn

from lightning_peft.methods._prompt import SoftPromptLayer, attach_prompt, check_num_virtual_tokens, check_peft_prompt_config, peft_prompt_config

__all__ = ["PromptEncoder", "from_peft", "inject_p_tuning", "to_peft"]

Encoder = Literal["mlp", "lstm"]


def check_p_tuning_args(num_virtual_tokens: Any, encoder: Any, encoder_hidden_size: Any) -> None:
    check_num_virtual_tokens(num_virtual_tokens)
    if encoder not in ("mlp", "lstm"):
        raise ValueError(f"encoder must be 'mlp' or 'lstm' (bidirectional LSTM + MLP), got {encoder!r}.")
    if encoder_hidden_size is not None and (isinstance(encoder_hidden_size, bool) or not isinstance(encoder_hidden_size, int) or encoder_hidden_size < 1):
        raise ValueError(f"encoder_hidden_size must be a positive integer or None (the model's hidden size), got {encoder_hidden_size!r}.")


class PromptEncoder(SoftPromptLayer):
    """Virtual-token embeddings produced by a prompt encoder (``ptuning_embedding`` → ``ptuning_lstm`` → ``ptuning_mlp``);
    after :meth:`fold`, a plain ``ptuning_prompt`` ``(n, d)``.

    Args:
        model: the Hugging Face model.
        num_virtual_tokens: ``n``.
        encoder: ``"mlp"`` or ``"lstm"``.
        encoder_hidden_size: the encoder's hidden size; None: the model's hidden size.
        adapter_name: the prompt's name: ``"default"`` is the model's ``p_tuning``, another name the sibling
            ``p_tuning_<name>`` (see :mod:`lightning_peft.methods._prompt`).
    """

    adapter_prefix = "ptuning_"
    attr_name = "p_tuning"

    def __init__(
        self, model: nn.Module, num_virtual_tokens: int = 20, encoder: Encoder = "mlp", encoder_hidden_size: Optional[int] = None,
        adapter_name: str = "default",
    ) -> None:
        check_p_tuning_args(num_virtual_tokens, encoder, encoder_hidden_size)
        super().__init__(model, num_virtual_tokens, adapter_name)
        d = self.dims["hidden"]
        h = encoder_hidden_size or d
        device = model.get_input_embeddings().weight.device
        self.encoder, self.encoder_hidden_size, self.folded = encoder, h, False
        self.ptuning_embedding = nn.Parameter(torch.randn(num_virtual_tokens, d, device=device))
        if encoder == "lstm":
            self.ptuning_lstm = nn.LSTM(d, h, num_layers=2, bidirectional=True, batch_first=True).to(device)
            self.ptuning_mlp = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d)).to(device)
        else:
            self.ptuning_mlp = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d)).to(device)

    def prompt(self) -> torch.Tensor:
        if self.folded:
            return self.ptuning_prompt
        x = self.ptuning_embedding
        if self.encoder == "lstm":
            x = self.ptuning_lstm(x[None])[0][0]  # (n, 2h)
        return self.ptuning_mlp(x)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the encoder by the embeddings it produces (serving needs no encoder). Safe to call twice."""
        if self.folded:
            return
        prompt = self.prompt().detach().clone()
        del self.ptuning_embedding, self.ptuning_mlp
        if self.encoder == "lstm":
            del self.ptuning_lstm
        self.ptuning_prompt = nn.Parameter(prompt)
        self.folded = True

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, encoder={self.encoder!r}, folded={self.folded}"


def inject_p_tuning(
    module: nn.Module, num_virtual_tokens: int = 20, encoder: Encoder = "mlp", encoder_hidden_size: Optional[int] = None, adapter_name: str = "default",
) -> list[str]:
    """Add a :class:`PromptEncoder` named ``adapter_name`` to the Hugging Face model in ``module``; returns the new layer's name."""
    return attach_prompt(module, lambda m: PromptEncoder(m, num_virtual_tokens, encoder, encoder_hidden_size, adapter_name))


# -- Hugging Face PEFT format -----------------------------------------------------------------------
def to_peft(model: nn.Module, layers: list[tuple[str, PromptEncoder]]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's ``P_TUNING`` files: the encoder's output ``P`` (the encoder itself is not stored)."""
    (_, layer), = layers
    config = {
        **peft_prompt_config(model, layer, "P_TUNING"),
        "encoder_reparameterization_type": layer.encoder.upper(),
        "encoder_hidden_size": layer.encoder_hidden_size,
        "encoder_num_layers": 2,
        "encoder_dropout": 0.0,
    }
    return config, {"prompt_embeddings": layer.prompt().detach().float().cpu()}


def from_peft(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], adapter_name: str = "default") -> list[str]:
    """Add a folded :class:`PromptEncoder` named ``adapter_name`` holding PEFT's ``prompt_embeddings`` to the Hugging Face ``model``."""
    n = config["num_virtual_tokens"]
    check_num_virtual_tokens(n)
    values = check_peft_prompt_config(model, config, tensors, (n, model.get_input_embeddings().weight.shape[1]))
    layer = PromptEncoder(model, n, "mlp", encoder_hidden_size=1, adapter_name=adapter_name)
    layer.fold()
    with torch.no_grad():
        layer.ptuning_prompt.copy_(values)
    layer.attach(model)
    return [layer.module_name]
