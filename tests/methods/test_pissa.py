"""PiSSA / OLoRA initialisation (``LoRA(init="pissa" | "pissa_niter_K" | "olora")``): the same starting point and the same
training as Hugging Face PEFT's, the base weights unchanged, exports that load on the original base in peft and here."""

import copy
import json
import warnings

import pytest
import torch

import lightning_peft as lp
from lightning_peft.methods.lora import LoRALinear, add_weighted_adapter, inject_lora
from tests.conftest import tiny_llama
from tests.methods.test_dora import _randomize_adapters, tiny_gpt2

INITS = ["pissa", "olora"]


def _lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _peft_model(make, init, targets, **kw):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, **kw))


@pytest.mark.parametrize("init", INITS)
def test_starts_where_peft_starts_and_the_model_is_unchanged(init):
    """``A0, B0`` equal peft's (bit for bit: the same decomposition of the same float32 weight); the model's output at
    step 0 equals the base's; the base weights are not touched."""
    base = tiny_llama(seed=0)
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = copy.deepcopy(base)
    weights = {n: p.detach().clone() for n, p in ours.named_parameters()}
    inject_lora(ours, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8, init=init)
    theirs = _peft_model(lambda: copy.deepcopy(base), init, ["q_proj", "v_proj", "down_proj"])
    layers = _lora_layers(ours)
    assert len(layers) == 6
    for name, layer in layers.items():
        peer = theirs.base_model.model.get_submodule(name)
        assert torch.equal(layer.lora_a["default"], peer.lora_A["default"].weight)
        assert torch.equal(layer.lora_b["default"], peer.lora_B["default"].weight)
        assert torch.equal(layer.lora_init_a["default"], layer.lora_a["default"]) and not layer.lora_init_a["default"].requires_grad
        assert layer.lora_a["default"].abs().sum() > 0 and layer.lora_b["default"].abs().sum() > 0  # not a zero start
    for n, p in ours.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, weights[n]), n  # peft writes W - s B0 A0 into the base; here it stays W
    torch.testing.assert_close(ours(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", INITS + ["pissa_niter_3"])
def test_trains_as_peft_trains(init):
    """Three SGD steps on both, from the same start (randomized SVD: peft's start copied over): the same losses and the
    same adapters. Ours subtracts ``s x A0^T B0^T`` where peft keeps ``W - s B0 A0`` in the base: the same function."""
    base = tiny_llama(seed=0).train()
    ids = torch.randint(1, 100, (4, 9), generator=torch.Generator().manual_seed(1))
    targets = ["q_proj", "v_proj", "gate_proj"]
    ours = copy.deepcopy(base)
    inject_lora(ours, targets, r=4, alpha=8, init=init, dropout=0.0)
    theirs = _peft_model(lambda: copy.deepcopy(base), init, targets)
    with torch.no_grad():  # pissa_niter: a randomized start; take peft's (A0 = A, B0 = B)
        for name, layer in _lora_layers(ours).items():
            peer = theirs.base_model.model.get_submodule(name)
            for ours_t, peer_t in ((layer.lora_a, peer.lora_A), (layer.lora_b, peer.lora_B)):
                ours_t["default"].copy_(peer_t["default"].weight)
            layer.lora_init_a["default"].copy_(peer.lora_A["default"].weight)
            layer.lora_init_b["default"].copy_(peer.lora_B["default"].weight)
    for p in ours.parameters():
        p.requires_grad_(False)
    trained = [p for n, p in ours.named_parameters() if n.split(".")[-2] in ("lora_a", "lora_b")]
    for p in trained:
        p.requires_grad_(True)
    opt_o = torch.optim.SGD(trained, lr=0.5)
    opt_t = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    assert len(opt_t.param_groups[0]["params"]) == len(trained) == 12
    for _ in range(3):
        lo, lt = ours(input_ids=ids, labels=ids).loss, theirs(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(lo, lt, rtol=1e-5, atol=1e-6)
        for opt, loss in ((opt_o, lo), (opt_t, lt)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    for name, layer in _lora_layers(ours).items():
        peer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_b["default"], peer.lora_B["default"].weight, rtol=1e-4, atol=1e-5)
    assert lo < ours(input_ids=ids, labels=ids).loss.new_tensor(float("inf"))


MODELS = {
    "llama": (lambda: tiny_llama(seed=0).double().eval(), ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (lambda: tiny_gpt2().double(), ["c_attn", "c_fc"]),
}


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("family", sorted(MODELS))
def test_export_is_plain_lora_that_loads_on_the_original_base_in_peft_and_here(family, init, tmp_path):
    """The directory holds ``[A ; A0]`` and ``[B | -B0]`` at rank 2r and the same scaling (peft's "conversion to LoRA"):
    peft and lightning-peft load it on the original base to the trained model's logits (float64)."""
    peft = pytest.importorskip("peft")
    make, targets = MODELS[family]
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = make()
    lp.LoRA(r=4, alpha=8, target_modules=targets, init=init).inject(ours)
    _randomize_adapters(ours)
    want = ours(input_ids=ids).logits
    assert (want - make()(input_ids=ids).logits).abs().max() > 1e-3  # the adapters changed the model
    lp.save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    torch.testing.assert_close(theirs(input_ids=ids).logits, want, rtol=0, atol=1e-10)
    back = lp.load_adapter(make(), tmp_path / "ours")
    torch.testing.assert_close(back(input_ids=ids).logits, want, rtol=0, atol=1e-10)


def test_export_keeps_the_scaling_with_rslora(tmp_path):
    peft = pytest.importorskip("peft")
    make, targets = MODELS["llama"]
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = make()
    lp.LoRA(r=4, alpha=8, target_modules=targets, init="pissa", use_rslora=True).inject(ours)
    _randomize_adapters(ours)
    lp.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=1e-10)


@pytest.mark.parametrize("init", INITS)
def test_peft_pissa_and_olora_directories_load_on_the_original_base(init, tmp_path):
    """peft saves a PiSSA/OLoRA adapter as trained ``A, B`` with ``init_lora_weights`` naming the init and loads it by
    recomputing the decomposition of the original base: so does lightning-peft (float32: peft refuses float64)."""
    base = tiny_llama(seed=0)
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    theirs = _peft_model(lambda: copy.deepcopy(base), init, ["q_proj", "v_proj", "down_proj"])
    _randomize_adapters(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "theirs")
    back = lp.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(back(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert all(m.init == init for m in _lora_layers(back).values())


def test_a_randomized_pissa_directory_warns_and_base_changing_inits_are_refused(tmp_path):
    base = tiny_llama(seed=0)
    theirs = _peft_model(lambda: copy.deepcopy(base), "pissa_niter_2", ["q_proj"])
    theirs.save_pretrained(tmp_path / "niter")
    with pytest.warns(UserWarning, match="randomized SVD"):
        lp.load_adapter(copy.deepcopy(base), tmp_path / "niter")
    config = json.loads((tmp_path / "niter" / "adapter_config.json").read_text())
    (tmp_path / "niter" / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "corda"}))
    model = copy.deepcopy(base)
    with pytest.raises(NotImplementedError, match="init_lora_weights='corda'.*path_initial_model_for_weight_conversion"):
        lp.load_adapter(model, tmp_path / "niter")
    assert not _lora_layers(model)


def test_switching_off_deleting_merging_and_combining_see_the_original_base():
    base = tiny_llama(seed=0)
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = base(input_ids=ids).logits
    model = copy.deepcopy(base)
    inject_lora(model, "all-linear", exclude_modules=["lm_head"], r=4, alpha=8, init="pissa")
    _randomize_adapters(model)
    trained = model(input_ids=ids).logits
    with lp.disable_adapters(model):
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)
    # the update is s (B A - B0 A0): a weighted 'cat' combination of weight 1 reproduces it
    add_weighted_adapter(model, ["default"], [1.0], "combined", combination_type="cat")
    lp.set_active_adapters(model, ["combined"])
    torch.testing.assert_close(model(input_ids=ids).logits, trained, rtol=1e-4, atol=5e-5)
    with pytest.raises(ValueError, match="start from the base weight.*use 'cat'"):
        add_weighted_adapter(model, ["default"], [1.0], "lin", combination_type="linear")
    lp.set_active_adapters(model, ["default"])
    unmerged = copy.deepcopy(model)
    lp.merge_adapters(model)
    torch.testing.assert_close(model(input_ids=ids).logits, trained, rtol=1e-4, atol=5e-5)
    lp.unmerge_adapters(model)
    torch.testing.assert_close(model(input_ids=ids).logits, trained, rtol=1e-4, atol=5e-5)
    for layer in _lora_layers(unmerged).values():
        layer.delete_adapter("default")
        layer.delete_adapter("combined")
        assert not layer.lora_init_a and not layer.lora_init_b
    torch.testing.assert_close(unmerged(input_ids=ids).logits, ref, rtol=0, atol=0)  # never merged: the base bit for bit


def test_bad_settings_are_refused_before_anything_changes():
    model = tiny_llama(seed=0)
    for init in ("PiSSA", "pissa_niter_", "pissa_niter_x", "olora_2", True):
        with pytest.raises(ValueError, match="LoRA init must be"):
            lp.LoRA(init=init)
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        inject_lora(model, ["q_proj"], init="pissa", use_dora=True)
    with pytest.raises(ValueError, match="gate=True"):
        inject_lora(model, ["q_proj"], init="olora", gate=True)
    with pytest.raises(ValueError, match="r=64 components of a 32x32 weight.*smaller r"):
        inject_lora(model, ["q_proj"], init="pissa", r=64)
    assert not _lora_layers(model)


def test_the_callback_resumes_exactly_and_the_checkpoint_loads_back(tmp_path):
    """The initial ``A0, B0`` travel in the adapter-only checkpoint (a resume does not depend on a randomized SVD
    repeating): a resumed run equals the uninterrupted one and ``load_adapter_checkpoint`` rebuilds the adapter."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.callbacks.helpers import TinyLM

    def fit(epochs, ckpt_path=None):
        L.seed_everything(0)
        module = TinyLM(opt="trainable")
        trainer = L.Trainer(
            accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
            callbacks=[lp.LoRA(r=2, alpha=4, target_modules="all-linear", init="pissa_niter_2"), ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1)],
        )
        trainer.fit(module, ckpt_path=ckpt_path)
        return module, {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}

    module, straight = fit(2)
    ckpt = torch.load(tmp_path / "ck" / "epoch=0-step=4.ckpt", weights_only=False)
    assert set(ckpt["state_dict"]) == set(straight) and any("lora_init_a" in k for k in straight)
    assert ckpt["lightning_peft"]["methods"][0]["init"] == "pissa_niter_2"
    _, resumed = fit(2, ckpt_path=tmp_path / "ck" / "epoch=0-step=4.ckpt")
    for n, v in straight.items():
        torch.testing.assert_close(resumed[n], v, rtol=0, atol=0)
    x = torch.randint(0, 32, (2, 6))
    loaded = lp.load_adapter_checkpoint(TinyLM(), tmp_path / "ck" / "epoch=1-step=8.ckpt")
    torch.testing.assert_close(loaded(x), module(x), rtol=0, atol=0)


def test_trains_on_an_nf4_base_from_the_dequantized_weight():
    """A quantized base is decomposed from its dequantized weight and stays quantized (peft refuses PiSSA there)."""
    pytest.importorskip("bitsandbytes")
    from lightning_peft.plugins.qlora import QLoRAPrecision

    model = tiny_llama(seed=0, hidden=64)
    model.requires_grad_(False)  # QLoRA quantizes frozen linear weights
    quantized = QLoRAPrecision("nf4", "fp32").convert_module(model)
    ids = torch.randint(1, 100, (2, 9))
    before = quantized(input_ids=ids).logits
    inject_lora(quantized, ["q_proj", "down_proj"], r=4, alpha=8, init="pissa")
    layer = quantized.get_submodule("model.layers.0.self_attn.q_proj")
    assert lp.quant.is_quantized(layer.weight)
    dense = layer.dense_weight()
    s0 = torch.linalg.svdvals(dense)[:4]
    start = layer.specs["default"].scaling * layer.lora_init_b["default"] @ layer.lora_init_a["default"]
    torch.testing.assert_close(torch.linalg.svdvals(start)[:4], s0, rtol=1e-4, atol=1e-4)  # the top-4 part of the dequantized W
    torch.testing.assert_close(quantized(input_ids=ids).logits, before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_fused_path_is_base_plus_the_definition(dropout, monkeypatch):
    """The forward's fused path (one rank-2r product without dropout) equals ``base + _update`` (the definition: the
    update minus the initial product), values and gradients, dropout masks included (float64)."""
    from lightning_peft.methods import lora as lora_mod

    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(6, 5).double(), r=2, alpha=4, dropout=dropout, init="pissa").train()
    _randomize_adapters(layer)
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    seeds = iter([11, 11])
    monkeypatch.setattr(lora_mod, "_draw_seed", lambda: next(seeds))
    fused = layer(x)
    grads = torch.autograd.grad(fused.square().sum(), [x, layer.lora_a["default"], layer.lora_b["default"]])
    definition = layer.base_forward(x) + layer._update(x, "default")
    want = torch.autograd.grad(definition.square().sum(), [x, layer.lora_a["default"], layer.lora_b["default"]])
    torch.testing.assert_close(fused, definition, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
