"""The mechanism the soft-prompt methods share: learned virtual tokens put in front of a Hugging Face model's input.

Two places a prompt can enter, one hook for both (a forward pre-hook with keyword arguments):

* **input embeddings** (prompt tuning, P-tuning): on the top model (``LlamaForCausalLM``,
  ``BertForSequenceClassification``, ...), ``input_ids`` become ``inputs_embeds`` with the ``n`` prompt vectors
  prepended; causal-LM ``labels`` get ``n`` leading ``-100`` (ignored in the loss), ``token_type_ids`` ``n`` zeros.
  The model's outputs then cover ``n + T`` positions, as in Hugging Face PEFT.
* **key/value prefixes** (prefix tuning, P-tuning v2): on the backbone (``model.base_model``: ``LlamaModel``,
  ``BertModel``, ...), an empty ``past_key_values`` becomes a ``DynamicCache`` already holding ``n`` keys and
  values per layer, so every attention layer attends to them; queries and outputs keep length ``T``.

Either way the virtual tokens are the first ``n`` key positions. The hook makes the rest agree with that:
the 2-D ``attention_mask`` gains ``n`` leading ones, given ``position_ids`` are shifted by ``n`` (the virtual
tokens take ``0 .. n-1``), and without ``position_ids`` they are derived from the extended mask
(``cumsum - 1``), so left or right padding does not move a sample's positions. In ``generate()`` the prompt is
added at prefill (empty cache) only; later steps find it in the cache and only the mask and positions are
extended. Without padding this is exactly what PEFT computes (its oracle tests rely on it).

Switched off by ``disabled`` (:func:`lightning_peft.core.disable_adapters`): the hook then passes inputs through.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import nn

from lightning_peft.core import AdapterLayer

__all__ = ["SoftPromptLayer", "check_num_virtual_tokens", "find_hf_model", "model_dims", "task_type"]


def check_num_virtual_tokens(num_virtual_tokens: Any) -> None:
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be an integer >= 1, got {num_virtual_tokens!r}. Use e.g. 20 (the usual default).")


def find_hf_model(module: nn.Module) -> tuple[str, nn.Module]:
    """``(name, model)`` of the outermost Hugging Face ``PreTrainedModel`` in ``module`` (``""`` if it is one)."""
    from transformers import PreTrainedModel

    for name, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel):
            return name, sub
    raise TypeError(
        f"Soft prompts need a Hugging Face transformers model (a PreTrainedModel) inside {type(module).__name__}: they "
        "hook its forward (input_ids, attention_mask, past_key_values). None was found."
    )


def task_type(model: nn.Module) -> str:
    """PEFT's ``task_type`` for a Hugging Face model class."""
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS")):
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION"


