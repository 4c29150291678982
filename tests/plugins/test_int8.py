"""QLoRAPrecision(mode="int8"): an LLM.int8 base (bitsandbytes' Linear8bitLt format) under the one LoRA path."""

from unittest import mock

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

pytest.importorskip("bitsandbytes")

from lightning_peft.callbacks.lora import LoRA  # noqa: E402
from lightning_peft.core import merge_adapters, unload  # noqa: E402
from lightning_peft.methods import lora as lora_mod  # noqa: E402
from lightning_peft.methods.lora import LoRALinear, inject_lora  # noqa: E402
from lightning_peft.plugins.qlora import QLoRAPrecision  # noqa: E402
from lightning_peft.quant import (  # noqa: E402
    QuantLinear,
    dequantize,
    dequantize_model,
    frozen_linear,
    import_bitsandbytes,
    is_quantized,
    quantize_weight,
    quantized_bytes,
    weight_shape,
)
from tests.callbacks.helpers import token_data  # noqa: E402
from tests.conftest import tiny_llama  # noqa: E402
from tests.plugins.test_qlora import TinyLM64, _loss, _rel, _trainer  # noqa: E402


@pytest.fixture(scope="module")
def int8_backend():
    """Skip, with bitsandbytes' own reason, where its backend for this device has no int8 matmul."""
    bnb = import_bitsandbytes()
    try:
        a = torch.randint(-127, 127, (4, 8), dtype=torch.int8)
        torch.ops.bitsandbytes.int8_scaled_mm(a, a, torch.ones(4), torch.ones(4), dtype=torch.float16)
        bnb.functional.int8_vectorwise_quant(torch.randn(4, 8, dtype=torch.float16), threshold=6.0)
    except (NotImplementedError, RuntimeError) as err:
        pytest.skip(f"bitsandbytes {bnb.__version__} has no CPU int8 matmul here: {err}")
    return bnb


def _int8_llama(hidden=64, threshold=6.0, targets="all-linear"):
    model = tiny_llama(seed=0, hidden=hidden).train()
    inject_lora(model, targets, r=4, alpha=8)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_b["default"], std=0.05)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return QLoRAPrecision("int8", "bf16", int8_threshold=threshold).convert_module(model)


def test_int8_forward_is_bitsandbytes_linear8bitlt_bit_for_bit(int8_backend):
    """The oracle: bitsandbytes' own Linear8bitLt (has_fp16_weights=False) in inference, with and without outliers."""
    torch.manual_seed(0)
    base = nn.Linear(64, 48).half()
    x = torch.randn(3, 5, 64, dtype=torch.float16) * 3  # |x| > 6 in some columns: outliers at threshold 6
    x[..., 7] = 20.0  # one outlier feature, as LLM.int8 describes
    outs = {}
    for threshold in (6.0, 0.0):
        ours = QuantLinear(quantize_weight(base.weight, "int8", dtype=torch.float16, threshold=threshold), base.bias)
        ref = int8_backend.nn.Linear8bitLt(64, 48, has_fp16_weights=False, threshold=threshold)
        ref.load_state_dict(base.state_dict())
        ref = ref.to("cpu").eval()
        assert torch.equal(ref.weight.data, ours.weight.data) and torch.equal(ref.weight.SCB, ours.weight.SCB)
        with torch.no_grad():
            outs[threshold] = ours(x)
            torch.testing.assert_close(outs[threshold], ref(x), rtol=0, atol=0)
    with torch.no_grad():
        exact = base(x)
    # the outlier columns in 16 bits are what makes LLM.int8 accurate: the threshold is really applied
    assert _rel(outs[6.0], exact) < 0.5 * _rel(outs[0.0], exact), (_rel(outs[6.0], exact), _rel(outs[0.0], exact))


def test_int8_bytes_and_dequantize():
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    q = quantize_weight(w, "int8", dtype=torch.bfloat16)
    assert is_quantized(q) and q.dtype == torch.int8 and weight_shape(q) == w.shape and not q.requires_grad
    d = dequantize(q)
    assert d.dtype == torch.bfloat16 and _rel(d, w) < 0.02
    layer = QuantLinear(q)
    nbytes, params = quantized_bytes(layer)
    assert params == w.numel() and nbytes == w.numel() + 4 * 96  # one byte per weight + one float32 scale per row


