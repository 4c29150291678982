"""LLaMA-Adapter: zero-initialized attention over learned adaption prompts (Zhang et al., 2023).

In each of the top ``adapter_layers`` attention layers, ``adapter_len`` learned tokens ``P`` (shape
``(adapter_len, hidden)``) are projected with the layer's own frozen key and value maps, and every query
attends to them through a separate softmax scaled by a learned gate ``g`` that starts at zero::

    K_p = P W_k^T,  V_p = P W_v^T                         (no rotary embedding on the prompt keys)
    a   = g · softmax(RoPE(Q) K_p^T / sqrt(d_head)) V_p     (per head; grouped-query heads share K_p, V_p)
    out = attention(x) + a W_o^T

so at step 0 (``g = 0``) the model's output is exactly the base model's. The queries are the layer's own
rotated queries; the prompt keys are not rotated, as in Hugging Face PEFT's ``adaption_prompt`` (which this
module matches number for number on Llama and Mistral; see :func:`to_peft` / :func:`from_peft`). One scalar gate
per layer, used without ``tanh``, also as PEFT does. The prompt starts as standard normal noise (the official
code's ``nn.Embedding`` init). ``W_o``'s bias, if any, is not added a second time (PEFT would add it again).

Because the prompt keys carry no position, the adapter's output for a token depends on its absolute position:
left-padded batches need ``position_ids`` counted from the first real token (``generate()`` does this).

Supported: Hugging Face attention modules with ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` and a
``forward(hidden_states, position_embeddings=(cos, sin), ...)`` that applies rotary embeddings (Llama, Mistral,
Qwen2 shapes, any attention implementation: eager, SDPA, flash). Anything else is refused with an error
naming the model class and what is missing.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.core import PEFT_PREFIX, AdapterLayer, adapter_modules

__all__ = ["LlamaAdapterAttention", "check_llama_adapter_args", "find_llama_attention", "from_peft", "inject_llama_adapter", "to_peft"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def check_llama_adapter_args(adapter_len: Any, adapter_layers: Any) -> None:
    """Raise ``ValueError`` for an ``adapter_len`` below 1 or an ``adapter_layers`` that is neither None nor >= 1."""
    if isinstance(adapter_len, bool) or not isinstance(adapter_len, int) or adapter_len < 1:
        raise ValueError(f"adapter_len must be an integer >= 1 (the number of adaption prompt tokens per layer), got {adapter_len!r}.")
    if adapter_layers is not None and (isinstance(adapter_layers, bool) or not isinstance(adapter_layers, int) or adapter_layers < 1):
        raise ValueError(
            f"adapter_layers must be an integer >= 1 (how many of the top attention layers get prompts) or None for all, got {adapter_layers!r}."
        )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAdapterAttention(AdapterLayer):
    """A Llama-style attention module plus an adaption prompt and its zero-initialized gate.

    The wrapped module's children (``q_proj``, ..., ``o_proj``) are registered here under their own names, so
    base parameter names do not change (``...self_attn.q_proj.weight``); the wrapped module itself is kept
    out of the module tree and called for the base attention. Its other attributes (``layer_idx``,
    ``config``, ...) are reachable through this module.

    Args:
        attn: the attention module to adapt (see :func:`find_llama_attention` for what it must have).
        adapter_len: number of prompt tokens.
    """

    adapter_prefix = "adaption_"

    def __init__(self, attn: nn.Module, adapter_len: int) -> None:
        check_llama_adapter_args(adapter_len, None)
        problem = _attention_problem(attn)
        if problem:
            raise TypeError(f"LlamaAdapterAttention cannot wrap {type(attn).__name__}: {problem}.")
        super().__init__()
        self.training = attn.training
        self.__dict__["_base"] = attn  # not registered: its children are, under their own names
        for name, child in attn.named_children():
            self._modules[name] = child
        self.adapter_len = adapter_len
        self.head_dim = int(attn.head_dim)
        self.num_heads = attn.q_proj.out_features // self.head_dim
        self.num_kv_heads = attn.k_proj.out_features // self.head_dim
        w = attn.q_proj.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        hidden = attn.q_proj.in_features
        self.adaption_prompt = nn.Parameter(torch.randn(1, adapter_len, hidden, dtype=dtype, device=w.device))  # (1, L, C)
        self.adaption_gate = nn.Parameter(torch.zeros(1, dtype=dtype, device=w.device))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_base")
            if base is None:
                raise
            return getattr(base, name)

    def train(self, mode: bool = True) -> LlamaAdapterAttention:
        super().train(mode)
        self._base.training = mode  # attention dropout reads the wrapped module's flag
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("output_attentions"):
            # transformers records attention weights with hooks on its own attention classes, found by walking the
            # module tree, where the wrapped module no longer is: the result would silently miss these layers
            raise NotImplementedError(
                f"output_attentions=True is not supported on a model with LLaMA-Adapter layers (the wrapped "
                f"{type(self._base).__name__} is not reachable by transformers' output recording). Call without it, or "
                "inspect the base model's attention after lightning_peft.unload(model)."
            )
        out = self._base(*args, **kwargs)
        if self.disabled:
            return out
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        position_embeddings = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        if position_embeddings is None:
            raise RuntimeError(
                f"{type(self._base).__name__} was called without position_embeddings=(cos, sin): LLaMA-Adapter needs the "
                "rotary embeddings that Llama-style decoder layers pass to their attention."
            )
        attn_out, *rest = out if isinstance(out, tuple) else (out,)
        delta = self._adapter_output(hidden_states, position_embeddings)
        result = attn_out + delta
        return (result, *rest) if isinstance(out, tuple) else result

    def _adapter_output(self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, T, _ = x.shape
        hd, L = self.head_dim, self.adapter_len
        q = self.q_proj(x).view(B, T, self.num_heads, hd).transpose(1, 2)  # (B, H, T, hd)
        cos, sin = position_embeddings  # (B or 1, T, hd)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        prompt = self.adaption_prompt.to(x.dtype)
        k = self.k_proj(prompt).view(1, L, self.num_kv_heads, hd).transpose(1, 2)  # (1, Hkv, L, hd), not rotated
        v = self.v_proj(prompt).view(1, L, self.num_kv_heads, hd).transpose(1, 2)
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1).to(q.dtype)  # (1, H, L, hd): head h uses kv head h // groups
        v = v.repeat_interleave(groups, dim=1).to(q.dtype)
        scores = q @ k.transpose(2, 3) / hd**0.5  # (B, H, T, L)
        probs = F.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)  # fp16/bf16: in fp32
        a = (self.adaption_gate.to(q.dtype) * probs) @ v  # (B, H, T, hd)
        a = a.transpose(1, 2).reshape(B, T, self.num_heads * hd)
        delta = self.o_proj(a)  # (B, T, C)
        bias = getattr(self.o_proj, "bias", None)
        return delta - bias if bias is not None else delta

    def base_layer(self) -> nn.Module:
        return self._base

    def extra_repr(self) -> str:
        return f"adapter_len={self.adapter_len}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"


def _attention_problem(attn: nn.Module) -> Optional[str]:
    """Why ``attn`` cannot take adaption prompts, or None when it can."""
    missing = [p for p in _PROJECTIONS if not isinstance(getattr(attn, p, None), nn.Module)]
    if missing:
        return f"no {'/'.join(missing)} projection(s)"
    if "position_embeddings" not in inspect.signature(attn.forward).parameters:
        return "its forward takes no position_embeddings=(cos, sin), i.e. it does not apply rotary embeddings passed by the decoder layer"
    head_dim = getattr(attn, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim < 1:
        return "no integer head_dim attribute"
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    dims = [getattr(m, "out_features", None) for m in (q, k, v)]
    if any(not isinstance(d, int) or d % head_dim for d in dims) or getattr(q, "in_features", None) is None:
        return f"q/k/v projection widths {dims} are not multiples of head_dim={head_dim}"
    if (dims[0] // head_dim) % (dims[1] // head_dim) or dims[1] != dims[2]:
        return f"{dims[0] // head_dim} query heads cannot share {dims[1] // head_dim} key/value heads"
    own = [n for n, _ in attn.named_parameters(recurse=False)] + [n for n, _ in attn.named_buffers(recurse=False)]
    if own:
        return f"it holds parameters/buffers of its own ({own}), which a wrapper would not move or save"
    return None


def find_llama_attention(model: nn.Module) -> list[str]:
    """Qualified names of ``model``'s Llama-style attention modules, in model order.

    Raises:
        ValueError: no module has ``q_proj``/``k_proj``/``v_proj``/``o_proj`` taking rotary ``position_embeddings``;
            the message names the model class and what its attention modules lack.
    """
    names, rejected = [], {}
    for name, module in model.named_modules():
        if isinstance(module, LlamaAdapterAttention):
            raise ValueError(f"{type(model).__name__} already carries LLaMA-Adapter prompts (at {name}): inject them once.")
        has_any = any(isinstance(getattr(module, p, None), nn.Module) for p in _PROJECTIONS)
        if not has_any and "attention" not in type(module).__name__.lower():
            continue
        problem = _attention_problem(module)
        if problem is None:
            names.append(name)
        elif "attention" in type(module).__name__.lower() or has_any:
            rejected.setdefault(type(module).__name__, problem)
    if not names:
        seen = "; ".join(f"{cls}: {why}" for cls, why in list(rejected.items())[:4]) or "no attention module found"
        raise ValueError(
            f"LLaMA-Adapter does not support {type(model).__name__}: it needs Llama-style attention modules with "
            f"q_proj/k_proj/v_proj/o_proj projections and rotary position embeddings ({seen}). Use a Llama, Mistral "
            "or Qwen2-shaped model, or another method (LoRA, (IA)³, prefix tuning) for this one."
        )
    return names


def _inject_named(model: nn.Module, names: list[str], adapter_len: int) -> list[str]:
    """Build every layer first, then swap them in (all-or-nothing)."""
    new = {n: LlamaAdapterAttention(model.get_submodule(n), adapter_len) for n in names}
    for name, layer in new.items():
        model.set_submodule(name, layer)
    return names


def inject_llama_adapter(model: nn.Module, adapter_len: int = 10, adapter_layers: Optional[int] = None) -> list[str]:
    """Wrap the top ``adapter_layers`` attention modules of ``model`` in :class:`LlamaAdapterAttention`, in place.

    Args:
        model: a Llama-shaped model (or a module holding one).
        adapter_len: prompt tokens per layer.
        adapter_layers: how many of the last attention layers get prompts; None for all.

    Returns the wrapped modules' names. Everything is checked before the model is changed.
    """
    check_llama_adapter_args(adapter_len, adapter_layers)
    names = find_llama_attention(model)
    if adapter_layers is not None and adapter_layers > len(names):
        raise ValueError(
            f"adapter_layers={adapter_layers} is more than the {len(names)} attention layers of {type(model).__name__}: "
            f"use at most {len(names)}, or None for all."
        )
    names = names[-adapter_layers:] if adapter_layers is not None else names
    return _inject_named(model, names, adapter_len)


# -- Hugging Face PEFT format (peft_type "ADAPTION_PROMPT") ------------------------------------------------
_TENSORS = ("adaption_prompt", "adaption_gate")


def to_peft(model: nn.Module, layers: Optional[list[tuple[str, LlamaAdapterAttention]]] = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config fields, tensors)`` as PEFT's ``save_pretrained`` writes an adaption prompt.

    PEFT names the adapted layers by one suffix (``target_modules="self_attn"``) and a count from the top
    (``adapter_layers``), so the adapted modules must be the last ones with that suffix.
    """
    layers = layers if layers is not None else [(n, m) for n, m in adapter_modules(model) if isinstance(m, LlamaAdapterAttention)]
    if not layers:
        raise ValueError(f"{type(model).__name__} carries no LLaMA-Adapter layer to export: inject one first (LlamaAdapter().inject(model)).")
    suffixes = {n.rsplit(".", 1)[-1] for n, _ in layers}
    lens = {m.adapter_len for _, m in layers}
    if len(suffixes) != 1 or len(lens) != 1:
        raise NotImplementedError(f"PEFT's adaption prompt has one target name and one adapter_len; this model has {sorted(suffixes)} and {sorted(lens)}.")
    target = suffixes.pop()
    candidates = [n for n, _ in model.named_modules() if n.endswith(f".{target}")]
    if candidates[-len(layers):] != [n for n, _ in layers]:
        raise NotImplementedError(
            f"PEFT's adaption prompt adapts the last adapter_layers modules named *.{target}; the adapted modules "
            f"{[n for n, _ in layers][:4]} are not those."
        )
    tensors = {}
    for name, m in layers:
        tensors[f"{PEFT_PREFIX}{name}.adaption_prompt"] = m.adaption_prompt.detach()
        tensors[f"{PEFT_PREFIX}{name}.adaption_gate"] = m.adaption_gate.detach()
    config = {"task_type": "CAUSAL_LM", "target_modules": target, "adapter_len": lens.pop(), "adapter_layers": len(layers)}
    return config, tensors


