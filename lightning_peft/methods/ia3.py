"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al., 2022).

A frozen linear map ``W`` gains one learned vector ``l``, initialised to ones, that rescales either its
output (keys, values) or its input (the feed-forward layer after the nonlinearity)::

    h = l ⊙ (x W^T + b)          output scaling   (attention keys and values)
    h = (l ⊙ x) W^T + b          input scaling    (feed-forward down-projection, "feedforward_modules")

so the model is unchanged at step 0 and only ``l`` trains. Both forms fold into the base weights:
``W ← diag(l) W, b ← l ⊙ b`` (output) or ``W ← W diag(l)`` (input); ``unmerge()`` divides back out.

Default targets are the same table as Hugging Face PEFT 0.21 (``TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING``
and ``TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING``), looked up by the same key, the ``model_type`` of the
outermost Hugging Face model's config, so ``IA3()`` on a model adapts the same modules as ``peft.IA3Config()`` on it.
E.g. BERT ``key``, ``value``, ``output.dense`` (the suffix also matches ``attention.output.dense``, which PEFT then
scales on its input too); Llama/Mistral ``k_proj``, ``v_proj``, ``down_proj``; GPT-2 the fused ``c_attn`` and
``mlp.c_proj``; Qwen2/Gemma (``gemma3_text`` too) ``q_proj``, ``v_proj``, ``down_proj``; BART/Phi ``q_proj``, ``v_proj``,
``fc2``; Bloom/Falcon/GPT-NeoX ``query_key_value`` and ``dense_4h_to_h``. A model type PEFT has no entry for (e.g.
``phi3``, or the multimodal ``gemma3``, whose language model alone is ``gemma3_text``) is refused, as PEFT refuses it:
pass ``target_modules``. Only a model without a Hugging Face config is recognised by its module names instead.

:func:`to_peft` / :func:`from_peft` convert to and from PEFT's files (``adapter_config.json`` with
``"peft_type": "IA3"``, tensors ``base_model.model.<path>.ia3_l`` shaped ``(out, 1)`` or ``(1, in)``).
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.core import PEFT_PREFIX, adapter_modules
from lightning_peft.methods._linear import LinearAdapter, base_linear
from lightning_peft.quant import is_quantized
from lightning_peft.targeting import TargetSpec, find_targets, linear_types, match_name

__all__ = ["IA3Linear", "default_ia3_targets", "from_peft", "inject_ia3", "to_peft"]

# model_type -> (target_modules, feedforward_modules). This mirrors Hugging Face PEFT 0.21's constants
# (peft/utils/constants.py: TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and
# TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING), key for key and in PEFT's order; the tests compare it
# with the installed PEFT, so a change there shows up.
IA3_DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wi_1"], []),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "llama4": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    "deberta": (["in_proj", "output.dense"], ["output.dense"]),
    "RefinedWebModel": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "RefinedWeb": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
}
# Without a Hugging Face config, recognise the family by its module names (first match wins).
_BY_NAMES: tuple[tuple[str, str], ...] = (("attention.self.key", "bert"), ("self_attn.k_proj", "llama"), ("attn.c_attn", "gpt2"))


def _hf_config(model: nn.Module) -> Any:
    """The config of the outermost Hugging Face model in ``model`` (``model`` itself, or the one a LightningModule
    holds): the config PEFT reads its ``model_type`` from (``model.config``). ``None`` without one."""
    for m in model.modules():  # pre-order: an outer model comes before the submodels that share or nest its config
        config = getattr(m, "config", None)
        if isinstance(getattr(config, "model_type", None), str):
            return config
    return None


def _model_type(model: nn.Module) -> Optional[str]:
    """The key PEFT looks its defaults up by: the outermost config's ``model_type`` (a multimodal Gemma 3 is
    ``"gemma3"``, not its nested text config's ``"gemma3_text"``, as in PEFT)."""
    config = _hf_config(model)
    return None if config is None else config.model_type


