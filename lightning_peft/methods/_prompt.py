"""The mechanism the soft-prompt methods share: learned virtual tokens put in front of a Hugging Face model's input.

Two places a prompt can enter, one hook for both (a forward pre-hook with keyword arguments):

* **input embeddings** (prompt tuning, P-tuning): on the top model (``LlamaForCausalLM``,
  ``BertForSequenceClassification``, ...), ``input_ids`` become ``inputs_embeds`` with the ``n`` prompt vectors
  prepended; causal-LM ``labels`` get ``n`` leading ``-100`` (ignored in the loss), ``token_type_ids`` ``n`` zeros.
  The model's outputs then cover ``n + T`` positions, as in Hugging Face PEFT.
* **key/value prefixes** (prefix tuning, P-tuning v2): on the backbone that builds the input embeddings and takes
  the key/value cache (:func:`prefix_target`: ``LlamaModel``, ``OPTDecoder``, ``BertModel``, ...), an empty cache
  becomes a ``DynamicCache`` already holding ``n`` keys and values per layer, so every attention layer attends to
  them; queries and outputs keep length ``T``.

The cache argument is ``cache`` in transformers 5.24 and later, ``past_key_values`` before: its name is read from
the forward's signature by :mod:`lightning_peft.compat`, and a cache given under either name is found.

Either way the virtual tokens are the first ``n`` key positions. The hook makes the rest agree with that:
the 2-D ``attention_mask`` gains ``n`` leading ones, given ``position_ids`` are shifted by ``n`` (the virtual
tokens take ``0 .. n-1``), and without ``position_ids`` they are derived from the extended mask
(``cumsum - 1``), so left or right padding does not move a sample's positions. In ``generate()`` the prompt is
added at prefill (empty cache) only; later steps find it in the cache and only the mask and positions are
extended. Without padding this is exactly what PEFT computes (its oracle tests rely on it).

Switched off by ``disabled`` (:func:`lightning_peft.core.disable_adapters`): the hook then passes inputs through.

Gated prefixes (optional, off by default; UniPELT, Mao et al., 2022). A prefix layer that holds ``prefix_gate``
(one :class:`~lightning_peft.methods._gate.Gate` with two outputs per layer) scales layer ``l``'s prefix keys and
values by ``g_l = sigmoid(W_l x + b_l)``, read from that layer's attention input ``x``. The prefixes are in the
cache before any layer runs, so the gate cannot be applied where the prefixes are made: a forward pre-hook on each
self-attention module (found as the modules with a ``layer_idx`` whose forward takes ``hidden_states`` and the
cache) rescales that layer's cached prefix just before the attention reads it. One prefix serves
every query token, so the gate is one value per sample: the mean over the sample's real tokens (attention mask)
of the per-token gate. At prefill only: in ``generate()`` the gated prefix stays in the cache for later steps.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import nn

from lightning_peft.compat import cache_arg, get_cache, set_cache, signature_names
from lightning_peft.core import AdapterLayer
from lightning_peft.methods._gate import Gate

__all__ = ["SoftPromptLayer", "attention_layers", "check_num_virtual_tokens", "find_hf_model", "model_dims", "task_type"]


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
        "hook its forward (input_ids, attention_mask, the key/value cache). None was found."
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
    kv_heads = _kv_heads(config, heads)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {
        "hidden": hidden, "layers": config.num_hidden_layers, "kv_heads": kv_heads, "head_dim": head_dim,
        "max_positions": getattr(config, "max_position_embeddings", None),
    }


def _kv_heads(config: Any, heads: int) -> int:
    """Key/value heads: ``num_key_value_heads`` (grouped-query attention); 1 for multi-query attention (Falcon's
    ``multi_query`` without ``new_decoder_architecture``, GPTBigCode's ``multi_query``), whose configs before
    transformers 5.24 did not say so in ``num_key_value_heads``; else one per attention head."""
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        return 1
    return getattr(config, "num_key_value_heads", None) or heads


def _param_names(fn) -> list[str]:
    return signature_names(fn)


def attention_layers(model: nn.Module) -> dict[int, nn.Module]:
    """``{layer index: self-attention module}``: the modules with an integer ``layer_idx`` whose forward takes
    ``hidden_states`` and the key/value cache (the first one per index: self-attention before cross-attention)."""
    found: dict[int, nn.Module] = {}
    for _, m in model.named_modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int) and not isinstance(idx, bool) and idx not in found:
            params = _param_names(m.forward)
            if "hidden_states" in params and cache_arg(params) is not None:
                found[idx] = m
    return found


def prefix_target(model: nn.Module) -> tuple[nn.Module, Optional[str]]:
    """The module whose forward receives the key/value cache and builds the input embeddings, and the name of its
    cache argument (None if the model has no such module).

    That is the innermost module that holds the input embeddings and whose forward takes both the input
    (``input_ids`` / ``inputs_embeds``) and a cache: ``LlamaModel`` in ``LlamaForCausalLM``, ``OPTDecoder`` in
    ``OPTForCausalLM`` (whose forward calls ``self.model.decoder`` directly, so a hook on ``OPTModel`` would never
    run), ``BertModel`` in ``BertForSequenceClassification``. Falls back to ``model.base_model``.
    """
    embeddings = model.get_input_embeddings()
    best: Optional[nn.Module] = None
    for _, m in model.named_modules():
        params = _param_names(m.forward)
        if cache_arg(params) is None or not ("input_ids" in params or "inputs_embeds" in params):
            continue
        if any(sub is embeddings for sub in m.modules()):
            best = m  # named_modules() is pre-order: a later holder is nested in the earlier ones
    target = best if best is not None else model.base_model
    return target, cache_arg(_param_names(target.forward))


def position_offset(model: nn.Module) -> int:
    """The first position id of ``model``: ``padding_idx + 1`` for RoBERTa-style embeddings (RoBERTa, XLM-R,
    CamemBERT, ...: they number real tokens from ``padding_idx + 1``), else 0."""
    embeddings = getattr(model.base_model, "embeddings", None)
    idx = getattr(embeddings, "padding_idx", None)
    return idx + 1 if isinstance(idx, int) and hasattr(embeddings, "create_position_ids_from_input_ids") else 0


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
        embeddings = model.get_input_embeddings()
        if not isinstance(getattr(embeddings, "weight", None), torch.Tensor) or getattr(embeddings, "weight").dim() != 2:
            raise NotImplementedError(
                f"{type(self).__name__} cannot attach to {type(model).__name__}: its input embeddings are a "
                f"{type(embeddings).__name__}, not a token-embedding table, so there are no input tokens to put virtual "
                "tokens beside (vision models embed pixels). Use LoRA, (IA)3 or the bottleneck adapters on this model."
            )
        dims = model_dims(model)
        self.dims = dims
        if dims["max_positions"] is not None and num_virtual_tokens >= dims["max_positions"]:
            raise ValueError(
                f"num_virtual_tokens={num_virtual_tokens} leaves no room for the input: {type(model).__name__} takes at most "
                f"{dims['max_positions']} positions (max_position_embeddings). Use fewer virtual tokens."
            )
        self._config = model.config
        self._target_name = type(model).__name__
        self._gating: Optional[dict[str, Any]] = None  # gated prefixes: the cache and mask of the running prefill

    def add_prefix_gates(self) -> nn.ModuleList:
        """Gate each layer's prefix keys and values (``prefix_gate``: one two-output :class:`Gate` per layer, read from
        the layer's attention input; see the module docstring). Call before :meth:`attach`."""
        if self.inserts_tokens:
            raise ValueError(f"{type(self).__name__} puts its prompt into the input embeddings; only key/value prefixes can be gated.")
        if getattr(self, "prefix_gate", None) is None:
            self.prefix_gate = nn.ModuleList(Gate(self.dims["hidden"], 2) for _ in range(self.dims["layers"]))
        return self.prefix_gate

    @property
    def gated(self) -> bool:
        return getattr(self, "prefix_gate", None) is not None

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
        if self.inserts_tokens:
            target = model
            cache_name = cache_arg(_param_names(target.forward))
        else:
            target, cache_name = prefix_target(model)
        params = _param_names(target.forward)
        if not self.inserts_tokens and cache_name is None:
            raise NotImplementedError(
                f"{type(self).__name__} cannot attach to {type(model).__name__}: none of its modules takes the input "
                f"and a key/value cache (a forward argument named 'cache' or 'past_key_values'; checked "
                f"{type(target).__name__}.forward), so its attention cannot be given key/value prefixes. Use "
                "prompt tuning or P-tuning (input embeddings) on this model."
            )
        if self.inserts_tokens and "inputs_embeds" not in params:
            raise NotImplementedError(
                f"{type(self).__name__} cannot attach to {type(model).__name__}: its forward takes no inputs_embeds, so "
                "prompt embeddings cannot be prepended to the input."
            )
        if hasattr(model, self.attr_name):
            raise RuntimeError(f"{type(model).__name__} already has a {self.attr_name!r} submodule: one soft prompt per model.")
        attention = attention_layers(model) if self.gated else {}
        if self.gated and sorted(attention) != list(range(self.dims["layers"])):
            raise NotImplementedError(
                f"Gated prefixes need the self-attention module of each of the {self.dims['layers']} layers of "
                f"{type(model).__name__} (a module with layer_idx whose forward takes hidden_states and the key/value cache); "
                f"found layers {sorted(attention)}. Use ungated prefixes on this model."
            )
        if self.gated:  # float32, like the prefix parameters; on the model's device
            self.prefix_gate.to(device=model.get_input_embeddings().weight.device)
        self._params = params
        self._position_offset = position_offset(model)
        self._cache_name = cache_name  # None: the model takes no cache (prompt tuning on an encoder)
        self._word_embeddings = [model.get_input_embeddings()]  # a list: not a submodule of this layer
        self._handle = target.register_forward_pre_hook(self._hook, with_kwargs=True)
        self._gate_handles = [
            m.register_forward_pre_hook(functools.partial(self._gate_hook, idx), with_kwargs=True) for idx, m in sorted(attention.items())
        ]
        model.add_module(self.attr_name, self)

    def base_layer(self) -> nn.Module:
        self._handle.remove()
        for handle in getattr(self, "_gate_handles", []):
            handle.remove()
        return nn.Module()  # an empty placeholder where the prompt was

    def _gate_hook(self, idx: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Before layer ``idx``'s attention runs at prefill: scale its cached prefix keys and values by the gate."""
        state = self._gating
        if state is None or idx not in state["layers"]:
            return
        state["layers"].discard(idx)
        if not state["layers"]:
            self._gating = None  # the last layer: let go of the cache
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, T, D): the attention's input
        gate = self.prefix_gate[idx]
        g = gate(x)  # (B, T, 2): (key, value) gate per token
        mask = state["mask"]
        if mask is not None and mask.shape == g.shape[:2]:  # mean over each sample's real tokens
            m = mask.to(g.dtype).unsqueeze(-1)
            g = (g * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            g = g.mean(1)  # (B, 2)
        gate.record(g.mean(0))
        layer = state["cache"].layers[idx]
        if layer.keys.shape[-2] != self.num_virtual_tokens:
            raise RuntimeError(
                f"Gated prefixes: layer {idx}'s cache holds {layer.keys.shape[-2]} positions before its attention ran, "
                f"expected the {self.num_virtual_tokens} prefixes only. Gated prefixes need an empty cache at prefill."
            )
        layer.keys = layer.keys * g[:, 0, None, None, None].to(layer.keys.dtype)  # (B, kv_heads, n, head_dim)
        layer.values = layer.values * g[:, 1, None, None, None].to(layer.values.dtype)

    # -- the hook -----------------------------------------------------------------------------------
    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        self._gating = None
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
        cache = get_cache(kwargs)
        if cache is not None and not hasattr(cache, "get_seq_length"):
            raise TypeError(f"{type(self).__name__} needs the key/value cache as a transformers Cache, got {type(cache).__name__}.")
        if cache is not None and self._cache_name is not None:
            set_cache(kwargs, cache, self._cache_name)  # a deprecated spelling from the caller: pass it under the model's name
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
            filled = self._filled_cache(cache, batch, x)
            set_cache(kwargs, filled, self._cache_name)
            past = n
            if self.gated:
                mask2d = kwargs.get("attention_mask")
                mask2d = mask2d if mask2d is not None and mask2d.dim() == 2 and mask2d.shape[1] == q else None
                self._gating = {"cache": filled, "mask": mask2d, "layers": set(range(self.dims["layers"]))}
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
                    pos = torch.cat([torch.arange(n, device=pos.device, dtype=pos.dtype).expand(pos.shape[0], n) + self._position_offset, pos], dim=1)
            elif mask is not None and mask.dim() == 2:
                pos = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -(q + added):] + self._position_offset
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
