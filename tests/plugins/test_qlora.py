"""QLoRAPrecision and lightning_peft.quant on CPU (bitsandbytes' CPU backend)."""

import sys
import types
from unittest import mock

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

pytest.importorskip("bitsandbytes")

from lightning_peft.callbacks.lora import LoRA  # noqa: E402
from lightning_peft.core import adapter_param_names, merge_adapters, unload  # noqa: E402
from lightning_peft.methods import lora as lora_mod  # noqa: E402
from lightning_peft.methods.lora import LoRALinear, inject_lora  # noqa: E402
from lightning_peft.plugins.qlora import QLoRAPrecision  # noqa: E402
from lightning_peft.quant import (  # noqa: E402
    QuantLinear,
    dequantize,
    dequantize_model,
    import_bitsandbytes,
    is_quantized,
    quantize_weight,
    quantized_bytes,
    weight_shape,
)
from tests.callbacks.helpers import TinyLM, TinyLMConfigureModel, token_data  # noqa: E402
from tests.conftest import tiny_llama  # noqa: E402


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _qlora_llama(hidden=128, mode="nf4-dq", dtype="bf16", targets="all-linear", seed=0, **lora):
    """A tiny Llama with LoRA (B randomised so adapters matter) and its bf16 twin, then the quantized one."""
    model = tiny_llama(seed=seed, hidden=hidden).train()
    inject_lora(model, targets, r=4, alpha=8, **lora)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_b["default"], std=0.05)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model, QLoRAPrecision(mode, dtype).convert_module(model)


# -- the quant helpers ----------------------------------------------------------------------------
def test_dequantize_returns_plain_tensors_unchanged_and_rebuilds_quantized_ones():
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    assert dequantize(w) is w and dequantize(w, torch.bfloat16) is w and not is_quantized(w)
    errors = {}
    for mode in ("nf4", "nf4-dq", "fp4", "fp4-dq"):
        q = quantize_weight(w, mode, dtype=torch.bfloat16)
        assert is_quantized(q) and q.dtype == torch.uint8 and q.numel() == w.numel() // 2 and not q.requires_grad
        assert weight_shape(q) == w.shape
        d = dequantize(q)
        assert d.dtype == torch.bfloat16 and d.shape == w.shape and dequantize(q, torch.float32).dtype == torch.float32
        errors[mode] = _rel(d, w)
    # NF4 is the better code for normally distributed weights (QLoRA paper, Table 2); both are 4-bit accurate
    assert errors["nf4"] < errors["fp4"] and all(0.02 < e < 0.15 for e in errors.values()), errors


def test_int8_weights_dequantize_through_the_same_helper():
    bnb = import_bitsandbytes()
    torch.manual_seed(0)
    w = torch.randn(32, 64, dtype=torch.float16)
    q = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    assert is_quantized(q) and q.dtype == torch.int8
    assert _rel(dequantize(q, torch.float32), w) < 0.02


def test_bytes_per_quantized_parameter_nf4_dq_below_0_53():
    """NF4 + double quantization: 4.127 bits per weight (QLoRA paper); nf4 without it costs 4.5 bits."""
    measured = {}
    for mode in ("nf4-dq", "nf4"):
        _, model = _qlora_llama(hidden=128, mode=mode)
        nbytes, params = quantized_bytes(model)
        linear = sum(weight_shape(m.weight).numel() for m in model.modules() if isinstance(m, (LoRALinear, QuantLinear)))
        assert params == linear > 0
        measured[mode] = nbytes / params
    assert measured["nf4-dq"] <= 0.53, measured
    assert measured["nf4"] > 0.55, measured  # the counter sees the float32 absmax: it can fail


# -- LoRA over a quantized base -------------------------------------------------------------------
def test_lora_on_a_quantized_base_uses_the_one_lora_function_and_its_gradients_are_exact():
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    layer = LoRALinear(base, r=4, alpha=8)
    nn.init.normal_(layer.lora_b["default"], std=0.1)
    layer.weight = quantize_weight(base.weight.detach(), "nf4-dq", dtype=torch.float32)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    x = torch.randn(3, 5, 64, requires_grad=True)
    with mock.patch.object(lora_mod._LoRAFunction, "apply", wraps=lora_mod._LoRAFunction.apply) as spy:
        y = layer(x)
    assert spy.call_count == 1
    g = torch.randn_like(y)
    y.backward(g)
    # reference: plain autograd over the dequantized weight
    a, b = (t.detach().clone().requires_grad_() for t in (layer.lora_a["default"], layer.lora_b["default"]))
    xr = x.detach().clone().requires_grad_()
    w = dequantize(layer.weight, torch.float32)
    yr = xr @ w.t() + layer.bias + 2.0 * (xr @ a.t()) @ b.t()
    yr.backward(g)
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.lora_a["default"].grad, a.grad)
    torch.testing.assert_close(layer.lora_b["default"].grad, b.grad)