def default_ia3_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """``(target_modules, feedforward_modules)`` for ``model``'s family: Hugging Face PEFT 0.21's defaults.

    Raises:
        ValueError: the model's ``model_type`` has no entry in PEFT's table (PEFT refuses it too), or a model
            without a Hugging Face config has none of the module names looked for; the message says what to pass.
    """
    config = _hf_config(model)
    model_type = None if config is None else config.model_type
    if model_type in IA3_DEFAULTS:
        targets, ff = IA3_DEFAULTS[model_type]
        return list(targets), list(ff)
    if model_type is not None:
        text_type = getattr(getattr(config, "text_config", None), "model_type", None)
        hint = ""
        if text_type in IA3_DEFAULTS:
            targets, ff = IA3_DEFAULTS[text_type]
            hint = (
                f" Its language model (model_type={text_type!r}) has the defaults target_modules={targets}, "
                f"feedforward_modules={ff}; other towers may hold modules of the same names, so restrict them "
                "(a regular expression over the language model's names, or exclude_modules)."
            )
        raise ValueError(
            f"(IA)³ has no default targets for {type(model).__name__} (model_type={model_type!r}): the defaults are "
            f"Hugging Face PEFT's table, which has no entry for it (peft.IA3Config() refuses it too). Pass "
            "target_modules (keys, values and the feed-forward down-projection, e.g. ['k_proj', 'v_proj', 'down_proj']) "
            f"and feedforward_modules (e.g. ['down_proj']).{hint} Model types with defaults: {sorted(IA3_DEFAULTS)}."
        )
    names = [n for n, _ in model.named_modules()]
    for suffix, family in _BY_NAMES:
        if any(n == suffix or n.endswith("." + suffix) for n in names):
            targets, ff = IA3_DEFAULTS[family]
            return list(targets), list(ff)
    raise ValueError(
        f"(IA)³ has no default targets for {type(model).__name__} (no Hugging Face config, so no model_type): it looked "
        f"for the model types {sorted(IA3_DEFAULTS)} and for modules named {[s for s, _ in _BY_NAMES]}. Pass "
        "target_modules (keys, values and the feed-forward down-projection, e.g. ['k_proj', 'v_proj', 'down_proj']) "
        "and feedforward_modules (e.g. ['down_proj'])."
    )


def check_ia3_args(target_modules: Any, feedforward_modules: Any) -> None:
    """Raise ``ValueError`` when ``feedforward_modules`` is given without ``target_modules`` or is not a subset."""
    if feedforward_modules is not None and target_modules is None:
        raise ValueError(
            f"feedforward_modules={feedforward_modules!r} was given without target_modules. Name the targets too "
            "(feedforward_modules must be a subset of them), or leave both unset for the per-family defaults."
        )
    if isinstance(target_modules, (list, tuple)) and isinstance(feedforward_modules, (list, tuple)):
        extra = sorted(set(feedforward_modules) - set(target_modules))
        if extra:
            raise ValueError(
                f"feedforward_modules {extra} are not in target_modules={list(target_modules)}. Feed-forward modules "
                "are targets whose input (not output) is rescaled: add them to target_modules too."
            )


