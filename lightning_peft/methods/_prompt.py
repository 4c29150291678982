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

Named prompts (:class:`lightning_peft.core.NamedAdapters`, one name per layer). The prompt named ``"default"`` is the
model's submodule ``attr_name`` (``prompt_tuning``, ``p_tuning``, ``prefix_tuning``, ...), as it always was, so its
state-dict keys and adapter files do not change; a prompt named ``sst2`` is a sibling, ``<attr_name>_sst2``, not a
submodule of the first (its parameters count and save as its own). The prompts of one method on a model form a
group with one hook, held by the first of them (and handed to the next when that one is deleted). At each forward
the hook applies

* the single active prompt of the group (:func:`~lightning_peft.core.set_active_adapters`; two active prompts are
  refused: one forward has one prompt), or none (the base model) when none is active or all are disabled;
* under :func:`~lightning_peft.core.per_sample_adapters`, row ``r``'s own prompt: ``[P_r ; x_r]`` (input
  embeddings) or row ``r``'s prefixes in the cache, gathered from the prompts of the adapters in the batch, each
  computed once (a P-tuning encoder or prefix MLP runs once per adapter, not per row). The mask, labels, position
  and token-type ids are extended exactly as for one prompt, so every row's result, and every prompt's gradient,
  equals that of running the batch with the row's prompt active. The routed prompts must have one length (rows of
  different lengths would not line up: the outputs of row ``r`` start after its ``n_r`` virtual tokens), and if
  one row has a prompt of the group, every row must (a row of the base model, ``None``, or of an adapter without a
  prompt has no virtual tokens: refused too); when no row has one, the hook passes the batch through. Gated
  prefixes route one adapter per batch only (each gate rescales the whole batch's cached prefixes).

The soft prompts a model names must all be of one method (the group a name is looked up in); unnamed ("default")
prompts of different methods may still be combined, as before.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import nn

from lightning_peft.compat import cache_arg, get_cache, set_cache, signature_names
from lightning_peft.core import AdapterLayer, NamedAdapters, check_adapter_name
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


class SoftPromptLayer(AdapterLayer, NamedAdapters):
    """Base of the soft-prompt adapters: ``n`` virtual tokens added to a Hugging Face model by a forward pre-hook.

    Subclasses set ``inserts_tokens`` and implement :meth:`prompt` (``(n, hidden)`` input embeddings) or
    :meth:`prefixes` (per layer ``(key, value)``, each ``(n, kv_heads, head_dim)``).

    One named adapter per layer (:class:`~lightning_peft.core.NamedAdapters`): further prompts of the same method are
    sibling layers (see the module docstring), switched and routed per sample by the core functions.

    Args:
        model: the Hugging Face model (the layer registers itself as its submodule :attr:`module_name`).
        num_virtual_tokens: ``n``.
        adapter_name: the prompt's name; ``"default"`` is the submodule ``attr_name``, another name ``<attr_name>_<name>``.
    """

    inserts_tokens: bool = True
    attr_name: str = "soft_prompt"

    def __init__(self, model: nn.Module, num_virtual_tokens: int, adapter_name: str = "default") -> None:
        check_num_virtual_tokens(num_virtual_tokens)
        check_adapter_name(adapter_name)
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.adapter_name = adapter_name
        self._init_named_adapters()  # active, frozen, merged_adapters, sample_adapters (core.NamedAdapters)
        self.set_adapter_active(adapter_name, True)
        self._deleted = False
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
        self._handle: Any = None  # the forward pre-hook, held by the first prompt of the group only
        self._gate_handles: list[Any] = []
        self._owner: list[nn.Module] = []  # [the Hugging Face model] once attached (a list: not a submodule)

    @property
    def module_name(self) -> str:
        """The layer's name on the Hugging Face model: ``attr_name`` for "default", else ``<attr_name>_<adapter_name>``."""
        return self.attr_name if self.adapter_name == "default" else f"{self.attr_name}_{self.adapter_name}"

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

    # -- named adapters (core.NamedAdapters) -----------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return [] if self._deleted else [self.adapter_name]

    def adapter_params(self, trainable_only: bool = False) -> list[str]:
        if self._deleted or (trainable_only and self.adapter_name in self.frozen):
            return []
        return super().adapter_params()

    def delete_adapter(self, name: str) -> None:
        """Remove this prompt: the layer takes itself out of the model (the group's hook moves to the next prompt)."""
        if name not in self.adapter_names():
            raise ValueError(f"This soft prompt is named {self.adapter_name!r}, not {name!r}.")
        owner, hosting = (self._owner or [None])[0], self._handle is not None
        self._deleted = True
        self.set_adapter_active(name, False)
        self.set_adapter_frozen(name, False)
        self.base_layer()  # its hooks go
        if owner is None:
            return
        if owner._modules.get(self.module_name) is self:
            delattr(owner, self.module_name)
        rest = _group(owner, self.attr_name)
        if hosting and rest:
            rest[0]._register_hook()

    def _register_hook(self) -> None:
        self._handle = self._target[0].register_forward_pre_hook(self._hook, with_kwargs=True)

    # -- attaching --------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Become ``model``'s submodule :attr:`module_name`; the first prompt of its method on ``model`` registers the
        hook on ``model`` (input embeddings) or its backbone (prefixes), a further one joins it as a sibling."""
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
        name = self.module_name
        if hasattr(model, name) and not _empty_slot(model._modules.get(name)):
            raise RuntimeError(
                f"{type(model).__name__} already has a {name!r} submodule: give the new soft prompt another adapter_name "
                "(a prompt named x becomes the sibling "
                f"'{self.attr_name}_x'), or delete the one there first (lightning_peft.delete_adapter)."
            )
        prompts = [m for m in model._modules.values() if isinstance(m, SoftPromptLayer) and m.adapter_names()]
        kinds = sorted({m.attr_name for m in prompts} | {self.attr_name})
        names = [m.adapter_name for m in prompts] + [self.adapter_name]
        if len(kinds) > 1 and any(n != "default" for n in names):
            raise NotImplementedError(
                f"{type(model).__name__} carries the soft prompts {[m.module_name for m in prompts]}; a {self.attr_name} "
                f"prompt named {self.adapter_name!r} cannot join them: named soft prompts are switched and routed per sample "
                f"as one group, so they must all be of one method (found {kinds}). Use the same method for every named "
                "prompt, or keep one unnamed ('default') prompt per method."
            )
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
        self._owner, self._target = [model], [target]
        if not _group(model, self.attr_name):  # the first prompt of its method: it hosts the group's hook
            self._register_hook()
        self._gate_handles = [
            m.register_forward_pre_hook(functools.partial(self._gate_hook, idx), with_kwargs=True) for idx, m in sorted(attention.items())
        ]
        model.add_module(name, self)  # replaces the empty placeholder unload() leaves, if there is one

    def base_layer(self) -> nn.Module:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for handle in self._gate_handles:
            handle.remove()
        self._gate_handles = []
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

    # -- the hook (on the group's first prompt) -------------------------------------------------------
    def _route(self, group: list[SoftPromptLayer], batch: int) -> Optional[tuple[list[SoftPromptLayer], Optional[torch.Tensor]]]:
        """``(prompts, rows)``: the prompts this forward applies and, when several, which one each row takes
        (``rows[b]`` indexes ``prompts``; None: ``prompts[0]`` for every row). None: the base model."""
        routing = self.sample_adapters  # per_sample_adapters sets it on every layer of the group alike
        if routing is None:
            live = [m for m in group if m.active and not m.disabled]
            if len(live) > 1:
                raise ValueError(
                    f"The soft prompts {[m.adapter_name for m in live]} are all active, and a forward applies one soft prompt. "
                    "Choose one with set_active_adapters(model, name), or give each row its prompt with "
                    "per_sample_adapters(model, names)."
                )
            return (live, None) if live else None
        names = list(routing)
        if len(names) != batch:
            raise ValueError(
                f"per_sample_adapters names {len(names)} rows but the batch has {batch}: give one adapter name (or None) per row."
            )
        by_name = {m.adapter_name: m for m in group if not m.disabled}
        if not any(n in by_name for n in names):
            return None  # no row has a prompt here (disable_adapters(), rows of the base model or of other methods' adapters)
        for row, name in enumerate(names):
            if name not in by_name:
                raise ValueError(
                    f"per_sample_adapters: row {row} names {name!r}, which has no {self.attr_name} prompt on "
                    f"{self._target_name} (its prompts: {sorted(by_name)}). Routed soft prompts need a prompt for every row: "
                    "a row without one has no virtual tokens, so it would not line up with the others. Run the rows of "
                    "the base model (None) or of adapters without a prompt in batches of their own."
                )
        used = list(dict.fromkeys(names))
        prompts = [by_name[n] for n in used]
        lengths = {m.adapter_name: m.num_virtual_tokens for m in prompts}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"per_sample_adapters: the soft prompts in this batch have different lengths {lengths} (num_virtual_tokens); "
                "the rows would not line up (each row's outputs start after its virtual tokens). Give the prompts routed "
                "together equal num_virtual_tokens, or batch the rows of each length separately."
            )
        if len(prompts) == 1:
            return prompts, None
        gated = [m.adapter_name for m in prompts if m.gated]
        if gated:
            raise NotImplementedError(
                f"per_sample_adapters: the gated prefixes {gated} cannot share a batch with other prompts (their gates "
                "rescale the whole batch's cached prefixes, one adapter's gate at a time). Batch their rows separately."
            )
        slot = {n: i for i, n in enumerate(used)}
        return prompts, torch.tensor([slot[n] for n in names])

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        group = _group(self._owner[0], self.attr_name)
        for m in group:
            m._gating = None
        if args:  # e.g. BertForSequenceClassification calls self.bert(input_ids, ...)
            kwargs = {**dict(zip(self._params, args)), **kwargs}
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        x = embeds if embeds is not None else ids
        if x is None:
            return None
        batch, q = x.shape[:2]
        chosen = self._route(group, batch)
        if chosen is None:
            return None
        prompts, rows = chosen
        n = prompts[0].num_virtual_tokens
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
            prompt = _per_row([m.prompt().to(embeds.dtype) for m in prompts], rows, batch)  # (B, n, D)
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
            filled = self._filled_cache(cache, batch, x, prompts, rows)
            set_cache(kwargs, filled, self._cache_name)
            past = n
            if prompts[0].gated:  # one adapter in this batch (_route)
                mask2d = kwargs.get("attention_mask")
                mask2d = mask2d if mask2d is not None and mask2d.dim() == 2 and mask2d.shape[1] == q else None
                prompts[0]._gating = {"cache": filled, "mask": mask2d, "layers": set(range(self.dims["layers"]))}
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

    def _filled_cache(self, cache, batch: int, like: torch.Tensor, prompts: list[SoftPromptLayer], rows: Optional[torch.Tensor]):
        from transformers import DynamicCache

        if cache is None:
            cache = DynamicCache(config=self._config)
        # the model's compute dtype: that of the input embeddings given, else of the word embeddings (a bf16 model
        # must get bf16 prefixes: attention refuses keys of another dtype than its queries)
        dtype = like.dtype if like.dtype.is_floating_point else self._word_embeddings[0].weight.dtype
        for layer, kvs in enumerate(zip(*[m.prefixes() for m in prompts])):  # per layer: each prompt's (key, value)
            k = _per_row([k.to(dtype).permute(1, 0, 2) for k, _ in kvs], rows, batch)  # (B, kv_heads, n, head_dim)
            v = _per_row([v.to(dtype).permute(1, 0, 2) for _, v in kvs], rows, batch)
            cache.update(k, v, layer)
        return cache

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}"


def _group(model: nn.Module, attr_name: str) -> list[SoftPromptLayer]:
    """The soft prompts of one method (``attr_name``) on the Hugging Face ``model``, in the order attached."""
    return [m for m in model._modules.values() if isinstance(m, SoftPromptLayer) and m.attr_name == attr_name and m.adapter_names()]


def _empty_slot(module: Optional[nn.Module]) -> bool:
    """Whether ``module`` is the empty placeholder :meth:`SoftPromptLayer.base_layer` leaves (``unload``)."""
    return type(module) is nn.Module and not (module._parameters or module._buffers or module._modules)


def _per_row(values: list[torch.Tensor], rows: Optional[torch.Tensor], batch: int) -> torch.Tensor:
    """``(B, *shape)`` from one tensor per prompt: row ``b`` holds ``values[rows[b]]`` (``values[0]`` for every row
    when ``rows`` is None: a view). The backward adds each row's gradient into its own prompt only."""
    if rows is None:
        return values[0].unsqueeze(0).expand(batch, *values[0].shape)
    return torch.stack(values)[rows.to(values[0].device)]


def attach_prompt(module: nn.Module, layer_factory) -> list[str]:
    """Find the Hugging Face model in ``module``, build the layer with ``layer_factory(hf_model)``, attach it.
    Returns the qualified name of the new layer."""
    name, model = find_hf_model(module)
    layer = layer_factory(model)
    layer.attach(model)
    return [f"{name}.{layer.module_name}" if name else layer.module_name]


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
