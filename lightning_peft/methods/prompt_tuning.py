"""Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

``n`` learned vectors ``P ∈ R^{n×d}`` are prepended to the (frozen) input embeddings::

    h_0 = [P ; E(x_1) ... E(x_T)]          (n + T positions)

and only ``P`` trains. The attention mask, causal-LM labels (virtual positions ``-100``), position and token-type
ids are extended to match (see :mod:`lightning_peft.methods._prompt`). ``P`` starts as

* ``"random"``: normal with the standard deviation of the model's word-embedding table;
* ``"vocab"``: the embeddings of ``n`` tokens sampled from the vocabulary;
* ``"text"``: the embeddings of ``init_text`` tokenized with the model's tokenizer, repeated or cut to ``n``
  tokens (as PEFT does, special tokens included).

:func:`to_peft` / :func:`from_peft` read and write Hugging Face PEFT's ``PROMPT_TUNING`` files (one tensor,
``prompt_embeddings`` ``(n, d)``).
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from lightning_peft.methods._prompt import SoftPromptLayer, attach_prompt, check_num_virtual_tokens, check_peft_prompt_config, peft_prompt_config

__all__ = ["PromptEmbedding", "from_peft", "inject_prompt_tuning", "to_peft"]

Init = Literal["random", "vocab", "text"]
_PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


def check_prompt_tuning_args(num_virtual_tokens: Any, init: Any, init_text: Any, tokenizer: Any = None) -> None:
    check_num_virtual_tokens(num_virtual_tokens)
    if init not in _PEFT_INIT:
        raise ValueError(f"init must be one of {list(_PEFT_INIT)}, got {init!r}.")
    if init == "text" and not (isinstance(init_text, str) and init_text.strip()):
        raise ValueError(f"init='text' needs a non-empty init_text (e.g. 'Classify the sentiment:'), got {init_text!r}.")
    if init != "text" and init_text is not None:
        raise ValueError(f"init_text={init_text!r} is only used with init='text', but init={init!r}. Set init='text' or drop init_text.")
    if init != "text" and tokenizer is not None:  # it would be ignored: only init_text is tokenized
        raise ValueError(f"tokenizer={tokenizer!r} is only used with init='text' (to tokenize init_text), but init={init!r}. Set init='text' or drop tokenizer.")


def _load_tokenizer(tokenizer: Any) -> Any:
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    return tokenizer


def text_token_ids(tokenizer: Any, text: str, n: int) -> list[int]:
    """``text``'s token ids repeated or cut to ``n`` (PEFT's rule for ``prompt_tuning_init="TEXT"``)."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise ValueError(f"init_text={text!r} tokenizes to no tokens.")
    return (ids * math.ceil(n / len(ids)))[:n]


class PromptEmbedding(SoftPromptLayer):
    """``prompt_embeddings`` ``(n, hidden)`` prepended to the input embeddings of a Hugging Face model.

    Args:
        model: the Hugging Face model (decoder LM or encoder with a head).
        num_virtual_tokens: ``n``.
        init: ``"random"``, ``"vocab"`` or ``"text"`` (see the module docstring).
        init_text: the text for ``init="text"``.
        tokenizer: a tokenizer or a tokenizer directory, for ``init="text"``.
        adapter_name: the prompt's name: ``"default"`` is the model's ``prompt_tuning``, another name the sibling
            ``prompt_tuning_<name>`` (see :mod:`lightning_peft.methods._prompt`).
    """

    adapter_prefix = "prompt_"
    attr_name = "prompt_tuning"

    def __init__(
        self, model: nn.Module, num_virtual_tokens: int = 20, init: Init = "vocab", init_text: Optional[str] = None, tokenizer: Any = None,
        adapter_name: str = "default",
    ) -> None:
        check_prompt_tuning_args(num_virtual_tokens, init, init_text, tokenizer)
        super().__init__(model, num_virtual_tokens, adapter_name)
        table = model.get_input_embeddings().weight.detach()
        n = num_virtual_tokens
        if init == "random":
            values = torch.randn(n, table.shape[1], device=table.device) * table.float().std()
        elif init == "vocab":
            values = table[torch.randint(0, table.shape[0], (n,), device=table.device)]
        else:
            if tokenizer is None:
                raise ValueError(
                    f"init='text' needs the model's tokenizer to turn init_text={init_text!r} into tokens: pass tokenizer "
                    "(a tokenizer directory), or use a LightningModule with a `tokenizer` attribute (the task modules have one)."
                )
            ids = text_token_ids(_load_tokenizer(tokenizer), init_text, n)
            if max(ids) >= table.shape[0]:
                raise ValueError(f"The tokenizer produced token id {max(ids)}, but {type(model).__name__} has only {table.shape[0]} embeddings: use its own tokenizer.")
            values = table[torch.tensor(ids, device=table.device)]
        self.init, self.init_text = init, init_text
        self.prompt_embeddings = nn.Parameter(values.detach().clone().float())

    def prompt(self) -> torch.Tensor:
        return self.prompt_embeddings


def inject_prompt_tuning(
    module: nn.Module, num_virtual_tokens: int = 20, init: Init = "vocab", init_text: Optional[str] = None, tokenizer: Any = None,
    adapter_name: str = "default",
) -> list[str]:
    """Add a :class:`PromptEmbedding` named ``adapter_name`` to the Hugging Face model in ``module``; returns the new
    layer's name."""
    return attach_prompt(module, lambda m: PromptEmbedding(m, num_virtual_tokens, init, init_text, tokenizer, adapter_name))


# -- Hugging Face PEFT format -----------------------------------------------------------------------
def to_peft(model: nn.Module, layers: list[tuple[str, PromptEmbedding]], tokenizer_name_or_path: Optional[str] = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config.json fields, tensors)`` of PEFT's ``PROMPT_TUNING`` for the layer in ``model``."""
    (_, layer), = layers
    init = _PEFT_INIT[layer.init]
    if init == "TEXT" and not tokenizer_name_or_path:
        init = "RANDOM"  # PEFT's config refuses TEXT without a tokenizer path; the init does not matter once trained
    config = {
        **peft_prompt_config(model, layer, "PROMPT_TUNING"),
        "prompt_tuning_init": init,
        "prompt_tuning_init_text": layer.init_text if init == "TEXT" else None,
        "tokenizer_name_or_path": tokenizer_name_or_path if init == "TEXT" else None,
        "tokenizer_kwargs": None,
    }
    return config, {"prompt_embeddings": layer.prompt_embeddings.detach().float()}


def from_peft(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], adapter_name: str = "default") -> list[str]:
    """Add a :class:`PromptEmbedding` named ``adapter_name`` holding PEFT's ``prompt_embeddings`` to the Hugging Face ``model``."""
    n = config["num_virtual_tokens"]
    check_num_virtual_tokens(n)
    hidden = model.get_input_embeddings().weight.shape[1]
    values = check_peft_prompt_config(model, config, tensors, (n, hidden))
    layer = PromptEmbedding(model, n, init="random", adapter_name=adapter_name)
    with torch.no_grad():
        layer.prompt_embeddings.copy_(values)
    layer.attach(model)
    return [layer.module_name]


def prompt_tuning_tokenizer(module: nn.Module, tokenizer: Union[str, Any, None]) -> Any:
    """The tokenizer for ``init="text"``: the one given, else ``module.tokenizer`` (the task modules have one)."""
    return tokenizer if tokenizer is not None else getattr(module, "tokenizer", None)