def test_a_deep_copied_int8_model_keeps_its_threshold_and_outputs(int8_backend):
    """bitsandbytes' Int8Params.__deepcopy__ drops extra attributes: the copy used to compute with threshold 0."""
    import copy

    model = _int8_llama(threshold=6.0)
    twin = copy.deepcopy(model)
    weights = [(w, c) for w, c in zip(model.parameters(), twin.parameters()) if is_quantized(w)]
    assert weights
    for w, c in weights:
        assert c is not w and c.threshold == 6.0 and c.compute_dtype == w.compute_dtype == torch.bfloat16
        assert torch.equal(c.data, w.data) and torch.equal(c.SCB, w.SCB)
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    x_big = model.get_input_embeddings().weight.detach().clone()
    x_big[:, :3] *= 40.0  # outlier feature columns, so the threshold matters
    for m in (model, twin):
        m.get_input_embeddings().weight.data.copy_(x_big)
    with torch.no_grad():
        assert torch.equal(model(x).logits, twin(x).logits)
        no_outliers = copy.deepcopy(model)
        for w in no_outliers.parameters():
            if is_quantized(w):
                w.threshold = 0.0
        assert not torch.equal(model(x).logits, no_outliers(x).logits)  # the threshold changes the result


def test_lora_on_an_int8_base_uses_the_one_lora_function_and_its_gradients_are_exact(int8_backend):
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    layer = LoRALinear(base, r=4, alpha=8)
    nn.init.normal_(layer.lora_b["default"], std=0.1)
    layer.weight = quantize_weight(base.weight.detach(), "int8", dtype=torch.float32)
    layer.bias.requires_grad_(False)
    x = (torch.randn(3, 5, 64) * 3).requires_grad_()
    with mock.patch.object(lora_mod._LoRAFunction, "apply", wraps=lora_mod._LoRAFunction.apply) as spy:
        y = layer(x)
    assert spy.call_count == 1
    g = torch.randn_like(y)
    y.backward(g)
    # reference: the LLM.int8 base output (no grad through W) + autograd LoRA; grad_x through the dequantized W
    a, b = (t.detach().clone().requires_grad_() for t in (layer.lora_a["default"], layer.lora_b["default"]))
    xr = x.detach().clone().requires_grad_()
    w = dequantize(layer.weight, torch.float32)
    with torch.no_grad():
        base_out = frozen_linear(xr, layer.weight, layer.bias)
    yr = base_out + (xr @ w.t() - (xr @ w.t()).detach()) + 2.0 * (xr @ a.t()) @ b.t()
    yr.backward(g)
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.lora_a["default"].grad, a.grad)
    torch.testing.assert_close(layer.lora_b["default"].grad, b.grad)


def test_int8_plugin_quantizes_lora_and_plain_layers_in_bf16(int8_backend):
    q = _int8_llama(targets=["q_proj", "v_proj"])
    assert isinstance(q.model.layers[0].mlp.up_proj, QuantLinear) and is_quantized(q.model.layers[0].self_attn.q_proj.weight)
    for name, p in q.named_parameters():
        if "lora_" in name:
            assert p.dtype == torch.float32 and p.requires_grad, name
        elif is_quantized(p):
            assert p.dtype == torch.int8 and p.threshold == 6.0 and p.compute_dtype == torch.bfloat16, name
        else:
            assert p.dtype == torch.bfloat16, name
    ids = token_data(2, seq=8)
    out = q(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert q.model.layers[0].self_attn.q_proj.lora_a["default"].grad.abs().sum() > 0
    assert "int8, threshold=6" in repr(q.model.layers[0].mlp.up_proj)


def test_int8_lora_training_lowers_the_loss_and_checkpoints_stay_adapter_only(tmp_path, int8_backend):
    L.seed_everything(0)
    module = TinyLM64(n=16, lr=1e-2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    trainer = _trainer(tmp_path, [ckpt, LoRA(r=8, alpha=16)], QLoRAPrecision("int8"), max_steps=16, enable_checkpointing=True)
    trainer.fit(module)
    q_proj = module.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear) and q_proj.weight.dtype == torch.int8
    after = _loss(module)
    for m in module.modules():
        if isinstance(m, LoRALinear):
            m.disabled = True
    before = _loss(module)
    for m in module.modules():
        if isinstance(m, LoRALinear):
            m.disabled = False
    assert after < before - 0.5, (before, after)
    sd = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)["state_dict"]
    assert sd and all("lora_" in k and v.dtype == torch.float32 for k, v in sd.items()), sorted(sd)[:5]


