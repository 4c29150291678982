"""DoRA (``LoRA(use_dora=True)``): equal to peft's DoRA in values and gradients, both ways through PEFT's files, on
Llama, GPT-2 (``Conv1D``, fan-in-fan-out) and BERT; the fused function equals the plain definition; gradcheck in
float64; exact merge; nothing weight-sized kept for backward; NF4 bases."""

import copy

import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft.methods.dora import dora_linear, dora_weight_norm
from lightning_peft.methods.lora import LoRALinear, _dropout_mask
from tests.conftest import tiny_llama


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def _randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.2 * torch.randn(p.shape, generator=g).to(p.dtype))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


MODELS = {
    "llama": (lambda: tiny_llama(seed=0).double().eval(), ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (lambda: tiny_gpt2().double(), ["c_attn", "c_fc"]),
}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_equal_logits_and_gradients_with_peft_both_ways(family, tmp_path):
    peft = pytest.importorskip("peft")
    make, targets = MODELS[family]
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))

    # ours -> PEFT files -> peft: the same logits and the same gradients for A, B and the magnitude
    ours = make()
    lp.LoRA(r=4, alpha=8, target_modules=targets, use_dora=True).inject(ours)
    _randomize_adapters(ours)
    lp.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours", is_trainable=True)
    a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    a.square().sum().backward()
    b.square().sum().backward()
    mine, peers = _grads(ours), _grads(theirs)
    assert len(mine) == len(peers) == 3 * 2 * len(targets)
    for name, g in mine.items():
        path, part, _ = name.rsplit(".", 2)
        peer = {"lora_a": "lora_A.default.weight", "lora_b": "lora_B.default.weight", "lora_magnitude": "lora_magnitude_vector.default.weight"}[part]
        torch.testing.assert_close(g, peers[f"base_model.model.{path}.{peer}"], rtol=1e-9, atol=1e-10)

    # peft's own DoRA adapter -> its files -> ours: the same logits
    model = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, init_lora_weights=False))
    _randomize_adapters(model, seed=2)
    model.save_pretrained(tmp_path / "theirs")
    back = lp.load_adapter(make(), tmp_path / "theirs")
    torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-10)
    assert any(isinstance(m, LoRALinear) and m.use_dora for m in back.modules())


