"""Quantized frozen base weights for QLoRA (Dettmers et al., 2023), stored through bitsandbytes.

A frozen ``W`` (out x in) is kept as 4-bit codes plus per-block scales::

    W ~= absmax_b * code[q_ij]        q_ij in 0..15, one absmax per block of 64 weights
    nf4: code = the 16 quantiles of N(0, 1) (NormalFloat);  fp4: a 4-bit float code
    -dq ("double quantization"): the absmax are quantized again to 8 bits (blocks of 256)

so NF4 with double quantization costs 4 + 8/64 + 32/(64*256) = 4.127 bits = 0.516 bytes per weight.

``"int8"`` is LLM.int8 (Dettmers et al., 2022): one int8 code per weight and one absmax per output row
(1 + 4/in bytes per weight). In the forward the input is quantized per row too and multiplied in int8,
except the input columns holding a value above ``threshold`` (the outlier features, 6.0 in the paper),
which are multiplied in 16 bits against the dequantized weight columns::

    y = dequant(int8(x_regular) @ W_int8^T) + x_outliers @ dequant(W_int8[:, outliers])^T

Every base linear forward goes through :func:`frozen_linear` (plain, 4-bit, or LLM.int8) and every
backward through :func:`dequantize`, which returns a plain tensor unchanged and rebuilds a compute-dtype
copy of a quantized one; that copy is a temporary of one layer's forward or backward, never kept between
them (the autograd functions save the packed weight, not the copy). For int8 that backward is what
bitsandbytes' own ``Linear8bitLt`` does: ``grad_x = grad_y @ dequant(W_int8)``.

``bitsandbytes`` is imported only when a weight is quantized (``pip install "lightning-peft[qlora]"``).
"""

from __future__ import annotations

import functools
import warnings
from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "QUANT_MODES",
    "QuantLinear",
    "compute_dtype",
    "dequantize",
    "dequantize_model",
    "frozen_linear",
    "is_quantized",
    "quantize_weight",
    "quantized_bytes",
    "requantize",
    "weight_shape",
]

#: The 4-bit modes (NormalFloat or float codes, with (``-dq``) or without double quantization) and LLM.int8.
QUANT_MODES = ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8")

_INSTALL = 'pip install "lightning-peft[qlora]"'


@functools.lru_cache(maxsize=1)
def import_bitsandbytes() -> ModuleType:
    """``bitsandbytes``, or an ``ImportError`` that says how to install it."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(f"QLoRA needs the bitsandbytes package, which is not installed: {_INSTALL}") from err
    return bitsandbytes


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a bitsandbytes 4-bit (``Params4bit``) or int8 (``Int8Params``) quantized tensor."""
    if getattr(weight, "quant_state", None) is not None:
        return True
    return weight.dtype == torch.int8 and getattr(weight, "SCB", None) is not None