def test_no_weight_shaped_float_tensor_is_saved_for_backward():
    def saved_shapes(model):
        found = []
        params = {p.untyped_storage().data_ptr() for p in model.parameters() if not is_quantized(p)}

        def pack(t):  # a float parameter (the unquantized head, ...) saved as itself is no copy: leave it out
            if t.untyped_storage().data_ptr() not in params:
                found.append((t.dtype, tuple(t.shape)))
            return t

        ids = token_data(3, seq=10)  # 30 tokens: no activation is shaped like a weight (64 x 128)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids).loss.backward()
        return found

    _, q = _qlora_llama(hidden=64, targets=["q_proj", "v_proj", "down_proj"])  # the others become QuantLinear
    assert any(isinstance(m, QuantLinear) for m in q.modules()) and any(isinstance(m, LoRALinear) for m in q.modules())
    shapes = {tuple(weight_shape(m.weight)) for m in q.modules() if isinstance(m, (LoRALinear, QuantLinear))}
    shapes |= {s[::-1] for s in shapes}
    saved = saved_shapes(q)
    assert not [s for s in saved if s[0].is_floating_point and s[1] in shapes], "a dequantized weight was saved"
    assert any(s[0] == torch.uint8 for s in saved)  # the packed weights are
    # the detector works: a layer that dequantizes and calls F.linear would be caught
    with mock.patch.object(QuantLinear, "forward", lambda self, x: nn.functional.linear(x, dequantize(self.weight, x.dtype))):
        assert [s for s in saved_shapes(q) if s[0].is_floating_point and s[1] in shapes]


def test_qlora_layers_save_no_float32_activation():
    """bf16 in, bf16 (and packed uint8) saved: the fp32 adapters are cast, never the activations."""
    _, q = _qlora_llama(hidden=64, targets=["q_proj"])
    for layer in (q.model.layers[0].self_attn.q_proj, q.model.layers[0].mlp.up_proj):  # LoRALinear, QuantLinear
        dtypes = []
        x = torch.randn(3, 7, 64, dtype=torch.bfloat16, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: dtypes.append(t.dtype) or t, lambda t: t):
            y = layer(x)
        y.sum().backward()
        assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
        assert dtypes and set(dtypes) <= {torch.bfloat16, torch.uint8}, (type(layer).__name__, dtypes)


def test_quantized_layer_outputs_agree_with_bf16_within_nf4_tolerance():
    torch.manual_seed(0)
    ref = tiny_llama(seed=0, hidden=128).to(torch.bfloat16)
    _, q = _qlora_llama(hidden=128, targets=["q_proj", "v_proj"])
    checked = 0
    for name, m in q.named_modules():
        if isinstance(m, (LoRALinear, QuantLinear)):
            m.disabled = True  # the base alone (QuantLinear ignores the flag)
            r = ref.get_submodule(name)
            x = torch.randn(4, 16, r.in_features, dtype=torch.bfloat16)
            with torch.no_grad():
                out, expected = m(x), r(x)
            assert out.dtype == torch.bfloat16
            err = _rel(out, expected)
            assert 0.0 < err <= 0.15, (name, err)
            checked += 1
    assert checked == 14


def test_dtypes_after_conversion_adapters_float32_rest_in_compute_dtype():
    _, q = _qlora_llama(hidden=64)
    for name, p in q.named_parameters():
        if "lora_" in name:
            assert p.dtype == torch.float32 and p.requires_grad, name
        elif is_quantized(p):
            assert p.dtype == torch.uint8 and not p.requires_grad, name
        else:  # norms, embeddings, lm_head: cast, not quantized
            assert p.dtype == torch.bfloat16, name
    assert not is_quantized(q.lm_head.weight)