def test_equal_logits_with_peft_on_minilm(minilm_path, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModel

    def make():
        return AutoModel.from_pretrained(minilm_path).eval()

    ours = make()
    lp.LoRA(r=4, alpha=8, target_modules=["query", "value", "dense"], use_dora=True).inject(ours)
    _randomize_adapters(ours)
    lp.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    ids = torch.tensor([[101, 2023, 2003, 2307, 102]])
    torch.testing.assert_close(ours(input_ids=ids).last_hidden_state, theirs(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def _dora_layer(dropout=0.0, dtype=torch.float64, fan_in_fan_out=False):
    torch.manual_seed(0)
    base = nn.Linear(6, 5, dtype=dtype)
    layer = LoRALinear(base, r=3, alpha=6, dropout=dropout, use_dora=True)
    _randomize_adapters(layer)
    return layer


def test_starts_as_the_base_layer_with_the_magnitude_at_the_weight_norm():
    torch.manual_seed(0)
    base = nn.Linear(6, 5, dtype=torch.float64)
    layer = LoRALinear(copy.deepcopy(base), r=3, use_dora=True)
    torch.testing.assert_close(layer.lora_magnitude["default"], base.weight.norm(dim=1).to(torch.float64))
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x))


def test_the_norm_without_forming_w_plus_ba_equals_the_direct_norm():
    torch.manual_seed(0)
    w, a, b = torch.randn(7, 9, dtype=torch.float64), torch.randn(3, 9, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    torch.testing.assert_close(dora_weight_norm(w, a, b, 0.7), (w + 0.7 * b @ a).norm(dim=1))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_fused_function_equals_the_definition_with_the_same_dropout(dropout, monkeypatch):
    """The fused function is an optimisation of ``base + _update``: switched off, the same seeds give the same outputs
    and gradients; both equal the paper's formula (norm detached) written out here."""
    layer = _dora_layer(dropout)
    layer.train()
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    params = [layer.lora_a["default"], layer.lora_b["default"], layer.lora_magnitude["default"], layer.bias]
    layer.bias.requires_grad_(True)

    def run():
        torch.manual_seed(7)
        xi = x.clone().requires_grad_()
        out = layer(xi)
        return out, torch.autograd.grad(out.square().sum(), [xi, *params])

    fused = run()
    with monkeypatch.context() as m:
        m.setattr(LoRALinear, "_fusable", lambda self, name: False)
        plain = run()
    torch.testing.assert_close(fused[0], plain[0])
    for u, v in zip(fused[1], plain[1]):
        torch.testing.assert_close(u, v)

    torch.manual_seed(7)
    mask = _dropout_mask(x, dropout, int(torch.randint(0, 2**62, (1,)).item())) if dropout else torch.ones_like(x)
    xi = x.clone().requires_grad_()
    w, a, bm, m = layer.weight, params[0], params[1], params[2]
    s = layer.scaling
    norm = (w + s * bm @ a).norm(dim=1).detach()
    xd = xi * mask
    ref = xi @ w.T + layer.bias + (m / norm - 1) * (xd @ w.T) + (m / norm) * (s * ((xd @ a.T) @ bm.T))
    torch.testing.assert_close(fused[0], ref)
    for u, v in zip(fused[1], torch.autograd.grad(ref.square().sum(), [xi, *params])):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_gradcheck_in_float64(dropout, fan_in_fan_out, monkeypatch):
    """Numerical against analytical gradients for x, bias, A, B and m. The norm is a constant in backward (the
    paper's choice and peft's), so the numerical side holds it at the unperturbed A, B: the function checked is
    the one whose gradient DoRA defines."""
    from lightning_peft.methods import dora

    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 5, dtype=torch.float64) if fan_in_fan_out else torch.randn(5, 6, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    m = torch.rand(5, dtype=torch.float64).add(0.5).requires_grad_()

    w0, a0, b0, norm = w.clone(), a.detach().clone(), b.detach().clone(), dora.dora_weight_norm
    monkeypatch.setattr(dora, "dora_weight_norm", lambda weight, _a, _b, s, w2=None: norm(w0.t() if fan_in_fan_out else w0, a0, b0, s))

    def f(x, bias, a, b, m, w):
        return dora_linear(x, w, bias, a, b, m, 0.8, dropout, 123, fan_in_fan_out)

    assert torch.autograd.gradcheck(f, (x, bias, a, b, m, w))  # frozen base: no weight gradient
    assert torch.autograd.gradcheck(f, (x, bias, a, b, m, w.clone().requires_grad_()))  # a trained base weight too


def test_nothing_weight_sized_is_kept_for_backward():
    """The fused function keeps the input, ``x A^T`` and one output-sized tensor; the frozen weight is kept by
    reference, never a copy of it, ``W + s B A`` or ``B A``."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 48), r=4, use_dora=True)
    _randomize_adapters(layer)
    x = torch.randn(2, 3, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    out.sum().backward()
    weight_sized = [t for t in saved if t.numel() >= layer.weight.numel()]
    assert all(t.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr() for t in weight_sized), [t.shape for t in weight_sized]
    by_reference = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    made = sorted(t.numel() for t in saved if t.untyped_storage().data_ptr() not in by_reference)
    assert made == sorted([6 * 4, 6 * 48, 48, 48]), made  # x A^T (N x r), z (N x out), k and the norm (out)


def test_merge_and_unmerge_are_exact_and_a_merged_adapter_cannot_be_switched_off():
    torch.manual_seed(0)
    model = tiny_llama(seed=0).eval()
    before = copy.deepcopy(model.state_dict())
    lp.LoRA(r=4, alpha=8, target_modules="all-linear", use_dora=True).inject(model)
    _randomize_adapters(model)
    ids = torch.randint(1, 100, (2, 7))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        lp.merge_adapters(model)
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="DoRA adapter 'default' is merged into the weight.*Unmerge it first"):
            with lp.disable_adapters(model):
                model(input_ids=ids)
        lp.unmerge_adapters(model)
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    for k, v in before.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=2e-6)


def test_weighted_combination_of_dora_adapters_is_refused():
    model = tiny_llama(seed=0)
    lp.LoRA(r=4, target_modules=["q_proj"], use_dora=True).inject(model)
    with pytest.raises(ValueError, match=r"\['default'\] are DoRA adapters"):
        lp.add_weighted_adapter(model, ["default"], [1.0], "mix")


def test_a_bad_use_dora_is_refused():
    with pytest.raises((TypeError, ValueError), match=r"use_dora='yes' \(str\) must be True or False"):
        lp.LoRA(use_dora="yes")


def test_trains_on_an_nf4_base_like_the_dequantized_one():
    pytest.importorskip("bitsandbytes")
    from lightning_peft.plugins.qlora import QLoRAPrecision
    from lightning_peft.quant import dequantize_model

    model = tiny_llama(seed=0, hidden=64).train()
    lp.LoRA(r=4, alpha=8, target_modules="all-linear", use_dora=True).inject(model)
    _randomize_adapters(model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    quantized = QLoRAPrecision("nf4", "fp32").convert_module(model)
    plain = dequantize_model(copy.deepcopy(quantized), torch.float32)
    ids = torch.randint(1, 100, (2, 9))
    out_q, out_p = quantized(input_ids=ids, labels=ids), plain(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_q.logits, out_p.logits, rtol=1e-4, atol=1e-4)
    out_q.loss.backward()
    out_p.loss.backward()
    gq, gp = _grads(quantized), _grads(plain)
    assert gq.keys() == gp.keys() and any("lora_magnitude" in k for k in gq)
    for k in gq:
        torch.testing.assert_close(gq[k], gp[k], rtol=1e-3, atol=1e-5)


def test_the_kept_weight_norms_follow_a_changed_base_weight():
    """``||W||^2`` is kept between forwards (the frozen base does not change while training); a base weight written
    in place (a merge, ``load_state_dict``) or replaced is read again."""
    layer = _dora_layer(dtype=torch.float32)
    x = torch.randn(3, 6)
    layer(x)
    new = torch.randn_like(layer.weight)

    def expected():
        fresh = copy.deepcopy(layer)
        fresh.__dict__.pop("_dora_w2", None)
        return fresh(x)

    with torch.no_grad():
        layer.weight.copy_(new)
    torch.testing.assert_close(layer(x), expected())
    layer.load_state_dict({**layer.state_dict(), "weight": 2 * new})
    torch.testing.assert_close(layer(x), expected())
    layer.weight = nn.Parameter(3 * new, requires_grad=False)
    torch.testing.assert_close(layer(x), expected())


def test_the_callback_trains_the_magnitude_resumes_exactly_and_the_checkpoint_loads_back(tmp_path):
    """Through the Trainer: the magnitude trains with A and B, sits in the adapter-only checkpoint, a resumed run
    equals the uninterrupted one, and ``load_adapter_checkpoint`` rebuilds DoRA from the checkpoint's record."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.callbacks.helpers import TinyLM

    def fit(epochs, ckpt_path=None):
        L.seed_everything(0)
        module = TinyLM(opt="trainable")
        trainer = L.Trainer(
            accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
            callbacks=[lp.LoRA(r=4, alpha=8, target_modules="all-linear", use_dora=True), ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1)],
        )
        trainer.fit(module, ckpt_path=ckpt_path)
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    start = TinyLM()
    lp.LoRA(r=4, alpha=8, target_modules="all-linear", use_dora=True).inject(start)
    magnitude0 = {n: p.detach().clone() for n, p in start.named_parameters() if "lora_magnitude" in n}
    straight = fit(2)
    assert magnitude0 and all((straight[n] - v).abs().max() > 0 for n, v in magnitude0.items())  # the magnitudes trained
    ckpt = torch.load(tmp_path / "ck" / "epoch=0-step=4.ckpt", weights_only=False)
    assert set(ckpt["state_dict"]) == set(straight)  # the adapter only, magnitudes included
    assert ckpt["lightning_peft"]["methods"][0]["use_dora"] is True
    resumed = fit(2, ckpt_path=tmp_path / "ck" / "epoch=0-step=4.ckpt")
    for n, v in straight.items():
        torch.testing.assert_close(resumed[n], v, rtol=0, atol=0)
    loaded = lp.load_adapter_checkpoint(TinyLM(), tmp_path / "ck" / "epoch=1-step=8.ckpt")
    for n, p in loaded.named_parameters():
        if n in straight:
            torch.testing.assert_close(p.detach(), straight[n], rtol=0, atol=0)
    assert all(m.use_dora for m in loaded.modules() if isinstance(m, LoRALinear))


def test_a_model_that_adds_into_the_output_in_place_trains():
    """Falcon does ``mlp_output += attention_output`` on a linear layer's output: the fused function's output must
    not be a view made inside it (autograd forbids modifying those in place)."""
    from tests.methods.sst2_helpers import tiny_decoder

    model = tiny_decoder("falcon").train()
    lp.LoRA(r=4, alpha=8, target_modules="all-linear", use_dora=True).inject(model)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_magnitude" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_runs_under_autocast_in_inference_mode_as_lightning_validates():
    model = tiny_llama(seed=0).eval()
    lp.LoRA(r=4, target_modules="all-linear", use_dora=True).inject(model)
    _randomize_adapters(model)
    ids = torch.randint(1, 100, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(input_ids=ids).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected, rtol=0.1, atol=0.25)  # bf16


def test_combinations_that_do_not_separate_are_refused_before_anything_changes():
    layer = LoRALinear(nn.Linear(6, 5), r=2, use_dora=True)
    layer.add_adapter("plain", r=2)
    _randomize_adapters(layer)
    weight = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"merge a DoRA adapter only when no other adapter of the layer is merged or merged with it"):
        layer.merge()  # both active
    assert torch.equal(layer.weight, weight) and not layer.merged_adapters
    layer.merge(["plain"])
    with pytest.raises(ValueError, match=r"merge a DoRA adapter only when.*merged already \['plain'\]"):
        layer.merge(["default"])
    with pytest.raises(ValueError, match=r"takes its magnitude from the base weight, which holds merged adapter\(s\) \['plain'\]"):
        layer.add_adapter("other", r=2, use_dora=True)
    layer.active = ["default"]  # the merged plain adapter switched off while DoRA is applied unmerged
    with pytest.raises(RuntimeError, match=r"'plain' is merged into the weight and switched off, while a DoRA adapter"):
        layer(torch.randn(2, 6))
    with pytest.raises(ValueError, match="DoRA adapter: gates"):
        layer.add_gate("default")
    with pytest.raises(ValueError, match="cannot be combined with use_dora=True"):
        lp.LoRA(gate=True, use_dora=True)
    model = tiny_llama(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot be combined with use_dora=True"):
        lp.methods.lora.inject_lora(model, ["q_proj"], gate=True, use_dora=True)
    assert model.state_dict().keys() == before.keys()


def test_gradients_reach_a_trained_base_weight_as_in_the_definition(monkeypatch):
    layer = _dora_layer()
    layer.weight.requires_grad_(True)
    x = torch.randn(4, 6, dtype=torch.float64)
    fused = torch.autograd.grad(layer(x).square().sum(), layer.weight)[0]
    monkeypatch.setattr(LoRALinear, "_fusable", lambda self, name: False)
    torch.testing.assert_close(fused, torch.autograd.grad(layer(x).square().sum(), layer.weight)[0])
