"""QLoRA as a Lightning precision plugin: 4-bit or 8-bit frozen base weights, adapters in float32, compute in bf16.

QLoRA (Dettmers et al., 2023) trains LoRA adapters over a base whose frozen linear weights are stored in
4 bits (NF4, with the block scales quantized again: "double quantization") and dequantized to the compute
dtype one layer at a time::

    h = x dequant(W_nf4)^T + b + s * x A^T B^T

``mode="int8"`` stores the base in LLM.int8 instead (Dettmers et al., 2022; bitsandbytes' ``Linear8bitLt``
format): int8 codes with one scale per output row, an int8 matmul in the forward with the input's outlier
columns (any value >= ``int8_threshold``) multiplied in 16 bits, and ``grad_x = g dequant(W_int8)`` in backward::

    h = LLMint8(x, W_int8)^T + b + s * x A^T B^T

:class:`QLoRAPrecision` does the storage part when Lightning converts the module (``strategy.setup``, after
the PEFT callbacks injected their adapters, before the model moves to its device):

* the frozen weight of every layer that wraps a linear (:class:`~lightning_peft.methods._linear.LinearAdapter`:
  LoRA, AdaLoRA, (IA)³) is replaced in place by a bitsandbytes ``Params4bit`` (or ``Int8Params``); the layer
  reads it through :func:`lightning_peft.quant.frozen_linear` (forward) and :func:`lightning_peft.quant.dequantize`
  (LoRA's backward, which saves only the packed bytes): one implementation of each method for every base precision;
* every other frozen ``nn.Linear`` becomes a :class:`~lightning_peft.quant.QuantLinear` (the same helper);
* the output head (``lm_head``, ``classifier``, ``score``), ``ignore_modules``, trainable layers, layers
  sharing their weight with another module, and linear layers inside other adapter types stay as they are;
* the adapter parameters of those layers are kept in float32 (the optimizer's master weights; the layers cast
  them to the activation dtype inside their forward, a copy of r x in values, so no activation is ever upcast); every
  other floating parameter (norms, embeddings, biases, the head, ``trainable_modules``) is cast to the
  compute dtype. Buffers (e.g. rotary frequencies) are left as they are.

Unlike Lightning's ``BitsandbytesPrecision`` it leaves adapters alone; unlike Hugging Face's
``prepare_model_for_kbit_training`` it upcasts nothing to float32.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Literal, Optional, Union

import torch
from lightning.fabric.plugins.precision.utils import _convert_fp_tensor, _DtypeContextManager
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import rank_zero_info
from lightning_utilities import apply_to_collection
from torch import Tensor, nn
from typing_extensions import override

from lightning_peft.core import AdapterLayer
from lightning_peft.methods._linear import LinearAdapter
from lightning_peft.quant import QUANT_MODES, QuantLinear, import_bitsandbytes, is_quantized, quantize_weight, quantized_bytes
from lightning_peft.targeting import match_name, output_head_names

__all__ = ["QLoRAPrecision", "SUPPORTED_STRATEGIES"]

QuantMode = Literal["nf4", "nf4-dq", "fp4", "fp4-dq", "int8"]

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "32": torch.float32, "float32": torch.float32, "float": torch.float32,
}

#: Strategies the plugin runs under (checked when the module is converted).
SUPPORTED_STRATEGIES = ("auto / single device (SingleDeviceStrategy)", "ddp (DDPStrategy)")


def _parse_dtype(value: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in (torch.bfloat16, torch.float16, torch.float32):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise ValueError(
        f"QLoRAPrecision: compute_dtype={value!r} is not supported; use torch.bfloat16 ('bf16'), torch.float16 "
        "('fp16') or torch.float32 ('fp32')."
    )


class QLoRAPrecision(Precision):
    """Quantize the frozen base ``nn.Linear`` weights to 4 bits (QLoRA) or LLM.int8 and compute in ``compute_dtype``.

    Use it with a PEFT callback (e.g. :class:`~lightning_peft.callbacks.lora.LoRA`), which freezes the base
    and injects adapters before Lightning converts the module; the order in which the callback and the
    plugin are declared does not matter. Checkpoints stay adapter-only (the callback's rule): the quantized
    base is never saved. Runs on CPU (bitsandbytes' CPU backend) and CUDA, alone or under DDP; FSDP and
    DeepSpeed are refused.

    Args:
        mode: ``"nf4"`` (NormalFloat), ``"nf4-dq"`` (NF4 with double-quantized scales, 0.516 bytes per weight:
            the QLoRA recipe), ``"fp4"``, ``"fp4-dq"``, or ``"int8"`` (LLM.int8: 1 byte per weight plus one
            float32 scale per output row; int8 matmul with 16-bit outlier columns).
        compute_dtype: dtype of activations and dequantized weights: ``torch.bfloat16`` / ``"bf16"``,
            ``torch.float16`` / ``"fp16"`` or ``torch.float32`` / ``"fp32"``. With fp16 no loss scaling is done:
            prefer bf16 where the hardware has it.
        ignore_modules: linear layers to keep unquantized, as names, dotted suffixes or subtrees (``["mlp"]``
            keeps every layer under a module named ``mlp``). The output head is always kept.
        blocksize: 4-bit modes: weights per quantization block (64, as in the QLoRA paper).
        int8_threshold: ``"int8"``: the LLM.int8 outlier threshold; input columns holding a value of at least
            this magnitude are multiplied in 16 bits (6.0 as in the paper; 0.0: everything in int8).

    Example::

        trainer = L.Trainer(plugins=[QLoRAPrecision("nf4-dq")], callbacks=[LoRA(r=16, alpha=32)])
        trainer = L.Trainer(plugins=[QLoRAPrecision("int8", int8_threshold=6.0)], callbacks=[LoRA(r=16, alpha=32)])

    In YAML (``lightning-peft fit --config configs/qlora.yaml``)::

        trainer:
          plugins:
            - class_path: lightning_peft.plugins.QLoRAPrecision
              init_args: {mode: nf4-dq, compute_dtype: bf16}
    """

    def __init__(
        self,
        mode: QuantMode = "nf4-dq",
        compute_dtype: Union[str, torch.dtype] = "bf16",
        ignore_modules: Optional[list[str]] = None,
        blocksize: int = 64,
        int8_threshold: float = 6.0,
    ) -> None:
        if mode not in QUANT_MODES:
            raise ValueError(f"QLoRAPrecision: mode={mode!r} is not a quantization mode; choose one of {list(QUANT_MODES)}.")
        if not isinstance(int8_threshold, (int, float)) or isinstance(int8_threshold, bool) or not int8_threshold >= 0.0:
            raise ValueError(
                f"QLoRAPrecision: int8_threshold={int8_threshold!r} must be a number >= 0 (6.0 is the LLM.int8 paper's "
                "outlier threshold; 0.0 multiplies every input column in int8)."
            )
        self.compute_dtype = _parse_dtype(compute_dtype)
        if isinstance(ignore_modules, str) or not all(isinstance(n, str) for n in ignore_modules or []):
            raise TypeError(f"QLoRAPrecision: ignore_modules must be a list of module names, got {ignore_modules!r}.")
        if not isinstance(blocksize, int) or blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"QLoRAPrecision: blocksize must be a power of two in [32, 4096], got {blocksize!r}; 64 is the QLoRA default.")
        import_bitsandbytes()  # fail now, with the install command, rather than at fit
        self.mode = mode
        self.ignore_modules = list(ignore_modules or [])
        self.blocksize = blocksize
        self.int8_threshold = float(int8_threshold)

    def __repr__(self) -> str:
        extra = f", int8_threshold={self.int8_threshold:g}" if self.mode == "int8" else ""
        return f"QLoRAPrecision(mode={self.mode!r}, compute_dtype={self.compute_dtype}, ignore_modules={self.ignore_modules}{extra})"

    def __str__(self) -> str:
        # Lightning's own strategy errors print the plugin (FSDP refuses it at Trainer construction): say what works
        return f"{self!r} [supported strategies: {', '.join(SUPPORTED_STRATEGIES)}]"

    # -- the module --------------------------------------------------------------------------------
    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        """Quantize ``module``'s frozen linear weights (on the strategy's device) and cast the rest; idempotent."""
        trainer = getattr(module, "_trainer", None)
        if trainer is not None:
            self._check_strategy(trainer.strategy)
            device = trainer.strategy.root_device
        else:
            device = None
        plan = self.plan(module)
        for name in plan:
            layer = module.get_submodule(name)
            weight = quantize_weight(layer.weight, self.mode, self.compute_dtype, device, self.blocksize, self.int8_threshold)
            if isinstance(layer, LinearAdapter):
                layer.weight = weight
            else:
                module.set_submodule(name, QuantLinear(weight, layer.bias))
        self._cast(module)
        if plan:
            nbytes, params = quantized_bytes(module)
            rank_zero_info(
                f"QLoRAPrecision: quantized {len(plan)} linear layers to {self.mode} ({params:,} weights, "
                f"{nbytes / 2**20:,.1f} MiB, {nbytes / max(params, 1):.3f} bytes per weight); compute dtype {self.compute_dtype}."
            )
        return module

    def plan(self, module: nn.Module) -> list[str]:
        """Names of the layers :meth:`convert_module` would quantize; raises if there are none (and none are yet)."""
        self._check_ignore_modules(module)
        heads = output_head_names(module)
        counts: dict[int, int] = {}
        for _, p in module.named_parameters(remove_duplicate=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
        others = [n for n, m in module.named_modules() if isinstance(m, AdapterLayer) and not isinstance(m, LinearAdapter)]
        plan, skipped, done = [], {"trainable": 0, "head or ignored": 0, "shared weight": 0, "other adapter": 0}, 0
        for name, layer in module.named_modules():
            wraps_linear = isinstance(layer, LinearAdapter) and layer.wraps_linear
            if not (wraps_linear and not layer.fan_in_fan_out) and not (type(layer) is nn.Linear or isinstance(layer, QuantLinear)):
                continue
            weight = layer.weight
            if is_quantized(weight):
                done += 1
            elif any(name == o or name.startswith(o + ".") for o in others if o):
                skipped["other adapter"] += 1
            elif self._ignored(name, heads):
                skipped["head or ignored"] += 1
            elif weight.requires_grad:
                skipped["trainable"] += 1
            elif counts.get(id(weight), 0) > 1:
                skipped["shared weight"] += 1
            elif weight.is_floating_point() and not weight.is_meta:
                plan.append(name)
        if not plan and not done:
            why = ", ".join(f"{k}: {v}" for k, v in skipped.items() if v) or "the model has no nn.Linear layer"
            raise ValueError(
                f"QLoRAPrecision found no linear layer to quantize in {type(module).__name__} ({why}). It quantizes "
                "frozen nn.Linear weights (plain or inside LoRA layers): attach a PEFT callback such as LoRA, which "
                "freezes the base, and check ignore_modules."
            )
        return plan

    def _ignored(self, name: str, heads: set[str]) -> bool:
        parts = name.split(".")
        prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
        return any(p in heads for p in prefixes) or bool(self.ignore_modules) and any(match_name(p, self.ignore_modules) for p in prefixes)

    def _check_ignore_modules(self, module: nn.Module) -> None:
        names = [n for n, _ in module.named_modules() if n]
        unmatched = [i for i in self.ignore_modules if not any(match_name(n, [i]) for n in names)]
        if unmatched:
            candidates = sorted({n.split(".")[-1] for n in names})[:20]
            raise ValueError(f"QLoRAPrecision: ignore_modules entries {unmatched} match no module. Candidate names: {candidates}.")

    def _cast(self, module: nn.Module) -> None:
        adapter_params = {id(m.get_parameter(n)) for m in module.modules() if isinstance(m, LinearAdapter) for n in m.adapter_params()}
        for param in module.parameters():
            if is_quantized(param) or not param.is_floating_point():
                continue
            dtype = torch.float32 if id(param) in adapter_params else self.compute_dtype
            if param.dtype != dtype:
                param.data = param.data.to(dtype)

    @staticmethod
    def _check_strategy(strategy: Any) -> None:
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        if type(strategy) not in (SingleDeviceStrategy, DDPStrategy):
            raise ValueError(
                f"QLoRAPrecision does not support the {type(strategy).__name__}; supported strategies: "
                f"{', '.join(SUPPORTED_STRATEGIES)}. FSDP and DeepSpeed shard parameters, which packed quantized weights "
                "do not allow here: use strategy='ddp' or a single device."
            )

    # -- dtypes during the run ---------------------------------------------------------------------
    @override
    def tensor_init_context(self) -> AbstractContextManager:
        return _DtypeContextManager(self.compute_dtype)

    @override
    def module_init_context(self) -> AbstractContextManager:
        return self.tensor_init_context()

    @override
    def forward_context(self) -> AbstractContextManager:
        return _DtypeContextManager(self.compute_dtype)

    @override
    def convert_input(self, data: Any) -> Any:
        return apply_to_collection(data, function=_convert_fp_tensor, dtype=Tensor, dst_type=self.compute_dtype)

    @override
    def convert_output(self, data: Any) -> Any:
        return apply_to_collection(data, function=_convert_fp_tensor, dtype=Tensor, dst_type=torch.get_default_dtype())