def dequantize(weight: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The weight as a plain floating tensor: ``weight`` itself when it is not quantized (``dtype`` is then
    ignored), else a new tensor in ``dtype`` (default: the dtype it was quantized from) and its logical shape."""
    state = getattr(weight, "quant_state", None)
    if state is not None:  # 4-bit: packed codes + QuantState
        w = import_bitsandbytes().functional.dequantize_4bit(weight.data, state)
    elif weight.dtype == torch.int8 and getattr(weight, "SCB", None) is not None:  # int8 rows, one absmax per row
        w = weight.data.float() * (weight.SCB.float().unsqueeze(1) / 127.0)
        dtype = dtype or compute_dtype(weight)
    else:
        return weight
    return w if dtype is None or w.dtype == dtype else w.to(dtype)


def compute_dtype(weight: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype a quantized weight computes in (``None`` for a plain weight: it computes in its input's dtype)."""
    state = getattr(weight, "quant_state", None)
    if state is not None:
        return state.dtype
    if is_quantized(weight):  # int8: recorded by quantize_weight; bitsandbytes' own Int8Params compute in fp16
        return getattr(weight, "compute_dtype", torch.float16)
    return None


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x W^T + b`` for a frozen ``W`` (no autograd through ``W``): plain, 4-bit (dequantized to ``x.dtype``
    for this call) or int8 (LLM.int8: int8 matmul with the 16-bit outlier columns of ``x`` above the
    weight's ``threshold``, as bitsandbytes' ``Linear8bitLt`` computes its inference forward)."""
    if weight.dtype != torch.int8 or getattr(weight, "SCB", None) is None or x.numel() == 0:
        return F.linear(x, dequantize(weight, x.dtype), bias)
    bnb = import_bitsandbytes()
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    threshold = float(getattr(weight, "threshold", 0.0))
    # bitsandbytes quantizes activations from fp16 (MatMul8bitLt does the same cast)
    cx, sx, outliers = bnb.functional.int8_vectorwise_quant(x2.to(torch.float16), threshold=threshold)
    bias = bias.to(x.dtype) if bias is not None and bias.dtype != x.dtype else bias
    if threshold > 0.0:
        out, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm(x2, cx, weight.data, sx, weight.SCB, outliers, bias)
    else:
        out = torch.ops.bitsandbytes.int8_scaled_mm(cx, weight.data, sx, weight.SCB, bias=bias, dtype=x.dtype)
    return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])  # (..., out)


def weight_shape(weight: torch.Tensor) -> torch.Size:
    """The logical shape of a weight (a packed 4-bit weight is stored as a ``(n/2, 1)`` byte tensor; a ZeRO-3
    partitioned one as an empty placeholder; a DTensor's ``shape`` is already the global one)."""
    state = getattr(weight, "quant_state", None)
    if state is not None:
        return torch.Size(state.shape)
    ds_shape = getattr(weight, "ds_shape", None)  # a DeepSpeed ZeRO-3 partition holds a (0,)-shaped placeholder
    return torch.Size(ds_shape) if ds_shape is not None else weight.shape


_CODEBOOKS: dict[tuple, torch.Tensor] = {}


def _share_constant(t: torch.Tensor, name: str) -> torch.Tensor:
    """One tensor per (codebook, device): bitsandbytes makes a fresh copy of its 16/256-entry codebooks per weight."""
    key = (name, t.device, t.dtype, t.shape)
    kept = _CODEBOOKS.get(key)
    if kept is not None and torch.equal(kept, t):
        return kept
    _CODEBOOKS[key] = t
    return t


def quantize_weight(
    weight: torch.Tensor, mode: str = "nf4-dq", dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None, blocksize: int = 64, threshold: float = 6.0,
) -> nn.Parameter:
    """A frozen bitsandbytes ``Params4bit`` (4-bit modes) or ``Int8Params`` (``"int8"``) holding ``weight``.

    Args:
        weight: the floating weight to quantize (any layout; its shape is kept in the quant state).
        mode: ``"nf4"``, ``"nf4-dq"``, ``"fp4"``, ``"fp4-dq"`` or ``"int8"`` (see :data:`QUANT_MODES`).
        dtype: the dtype :func:`dequantize` returns by default (the compute dtype); default ``weight.dtype``.
        device: where the packed weight lives (quantization runs there); default ``weight.device``.
        blocksize: 4-bit modes: weights per absmax scale (64 as in the QLoRA paper).
        threshold: ``"int8"``: the LLM.int8 outlier threshold (input columns with a value of at least this
            magnitude are multiplied in 16 bits; 6.0 as in the paper, 0.0 for none).
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"Unknown quantization mode {mode!r}; choose one of {list(QUANT_MODES)}.")
    bnb = import_bitsandbytes()
    if mode == "int8":
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not threshold >= 0.0:
            raise ValueError(f"The LLM.int8 outlier threshold must be a number >= 0, got {threshold!r}; 6.0 is the paper's value, 0.0 disables outliers.")
        w16 = weight.detach().to(device=device or weight.device, dtype=torch.float16).contiguous()  # as Int8Params quantizes
        codes, scales, _ = bnb.functional.int8_vectorwise_quant(w16)  # (out, in) int8, (out,) float32 row absmax
        param = _int8_params_class()(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales)
        param.threshold = float(threshold)
        param.compute_dtype = dtype or (weight.dtype if weight.dtype.is_floating_point else torch.float16)
        return param
    quant_type, double = mode.split("-")[0], mode.endswith("-dq")
    w = weight.detach().to(device=device or weight.device, dtype=dtype or weight.dtype).contiguous()
    packed, state = bnb.functional.quantize_4bit(w, blocksize=blocksize, compress_statistics=double, quant_type=quant_type)
    state.code = _share_constant(state.code, quant_type)
    if state.nested:
        state.state2.code = _share_constant(state.state2.code, "dynamic")
    return bnb.nn.Params4bit(
        packed, requires_grad=False, quant_state=state, blocksize=blocksize, compress_statistics=double,
        quant_type=quant_type, bnb_quantized=True,
    )


@functools.cache
def _int8_params_class() -> type:
    """bitsandbytes' ``Int8Params`` keeping ``threshold`` and ``compute_dtype`` through ``copy.deepcopy``: its own
    ``__deepcopy__`` rebuilds the tensor from its constructor arguments and drops every other attribute, so a
    copied int8 model (an EMA copy, ``copy.deepcopy(model)``) silently lost its outlier threshold."""
    bnb = import_bitsandbytes()

    class Int8Weight(bnb.nn.Int8Params):
        def __deepcopy__(self, memo: dict) -> "Int8Weight":
            new = super().__deepcopy__(memo)
            for name in ("threshold", "compute_dtype"):
                if hasattr(self, name):
                    setattr(new, name, getattr(self, name))
            return new

    return Int8Weight


def requantize(old: torch.Tensor, new: torch.Tensor, what: str = "the weight") -> nn.Parameter:
    """``new`` (a float tensor of the logical shape) quantized the way ``old`` (``Params4bit`` or int8) is.

    Rounds: warns, since merging into a quantized base and unmerging do not give back the original weight.
    """
    state = getattr(old, "quant_state", None)
    mode = "int8" if state is None else state.quant_type + ("-dq" if state.nested else "")
    bits = 8 if state is None else 4
    warnings.warn(
        f"Writing {what} into a {mode} quantized base weight: the result is re-quantized to {bits} bits, which rounds it "
        "(an update much smaller than the quantization step is lost, and unmerging does not restore the base "
        "exactly). For a merged model without that rounding, dequantize first: "
        "lightning_peft.quant.dequantize_model(model, torch.bfloat16), then merge.",
        UserWarning,
        stacklevel=3,
    )
    if state is None:
        return quantize_weight(new, "int8", dtype=compute_dtype(old), device=old.device, threshold=getattr(old, "threshold", 0.0))
    return quantize_weight(new, mode, dtype=state.dtype, device=old.device, blocksize=state.blocksize)


class _FrozenLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` for a frozen quantized ``W``: saves the packed ``W`` only and dequantizes it again in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        out = frozen_linear(x, weight, bias)
        ctx.save_for_backward(weight)
        ctx.bias_grad = bias is not None and ctx.needs_input_grad[2]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        grad_x = grad_out @ dequantize(weight, grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.bias_grad else None
        return grad_x, None, grad_bias


class QuantLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is stored quantized (``Params4bit`` or int8, from :func:`quantize_weight`).

    It is an ``nn.Linear`` (``in_features``/``out_features``, ``weight``, ``bias``), so targeting and
    :class:`~lightning_peft.methods.lora.LoRALinear` accept it. The input is cast to the weight's compute dtype.
    """

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter] = None) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a float weight
        self.out_features, self.in_features = weight_shape(weight)
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(self.weight) or x.dtype
        bias = self.bias.to(dtype) if self.bias is not None and self.bias.dtype != dtype else self.bias
        return _FrozenLinearFunction.apply(x.to(dtype), self.weight, bias)

    def dequantized(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight."""
        with torch.device("meta"):
            layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        layer.weight = nn.Parameter(dequantize(self.weight, dtype), requires_grad=False)
        layer.bias = self.bias
        return layer

    def extra_repr(self) -> str:
        state = getattr(self.weight, "quant_state", None)
        if state is not None:
            mode = f"{state.quant_type}{'-dq' if state.nested else ''}, compute_dtype={state.dtype}"
        else:
            mode = f"int8, threshold={getattr(self.weight, 'threshold', 0.0):g}, compute_dtype={compute_dtype(self.weight)}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {mode}"


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every quantized weight of ``model`` by a plain frozen ``dtype`` weight, in place; returns ``model``.

    :class:`QuantLinear` layers become ``nn.Linear``; LoRA layers keep their adapters over a plain base again.
    Exporting a merged model from a QLoRA run::

        dequantize_model(model, torch.bfloat16)
        unload(model, merge=True)          # exact merge in bf16, no 4-bit rounding
        hf_model.save_pretrained("merged")
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            if name:
                model.set_submodule(name, module.dequantized(dtype))
        elif is_quantized(getattr(module, "weight", torch.empty(0))):
            module.weight = nn.Parameter(dequantize(module.weight, dtype), requires_grad=False)
    return model


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """``(bytes, parameters)`` of the quantized weights of ``model``: packed codes plus every quant-state
    tensor (absmax, nested absmax and offset, codebooks), each storage counted once."""
    seen: set[tuple] = set()
    nbytes = params = 0

    def add(t: Optional[torch.Tensor]) -> None:
        nonlocal nbytes
        if t is None:
            return
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            nbytes += t.untyped_storage().nbytes()

    for p in {id(p): p for p in model.parameters()}.values():
        if not is_quantized(p):
            continue
        params += weight_shape(p).numel()
        add(p.data)
        state = getattr(p, "quant_state", None)
        if state is None:  # int8
            add(p.SCB)
            continue
        for s in (state, state.state2):
            if s is not None:
                add(s.absmax)
                add(s.code)
        if state.nested:
            add(state.offset)
    return nbytes, params