def test_rslora_and_lora_injected_after_quantization_work():
    """rsLoRA scaling goes through the same path; LoRA injected into an already quantized model wraps QuantLinear."""
    _, q = _qlora_llama(hidden=64, use_rslora=True)
    layer = q.model.layers[0].self_attn.q_proj
    assert layer.scaling == pytest.approx(8 / 2)
    model = tiny_llama(seed=0, hidden=64)
    for p in model.parameters():
        p.requires_grad_(False)
    QLoRAPrecision().convert_module(model)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    inject_lora(model, "all-linear", r=4, alpha=8)
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, LoRALinear) and (up.in_features, up.out_features) == (64, 128) and is_quantized(up.weight)
    ids = token_data(2, seq=8)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert up.lora_a["default"].grad is not None and torch.isfinite(up.lora_a["default"].grad).all()  # zero while B is 0, but it flows
    assert up.lora_b["default"].grad.abs().sum() > 0


# -- merge and export -----------------------------------------------------------------------------
def test_merge_into_a_4bit_base_requantizes_with_a_warning():
    _, q = _qlora_llama(hidden=64)
    layer = q.model.layers[0].self_attn.q_proj
    before = dequantize(layer.weight, torch.float32)
    delta = layer.delta_weight()
    with pytest.warns(UserWarning, match="re-quantized to 4 bits"):
        merge_adapters(q)
    assert layer.merged and is_quantized(layer.weight)
    after = dequantize(layer.weight, torch.float32)
    assert _rel(after, before + delta) < 0.15  # rounded to 4 bits
    assert _rel(after - before, delta) < 1.0  # but the update is in it


def test_export_merged_bf16_model_with_save_pretrained(tmp_path):
    from transformers import LlamaForCausalLM

    _, q = _qlora_llama(hidden=64)
    q.eval()
    ids = token_data(2, seq=12)
    with torch.no_grad():
        qlora_logits = q(input_ids=ids).logits.float()
        for m in q.modules():
            m.disabled = True
        base_logits = q(input_ids=ids).logits.float()
        for m in q.modules():
            m.disabled = False
    dequantize_model(q, torch.bfloat16)
    assert not any(is_quantized(p) for p in q.parameters())
    unload(q, merge=True)
    assert not any(isinstance(m, (LoRALinear, QuantLinear)) for m in q.modules())
    q.save_pretrained(tmp_path / "merged")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16).eval()
    assert reloaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        merged_logits = reloaded(input_ids=ids).logits.float()
    err = _rel(merged_logits, qlora_logits)
    assert err < 0.03, err
    assert _rel(base_logits, qlora_logits) > 3 * err  # the adapters are in the export


# -- the plugin in a Trainer ----------------------------------------------------------------------
def _trainer(tmp_path, callbacks, plugin=None, **kw):
    kw.setdefault("max_steps", 12)
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=callbacks, plugins=[plugin or QLoRAPrecision()],
        enable_checkpointing=kw.pop("enable_checkpointing", False), **kw,
    )


def _loss(module):
    ids = token_data(module.n)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        return module.model(input_ids=ids, labels=ids).loss.item()


class TinyLM64(TinyLM):
    def build(self):
        return tiny_llama(seed=0, hidden=64).train()


class TinyLM64ConfigureModel(TinyLMConfigureModel):
    def configure_model(self):
        if self.model is None:
            self.model = tiny_llama(seed=0, hidden=64).train()


@pytest.mark.parametrize("module_cls", [TinyLM64, TinyLM64ConfigureModel])
def test_qlora_training_lowers_the_loss_and_checkpoints_stay_adapter_only(tmp_path, module_cls):
    L.seed_everything(0)
    module = module_cls(n=16, lr=1e-2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    trainer = _trainer(tmp_path, [ckpt, LoRA(r=8, alpha=16)], max_steps=16, enable_checkpointing=True)
    trainer.fit(module)
    q_proj = module.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear) and is_quantized(q_proj.weight)
    assert q_proj.lora_a["default"].dtype == torch.float32
    # loss of the trained QLoRA model vs the same quantized model with its adapters switched off
    after = _loss(module)
    for m in module.modules():
        if isinstance(m, LoRALinear):
            m.disabled = True
    before = _loss(module)
    for m in module.modules():
        if isinstance(m, LoRALinear):
            m.disabled = False
    assert after < before - 0.5, (before, after)
    state = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    sd = state["state_dict"]
    assert sd and all("lora_" in k for k in sd), sorted(sd)[:5]
    assert all(v.is_floating_point() and v.dtype == torch.float32 for v in sd.values())  # no packed base