def test_merge_into_an_int8_base_requantizes_with_a_warning_and_keeps_the_base_structure(int8_backend):
    q = _int8_llama()
    layer = q.model.layers[0].self_attn.q_proj
    before = dequantize(layer.weight, torch.float32)
    delta = layer.delta_weight()
    with pytest.warns(UserWarning, match="int8 quantized base weight: the result is re-quantized to 8 bits"):
        merge_adapters(q)
    assert layer.merged and layer.weight.dtype == torch.int8 and layer.weight.threshold == 6.0
    after = dequantize(layer.weight, torch.float32)
    assert _rel(after, before + delta) < 0.02  # 8-bit rounding
    assert _rel(after - before, delta) < 0.3  # the update is in it
    # the merged model is the quantized base again: same module types and parameter shapes (its inference cost)
    plain = tiny_llama(seed=0, hidden=64)
    for p in plain.parameters():
        p.requires_grad_(False)
    QLoRAPrecision("int8").convert_module(plain)
    unload(q, merge=True)  # already merged everywhere: only the wrappers go
    assert [(n, type(m)) for n, m in q.named_modules()] == [(n, type(m)) for n, m in plain.named_modules()]
    assert [(n, p.shape, p.dtype) for n, p in q.named_parameters()] == [(n, p.shape, p.dtype) for n, p in plain.named_parameters()]


def test_export_merged_bf16_model_and_adapter_from_an_int8_base(tmp_path, int8_backend):
    from transformers import LlamaForCausalLM

    from lightning_peft.io import load_adapter, save_adapter

    q = _int8_llama().eval()
    save_adapter(q, tmp_path / "adapter")
    plain = tiny_llama(seed=0, hidden=64)
    load_adapter(plain, tmp_path / "adapter")
    named = dict(q.named_parameters())
    for n, p in plain.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p.float(), named[n].float())
    ids = token_data(2, seq=12)
    with torch.no_grad():
        int8_logits = q(input_ids=ids).logits.float()
        for m in q.modules():
            m.disabled = True
        base_logits = q(input_ids=ids).logits.float()
        for m in q.modules():
            m.disabled = False
    dequantize_model(q, torch.bfloat16)
    unload(q, merge=True)
    q.save_pretrained(tmp_path / "merged")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        merged_logits = reloaded(input_ids=ids).logits.float()
    err = _rel(merged_logits, int8_logits)  # bf16 weights vs LLM.int8's quantized activations: a few percent
    assert err < 0.06, err
    assert _rel(base_logits, int8_logits) > 3 * err, (_rel(base_logits, int8_logits), err)  # the adapters are in the export


def test_bad_mode_and_threshold_list_the_choices():
    with pytest.raises(ValueError, match=r"mode='int4'.*\['nf4', 'nf4-dq', 'fp4', 'fp4-dq', 'int8'\]"):
        QLoRAPrecision(mode="int4")
    with pytest.raises(ValueError, match=r"int8_threshold=-1.0 must be a number >= 0"):
        QLoRAPrecision(mode="int8", int8_threshold=-1.0)
    with pytest.raises(ValueError, match=r"Unknown quantization mode 'int4'.*'int8'"):
        quantize_weight(torch.randn(4, 4), "int4")
    assert "int8_threshold=3" in repr(QLoRAPrecision("int8", int8_threshold=3.0))