def model_dims(model: nn.Module) -> dict[str, Any]:
    """Sizes a soft prompt needs from a Hugging Face config: hidden size, layers, key/value heads and head size,
    the maximum number of positions (None if the config has none)."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError(
            f"{type(model).__name__} is an encoder-decoder model; lightning-peft's soft prompts support decoder LMs and "
            "encoders (BERT family) only."
        )
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {
        "hidden": hidden, "layers": config.num_hidden_layers, "kv_heads": kv_heads, "head_dim": head_dim,
        "max_positions": getattr(config, "max_position_embeddings", None),
    }


def _param_names(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


class SoftPromptLayer(AdapterLayer):
    """Base of the soft-prompt adapters: ``n`` virtual tokens added to a Hugging Face model by a forward pre-hook.

    Subclasses set ``inserts_tokens`` and implement :meth:`prompt` (``(n, hidden)`` input embeddings) or
    :meth:`prefixes` (per layer ``(key, value)``, each ``(n, kv_heads, head_dim)``).

    Args:
        model: the Hugging Face model (the layer registers itself as its submodule ``attr_name``).
        num_virtual_tokens: ``n``.
    """

    inserts_tokens: bool = True
    attr_name: str = "soft_prompt"

    def __init__(self, model: nn.Module, num_virtual_tokens: int) -> None:
        check_num_virtual_tokens(num_virtual_tokens)
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        dims = model_dims(model)
        self.dims = dims
        if dims["max_positions"] is not None and num_virtual_tokens >= dims["max_positions"]:
            raise ValueError(
                f"num_virtual_tokens={num_virtual_tokens} leaves no room for the input: {type(model).__name__} takes at most "
                f"{dims['max_positions']} positions (max_position_embeddings). Use fewer virtual tokens."
            )
        self._config = model.config
        self._target_name = type(model).__name__

    # -- what a method provides -------------------------------------------------------------------
    def prompt(self) -> torch.Tensor:
        """``(n, hidden)``: the embeddings prepended to the input (``inserts_tokens``)."""
        raise NotImplementedError

    def prefixes(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(key, value)``, each ``(n, kv_heads, head_dim)`` (not ``inserts_tokens``)."""
        raise NotImplementedError

    # -- attaching --------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Register the hook on ``model`` (input embeddings) or its backbone (prefixes), and become its submodule."""
        target = model if self.inserts_tokens else model.base_model
        params = _param_names(target.forward)
        if not self.inserts_tokens and "past_key_values" not in params:
            raise NotImplementedError(
                f"{type(self).__name__} cannot attach to {type(model).__name__}: its backbone {type(target).__name__}.forward "
                "takes no past_key_values, so its attention cannot be given key/value prefixes. Use prompt tuning or "
                "P-tuning (input embeddings) on this model."
            )
        if self.inserts_tokens and "inputs_embeds" not in params:
            raise NotImplementedError(
                f"{type(self).__name__} cannot attach to {type(model).__name__}: its forward takes no inputs_embeds, so "
                "prompt embeddings cannot be prepended to the input."
            )
        if hasattr(model, self.attr_name):
            raise RuntimeError(f"{type(model).__name__} already has a {self.attr_name!r} submodule: one soft prompt per model.")
        self._params = params
        self._word_embeddings = [model.get_input_embeddings()]  # a list: not a submodule of this layer
        self._handle = target.register_forward_pre_hook(self._hook, with_kwargs=True)
        model.add_module(self.attr_name, self)

    def base_layer(self) -> nn.Module:
        self._handle.remove()
        return nn.Module()  # an empty placeholder where the prompt was

    # -- the hook -----------------------------------------------------------------------------------
    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if self.disabled:
            return None
        if args:  # e.g. BertForSequenceClassification calls self.bert(input_ids, ...)
            kwargs = {**dict(zip(self._params, args)), **kwargs}
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        x = embeds if embeds is not None else ids
        if x is None:
            return None
        batch, q = x.shape[:2]
        n = self.num_virtual_tokens
        cache = kwargs.get("past_key_values")
        if cache is not None and not hasattr(cache, "get_seq_length"):
            raise TypeError(f"{type(self).__name__} needs past_key_values as a transformers Cache, got {type(cache).__name__}.")
        past = cache.get_seq_length() if cache is not None else 0
        prefill, added = past == 0, 0
        if prefill and self.inserts_tokens:
            if embeds is None:
                embeds = self._word_embeddings[0](ids)
            prompt = self.prompt().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, n, D)
            kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
            kwargs["input_ids"] = None
            labels = kwargs.get("labels")
            if labels is not None and labels.dim() >= 2 and labels.shape[1] == q:  # token labels (causal LM)
                kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
            tt = kwargs.get("token_type_ids")
            if tt is not None:
                kwargs["token_type_ids"] = torch.cat([tt.new_zeros(batch, n), tt], dim=1)
            added = n
        elif prefill:
            kwargs["past_key_values"] = self._filled_cache(cache, batch, x)
            past = n
        total = past + added + q  # key positions after this call
        if self.dims["max_positions"] is not None and total > self.dims["max_positions"]:
            raise ValueError(
                f"{n} virtual tokens + {total - n} input positions = {total} exceed the {self.dims['max_positions']} positions "
                f"{self._target_name} takes (max_position_embeddings). Shorten the input or use fewer virtual tokens."
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            if mask.shape[1] == total - n:
                mask = torch.cat([mask.new_ones(batch, n), mask], dim=1)
            elif mask.shape[1] != total:
                raise ValueError(
                    f"attention_mask has {mask.shape[1]} columns; it must cover the {total - n} cached and new input positions "
                    f"(or {total}, the {n} virtual tokens included)."
                )
            kwargs["attention_mask"] = mask
        if "position_ids" in self._params:
            pos = kwargs.get("position_ids")
            if pos is not None:
                pos = pos + n
                if added:
                    pos = torch.cat([torch.arange(n, device=pos.device, dtype=pos.dtype).expand(pos.shape[0], n), pos], dim=1)
            elif mask is not None and mask.dim() == 2:
                pos = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -(q + added):]
            kwargs["position_ids"] = pos
        return (), kwargs

    def _filled_cache(self, cache, batch: int, like: torch.Tensor):
        from transformers import DynamicCache

        if cache is None:
            cache = DynamicCache(config=self._config)
        # the model's compute dtype: that of the input embeddings given, else of the word embeddings (a bf16 model
        # must get bf16 prefixes: attention refuses keys of another dtype than its queries)
        dtype = like.dtype if like.dtype.is_floating_point else self._word_embeddings[0].weight.dtype
        for layer, (k, v) in enumerate(self.prefixes()):
            k = k.to(dtype).permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)  # (B, kv_heads, n, head_dim)
            v = v.to(dtype).permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
            cache.update(k, v, layer)
        return cache

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}"