class IA3Linear(LinearAdapter):
    """A linear layer (``nn.Linear`` or HF ``Conv1D``) whose output or input is rescaled by ``ia3_l``.

    The base parameters stay under their names (``weight``, ``bias``); ``ia3_l`` is a 1-D vector of
    size ``out_features`` (output scaling) or ``in_features`` (``feedforward=True``), initialised to ones.

    Args:
        base: the layer to adapt; its parameters are shared, not copied.
        feedforward: rescale the input (feed-forward layers) instead of the output.
    """

    adapter_prefix = "ia3_"

    def __init__(self, base: nn.Module, feedforward: bool = False) -> None:
        super().__init__(base)
        self.feedforward = feedforward
        size = self.in_features if feedforward else self.out_features
        self.ia3_l = nn.Parameter(torch.ones(size, dtype=self.adapter_dtype, device=self.weight.device))

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if weight is self.weight:  # the frozen base, plain or quantized
            return self.base_forward(x) if bias is self.bias else base_linear(x, weight, bias, self.fan_in_fan_out)
        return F.linear(x, weight.to(x.dtype).t() if self.fan_in_fan_out else weight.to(x.dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged and not self.disabled:
            return self._linear(x, self.weight, self.bias)
        weight, bias = (self.weight, self.bias) if not self.merged else self._unmerged_weights()
        if self.disabled:
            return self._linear(x, weight, bias)
        l = self.ia3_l.to(x.dtype)
        if self.feedforward:
            return self._linear(x * l, weight, bias)  # (..., in) scaled, then W
        return self._linear(x, weight, bias) * l  # (..., out) scaled

    # -- merge: W <- W * l along the scaled axis ----------------------------------------------------
    def _weight_scale(self) -> torch.Tensor:
        """``l`` shaped to broadcast over the weight in its own layout, in float32."""
        l = self.ia3_l.detach().float()
        # nn.Linear weight is (out, in), Conv1D (in, out); input scaling acts on the "in" axis
        along_rows = (self.feedforward and self.fan_in_fan_out) or (not self.feedforward and not self.fan_in_fan_out)
        return l.view(-1, 1) if along_rows else l.view(1, -1)

    def _unmerged_weights(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        s = self._weight_scale()
        weight = self.dense_weight() / s
        weight = weight if is_quantized(self.weight) else weight.to(self.weight.dtype)
        bias = self.bias
        if bias is not None and not self.feedforward:
            bias = (bias.float() / self.ia3_l.detach().float()).to(bias.dtype)
        return weight, bias

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        l = self.ia3_l.detach()
        if not torch.isfinite(l).all() or (l == 0).any():
            raise ValueError(
                f"Merging this (IA)³ vector ({l.numel()} entries) would write NaN/inf into the base weight or could not be "
                "undone (a scale is 0); the weight was left unchanged. Check the training run or reload the adapter."
            )
        self._write_weight(self.dense_weight() * self._weight_scale(), "the (IA)³ merge")
        if self.bias is not None and not self.feedforward:
            self.bias.copy_((self.bias.float() * l.float()).to(self.bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight, bias = self._unmerged_weights()
        self._write_weight(weight.float(), "the (IA)³ unmerge")
        if bias is not None and bias is not self.bias:
            self.bias.copy_(bias)
        self.merged = False

    def extra_repr(self) -> str:
        kind = "input (feed-forward)" if self.feedforward else "output"
        return f"in_features={self.in_features}, out_features={self.out_features}, scales={kind}, merged={self.merged}"


def resolve_ia3_targets(
    model: nn.Module, target_modules: Optional[TargetSpec], feedforward_modules: Optional[TargetSpec]
) -> tuple[TargetSpec, TargetSpec]:
    """The targets to use: the given ones, else the family defaults (``feedforward_modules`` defaults to none
    when only ``target_modules`` is given)."""
    check_ia3_args(target_modules, feedforward_modules)
    if target_modules is None:
        return default_ia3_targets(model)
    return target_modules, (feedforward_modules if feedforward_modules is not None else [])


def _is_feedforward(name: str, feedforward_modules: TargetSpec) -> bool:
    if isinstance(feedforward_modules, str):
        return match_name(name, feedforward_modules)
    return bool(feedforward_modules) and match_name(name, feedforward_modules)


def _peft_is_feedforward(name: str, feedforward_modules: TargetSpec) -> bool:
    """PEFT's own rule (``IA3Model._check_target_module_feedforward``): a plain suffix, or a whole-name regex."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(t) for t in feedforward_modules)


def inject_ia3(
    model: nn.Module,
    target_modules: Optional[TargetSpec] = None,
    feedforward_modules: Optional[TargetSpec] = None,
    exclude_modules: Optional[TargetSpec] = None,
) -> list[str]:
    """Wrap the matching layers of ``model`` in :class:`IA3Linear`, in place; returns their names.

    Args:
        model: any module; Hugging Face models get per-family defaults.
        target_modules: layers to rescale; None uses the family defaults (see the module docstring).
        feedforward_modules: the targets whose input is rescaled (same forms as ``target_modules``).
        exclude_modules: layers to leave alone.

    All targets are validated and all layers built before the first one is swapped in.
    """
    targets, ff = resolve_ia3_targets(model, target_modules, feedforward_modules)
    # peft's per-family defaults may name modules a variant lacks (Mixtral's fused experts have no w2): as peft, only
    # the targets the user names must each match
    names = find_targets(model, targets, exclude_modules, supported=linear_types(), method="(IA)³", each_entry=target_modules is not None)
    new = {n: IA3Linear(model.get_submodule(n), feedforward=_is_feedforward(n, ff)) for n in names}
    for name, layer in new.items():
        model.set_submodule(name, layer)
    return names


# -- Hugging Face PEFT format -----------------------------------------------------------------------


def to_peft(model: nn.Module, adapter_layers: Optional[list[tuple[str, IA3Linear]]] = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config.json content, tensors)`` as PEFT's ``save_pretrained`` writes them for (IA)³.

    Args:
        model: the Hugging Face model carrying the layers (tensor paths are relative to it).
        adapter_layers: ``(name relative to model, layer)`` pairs; None takes every :class:`IA3Linear` in ``model``.

    ``target_modules`` and ``feedforward_modules`` are the exact module names, which PEFT matches by suffix.
    """
    layers = adapter_layers if adapter_layers is not None else [(n, m) for n, m in adapter_modules(model) if isinstance(m, IA3Linear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} carries no (IA)³ layer to export: inject one first (IA3().inject(model)).")
    tensors = {}
    for name, m in layers:
        l = m.ia3_l.detach()
        tensors[f"{PEFT_PREFIX}{name}.ia3_l"] = l.view(1, -1) if m.feedforward else l.view(-1, 1)
    fan = {m.fan_in_fan_out for _, m in layers}
    if len(fan) > 1:
        raise NotImplementedError("PEFT's IA3 format has one fan_in_fan_out flag: this model mixes nn.Linear and Conv1D targets.")
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    config = {
        "peft_type": "IA3",
        "task_type": None,
        "base_model_name_or_path": name_or_path or None,
        "target_modules": sorted(n for n, _ in layers),
        "feedforward_modules": sorted(n for n, m in layers if m.feedforward),
        "exclude_modules": None,
        "fan_in_fan_out": fan.pop(),
        "modules_to_save": None,
        "init_ia3_weights": True,
        "inference_mode": True,
        "revision": None,
        "auto_mapping": None,
    }
    return config, tensors


def from_peft(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Inject (IA)³ layers into a plain Hugging Face ``model`` as PEFT ``config`` says, and load ``tensors``.

    Module names in ``target_modules`` / ``feedforward_modules`` follow PEFT's matching (a list matches by
    suffix, a string is a regular expression; a feed-forward name matches as a plain, not dotted, suffix, as in PEFT). Keys of trained base modules (``modules_to_save``) are loaded too.
    Returns the names of the wrapped modules.
    """
    if config.get("peft_type") != "IA3":
        raise ValueError(f"from_peft for (IA)³ got a config with peft_type={config.get('peft_type')!r}; expected 'IA3'.")
    targets, ff = config.get("target_modules"), config.get("feedforward_modules") or []
    if isinstance(targets, (set, tuple)):
        targets = sorted(targets)
    if isinstance(ff, (set, tuple)):
        ff = sorted(ff)
    # check every key before touching the model
    plain = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in tensors.items()}
    if targets is None:
        targets, ff = default_ia3_targets(model)
    names = find_targets(model, targets, config.get("exclude_modules"), supported=linear_types(), method="(IA)³", each_entry=False)
    missing = [f"{n}.ia3_l" for n in names if f"{n}.ia3_l" not in plain]
    params = dict(model.named_parameters())
    unknown = [k for k in plain if not k.endswith(".ia3_l") and k not in params]
    unknown += [k for k in plain if k.endswith(".ia3_l") and k[: -len(".ia3_l")] not in names]
    if missing or unknown:
        raise ValueError(
            f"The (IA)³ tensors do not fit {type(model).__name__}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unknown[:5]}{'...' if len(unknown) > 5 else ''}. Load the adapter into the base model it was trained on."
        )
    new = {n: IA3Linear(model.get_submodule(n), feedforward=_peft_is_feedforward(n, ff)) for n in names}
    bad = [f"{n}.ia3_l: file {list(plain[n + '.ia3_l'].shape)}, model {m.ia3_l.numel()}" for n, m in new.items() if plain[n + ".ia3_l"].numel() != m.ia3_l.numel()]
    if bad:
        raise ValueError(f"(IA)³ tensor shapes do not fit the model: {bad[:5]}. Load the adapter into the base model it was trained on.")
    for name, layer in new.items():
        with torch.no_grad():
            layer.ia3_l.copy_(plain[f"{name}.ia3_l"].reshape(-1))
        model.set_submodule(name, layer)
    with torch.no_grad():
        for k, v in plain.items():
            if not k.endswith(".ia3_l"):
                params[k].copy_(v)
    return names