def test_resume_from_a_qlora_checkpoint(tmp_path):
    L.seed_everything(0)
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    _trainer(tmp_path, [ck, LoRA(r=4, alpha=8)], max_steps=4, enable_checkpointing=True).fit(TinyLM64(lr=1e-2))
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)["state_dict"]

    class Record(Callback):
        def on_train_start(self, trainer, pl_module):
            self.at_start = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if "lora_" in k}

    rec = Record()
    resumed = TinyLM64(lr=1e-2)
    t = _trainer(tmp_path, [rec, LoRA(r=4, alpha=8)], max_steps=6)
    t.fit(resumed, ckpt_path=tmp_path / "ck" / "last.ckpt")
    assert t.global_step == 6 and rec.at_start.keys() == saved.keys()
    for k, v in saved.items():
        torch.testing.assert_close(rec.at_start[k], v, rtol=0, atol=0)


def test_bitsandbytes_8bit_and_paged_optimizers_from_yaml(tmp_path, minilm_path, monkeypatch):
    """configs/qlora.yaml with `optimizer: class_path: bitsandbytes.optim.PagedAdamW8bit` through LightningCLI.

    On CPU, bitsandbytes runs paged optimizers unpaged (it warns); the 8-bit state is real.
    """
    import json
    import warnings

    from lightning.pytorch import LightningDataModule, LightningModule

    import lightning_peft.tasks  # noqa: F401
    from lightning_peft.cli import PEFTCLI
    from tests.cli.test_cli import REPO

    monkeypatch.chdir(REPO)
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Say {w}.", "input": "", "output": f"{w} {w}"} for w in ("hi", "yes", "no", "red")]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = PEFTCLI(
            LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
            save_config_kwargs={"overwrite": True},
            args=[
                "--config", "configs/qlora.yaml", f"--data.init_args.train_file={data}", "--data.init_args.batch_size=4",
                "--trainer.max_steps=2", "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}",
                f"--trainer.callbacks.init_args.save_dir={tmp_path / 'adapter'}", "--trainer.enable_progress_bar=false",
                "--optimizer=bitsandbytes.optim.PagedAdamW8bit", "--optimizer.lr=0.001", "--optimizer.min_8bit_size=256",
            ],
        )
        cli.trainer.fit(cli.model, cli.datamodule)
    opt = cli.trainer.optimizers[0]
    assert type(opt).__name__ == "PagedAdamW8bit"
    assert any("Paged optimizers are not supported on CPU" in str(w.message) for w in caught)  # unpaged here
    assert isinstance(cli.trainer.precision_plugin, QLoRAPrecision)
    trainable = [p for p in cli.model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in cli.model.named_parameters() if p.requires_grad)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in trainable}
    assert opt.state.keys() == set(trainable)  # every adapter parameter took steps
    assert all(s["state1"].dtype == torch.uint8 for s in opt.state.values())  # 8-bit moments (min_8bit_size=256)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


# -- bad input ------------------------------------------------------------------------------------
def test_no_quantizable_linear_raises_and_says_why():
    with pytest.raises(ValueError, match=r"no linear layer to quantize.*trainable: 14.*LoRA"):
        QLoRAPrecision().convert_module(tiny_llama(seed=0))  # nothing frozen: no PEFT callback
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        QLoRAPrecision().convert_module(nn.Sequential(nn.Embedding(4, 4), nn.LayerNorm(4)))
    model = tiny_llama(seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"ignore_modules entries \['nope'\] match no module"):
        QLoRAPrecision(ignore_modules=["nope"]).convert_module(model)
    assert not any(is_quantized(p) for p in model.parameters())  # nothing changed
    QLoRAPrecision(ignore_modules=["mlp"]).convert_module(model)
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear) and not isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)


def test_bad_mode_and_dtype_list_the_choices():
    with pytest.raises(ValueError, match=r"mode='int4'.*\['nf4', 'nf4-dq', 'fp4', 'fp4-dq', 'int8'\]"):
        QLoRAPrecision(mode="int4")
    with pytest.raises(ValueError, match=r"compute_dtype=torch.float64.*bfloat16.*float16.*float32"):
        QLoRAPrecision(compute_dtype=torch.float64)
    assert QLoRAPrecision(compute_dtype="fp16").compute_dtype == torch.float16