def attach_prompt(module: nn.Module, layer_factory) -> list[str]:
    """Find the Hugging Face model in ``module``, build the layer with ``layer_factory(hf_model)``, attach it.
    Returns the qualified name of the new layer."""
    name, model = find_hf_model(module)
    layer = layer_factory(model)
    layer.attach(model)
    return [f"{name}.{layer.attr_name}" if name else layer.attr_name]


def flat_prefixes(flat: torch.Tensor, dims: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's prefix layout ``(n, layers * 2 * kv_heads * head_dim)`` -> per layer ``(key, value)`` ``(n, kv_heads, head_dim)``."""
    n = flat.shape[0]
    per = flat.view(n, dims["layers"], 2, dims["kv_heads"], dims["head_dim"])
    return [(per[:, l, 0], per[:, l, 1]) for l in range(dims["layers"])]


def prefix_width(dims: dict[str, Any]) -> int:
    return dims["layers"] * 2 * dims["kv_heads"] * dims["head_dim"]


def peft_prompt_config(model: nn.Module, layer: SoftPromptLayer, peft_type: str, width: Optional[int] = None) -> dict[str, Any]:
    """The fields PEFT's prompt-learning configs share (``PromptLearningConfig``)."""
    dims = layer.dims
    prefix = not layer.inserts_tokens
    return {
        "peft_type": peft_type,
        "task_type": task_type(model),
        "num_virtual_tokens": layer.num_virtual_tokens,
        "token_dim": dims["kv_heads"] * dims["head_dim"] if prefix else dims["hidden"],
        "num_transformer_submodules": 1,
        "num_attention_heads": dims["kv_heads"] if prefix else model.config.num_attention_heads,
        "num_layers": dims["layers"],
    }


def check_peft_prompt_config(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """Check a PEFT prompt-learning config and its ``prompt_embeddings`` against ``model``; return the tensor."""
    if config.get("num_transformer_submodules") not in (None, 1):
        raise NotImplementedError(f"num_transformer_submodules={config['num_transformer_submodules']} (encoder-decoder prompts) is not supported.")
    unexpected = sorted(k for k in tensors if k != "prompt_embeddings")
    if "prompt_embeddings" not in tensors or unexpected:
        raise ValueError(f"A {config['peft_type']} adapter holds one tensor 'prompt_embeddings'; found {sorted(tensors)}.")
    t = tensors["prompt_embeddings"]
    if tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"prompt_embeddings has shape {list(t.shape)}; {type(model).__name__} with {config['num_virtual_tokens']} virtual "
            f"tokens needs {list(shape)}. Load the adapter into the base model it was trained on."
        )
    return t