def from_peft(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Inject LLaMA-Adapter layers into a plain ``model`` as a PEFT adaption-prompt ``config`` says and load ``tensors``.

    Every tensor name and shape is checked before ``model`` is changed. Returns the wrapped modules' names.
    """
    if config.get("peft_type") not in (None, "ADAPTION_PROMPT"):
        raise ValueError(f"from_peft for LLaMA-Adapter got peft_type={config.get('peft_type')!r}; expected 'ADAPTION_PROMPT'.")
    target, adapter_len, adapter_layers = config.get("target_modules") or "self_attn", config["adapter_len"], config["adapter_layers"]
    check_llama_adapter_args(adapter_len, adapter_layers)
    candidates = [n for n, _ in model.named_modules() if n.endswith(f".{target}")]
    if adapter_layers > len(candidates):
        raise ValueError(f"adapter_layers={adapter_layers} is more than the {len(candidates)} modules named *.{target} in {type(model).__name__}.")
    names = candidates[-adapter_layers:]
    for n in names:
        if isinstance(model.get_submodule(n), LlamaAdapterAttention):
            raise ValueError(f"{type(model).__name__} already carries LLaMA-Adapter prompts (at {n}): load the adapter into a plain base model.")
        problem = _attention_problem(model.get_submodule(n))
        if problem:
            raise ValueError(f"LLaMA-Adapter does not support {type(model).__name__}: {n} ({type(model.get_submodule(n)).__name__}) has {problem}.")
    plain = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in tensors.items()}
    problems = []
    for n in names:
        attn = model.get_submodule(n)
        hidden = attn.q_proj.in_features
        for t, shape in (("adaption_prompt", (1, adapter_len, hidden)), ("adaption_gate", (1,))):
            key = f"{n}.{t}"
            if key not in plain:
                problems.append(f"missing {key} (expected shape {list(shape)})")
            elif tuple(plain[key].shape) != shape:
                problems.append(f"{key}: file shape {list(plain[key].shape)}, model {list(shape)}")
    expected = {f"{n}.{t}" for n in names for t in _TENSORS}
    problems += [f"unexpected tensor {k} (shape {list(v.shape)})" for k, v in sorted(plain.items()) if k not in expected]
    if problems:
        listed = "\n  ".join(problems[:20])
        raise ValueError(f"the adaption prompt tensors do not fit {type(model).__name__} ({len(problems)} problem(s)):\n  {listed}")
    injected = _inject_named(model, names, adapter_len)
    with torch.no_grad():
        for n in injected:
            layer = model.get_submodule(n)
            layer.adaption_prompt.copy_(plain[f"{n}.adaption_prompt"])
            layer.adaption_gate.copy_(plain[f"{n}.adaption_gate"])
    return injected