def test_plugin_with_precision_flag_names_both():
    with pytest.raises(ValueError, match=r"precision=bf16-true.*QLoRAPrecision"):
        L.Trainer(accelerator="cpu", precision="bf16-true", plugins=[QLoRAPrecision()], logger=False)


def test_fsdp_and_deepspeed_are_refused_naming_the_supported_strategies():
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(TypeError, match=r"FSDPPrecision.*QLoRAPrecision.*supported strategies: .*ddp"):
        FSDPStrategy().precision_plugin = QLoRAPrecision()  # what Trainer(strategy="fsdp", plugins=[...]) does
    module = TinyLM64()
    for p in module.parameters():
        p.requires_grad_(False)
    for name in ("DeepSpeedStrategy", "ModelParallelStrategy"):  # (FSDP2: 4-bit packed weights are not DTensors)
        fake = type(name, (), {"root_device": torch.device("cpu")})()
        module._trainer = types.SimpleNamespace(strategy=fake)
        with pytest.raises(ValueError, match=rf"does not support the {name}; supported strategies: .*ddp"):
            QLoRAPrecision().convert_module(module)


def test_missing_bitsandbytes_gives_the_install_command(monkeypatch):
    import_bitsandbytes.cache_clear()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    try:
        with pytest.raises(ImportError, match=r'pip install "lightning-peft\[qlora\]"'):
            QLoRAPrecision()
    finally:
        import_bitsandbytes.cache_clear()


def test_adapter_saved_from_a_qlora_model_loads_onto_the_plain_base(tmp_path):
    from lightning_peft.io import load_adapter, save_adapter

    _, q = _qlora_llama(hidden=64)
    save_adapter(q, tmp_path / "adapter")
    plain = tiny_llama(seed=0, hidden=64)
    load_adapter(plain, tmp_path / "adapter")
    a = dict(q.named_parameters())
    for n, p in plain.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p.float(), a[n].float())


# -- every layer that wraps a linear takes a 4-bit base (issue 23): AdaLoRA and (IA)³ as LoRA ------------------
def _adapter_layers(module, cls):
    return [m for m in module.modules() if isinstance(m, cls)]


@pytest.mark.parametrize("method", ["adalora", "ia3"])
def test_adalora_and_ia3_train_on_an_nf4_base_and_merge_with_the_requantize_warning(tmp_path, method):
    from lightning_peft import IA3, AdaLoRA
    from lightning_peft.methods.adalora import AdaLoRALinear
    from lightning_peft.methods.ia3 import IA3Linear

    L.seed_everything(0)
    module = TinyLM64(n=16, lr=1e-2)
    if method == "adalora":
        cls, callback = AdaLoRALinear, AdaLoRA(init_r=6, target_r=4, tinit=2, tfinal=2, delta_t=2, alpha=64, target_modules=["q_proj", "v_proj"])
    else:
        cls, callback = IA3Linear, IA3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    before = _loss(module)
    trainer = _trainer(tmp_path, [callback], plugin=QLoRAPrecision("nf4"), max_steps=16)
    trainer.fit(module)
    layers = _adapter_layers(module, cls)
    assert layers and all(is_quantized(m.weight) for m in layers)  # the base under the adapter is 4-bit
    adapter = [module.get_parameter(n) for n in adapter_param_names(module)]
    assert adapter and all(p.dtype == torch.float32 and p.requires_grad for p in adapter)  # fp32 master weights
    assert _loss(module) < before - 0.3  # it trained through the quantized base
    layer = layers[-1]
    dense = dequantize(layer.weight, torch.float32)
    expected = dense + layer.delta_weight() if method == "adalora" else dense * layer._weight_scale()
    with pytest.warns(UserWarning, match="re-quantized to 4 bits"):
        merge_adapters(module)
    assert all(m.merged and is_quantized(m.weight) for m in layers)
    after = dequantize(layer.weight, torch.float32)
    assert _rel(after, expected) < 0.15  # rounded to 4 bits again, as LoRA's merge is
    assert _rel(after - dense, expected - dense) < 1.0  # but the update is in it
