import math

import pytest
import torch
from torch import nn

from lightning_peft import LoRA, count_parameters, disable_adapters, merge_adapters, unmerge_adapters
from lightning_peft.core import mark_trainable
from lightning_peft.methods.lora import LoRALinear, _dropout_mask, inject_lora, lora_linear
from tests.conftest import tiny_llama


def _random_lora(layer: LoRALinear, seed: int = 1) -> LoRALinear:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_a["default"].copy_(torch.randn(layer.lora_a["default"].shape, generator=g))
        layer.lora_b["default"].copy_(torch.randn(layer.lora_b["default"].shape, generator=g))
    return layer


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcheck_float64(fan_in_fan_out, dropout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w_shape = (5, 4) if fan_in_fan_out else (4, 5)
    w = torch.randn(w_shape, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    bb = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    fn = lambda x, w, b, a, bb: lora_linear(x, w, b, a, bb, 0.7, dropout, 1234, fan_in_fan_out)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, a, bb))


def test_forward_and_grads_match_the_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 4).double()
    layer = _random_lora(LoRALinear(base, r=3, alpha=5.0).double())
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    ref = x @ base.weight.T + base.bias + (5.0 / 3) * (x @ layer.lora_a["default"].T) @ layer.lora_b["default"].T
    torch.testing.assert_close(out, ref)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    (rx,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(gx, rx)


def test_rslora_scaling():
    layer = LoRALinear(nn.Linear(8, 8), r=16, alpha=8, use_rslora=True)
    assert layer.scaling == pytest.approx(8 / math.sqrt(16))
    assert LoRALinear(nn.Linear(8, 8), r=16, alpha=8).scaling == pytest.approx(0.5)


def test_identity_at_init_and_base_params_shared():
    base = nn.Linear(6, 4)
    layer = LoRALinear(base, r=2, alpha=4)
    assert layer.weight is base.weight and layer.bias is base.bias
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_dropout_mask_is_regenerated_not_stored():
    """Gradient with dropout equals the reference computed with the same explicit mask."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w, a, b = torch.randn(5, 6).double(), torch.randn(2, 6).double().requires_grad_(), torch.randn(5, 2).double().requires_grad_()
    out = lora_linear(x, w, None, a, b, 2.0, 0.5, 99)
    mask = _dropout_mask(x.detach(), 0.5, 99)
    assert set(mask.unique().tolist()) <= {0.0, 2.0} and (mask == 0).any()
    ref = x @ w.T + 2.0 * ((x * mask) @ a.T) @ b.T
    torch.testing.assert_close(out, ref)
    g1 = torch.autograd.grad(out.sum(), (x, a, b))
    g2 = torch.autograd.grad(ref.sum(), (x, a, b))
    for u, v in zip(g1, g2):
        torch.testing.assert_close(u, v)


def test_dropout_only_in_training():
    layer = _random_lora(LoRALinear(nn.Linear(16, 16), r=4, alpha=8, dropout=0.5))
    x = torch.randn(8, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


def test_merge_unmerge_idempotent_and_exact():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    w0 = base.weight.detach().clone()
    layer = _random_lora(LoRALinear(base, r=2, alpha=4))
    x = torch.randn(3, 6)
    y = layer(x)
    layer.merge()
    layer.merge()  # second call is a no-op
    assert layer.merged
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base.weight.detach(), w0 + layer.delta_weight(), atol=1e-6, rtol=1e-6)
    with disable_adapters(layer):
        torch.testing.assert_close(layer(x), x @ w0.T + base.bias, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(base.weight.detach(), w0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer(x), y, atol=1e-6, rtol=1e-6)


def test_merge_refuses_nan_and_leaves_weight_unchanged():
    layer = _random_lora(LoRALinear(nn.Linear(4, 4), r=2, alpha=2))
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_b["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf.*left unchanged"):
        layer.merge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight.detach(), w0)


def test_conv1d_matches_linear_layout():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(4, 6)  # nf=out=4, nx=in=6; weight (6, 4)
    layer = _random_lora(LoRALinear(conv, r=2, alpha=4))
    assert (layer.in_features, layer.out_features) == (6, 4)
    x = torch.randn(2, 3, 6)
    ref = conv(x) + 2.0 * (x @ layer.lora_a["default"].T) @ layer.lora_b["default"].T
    torch.testing.assert_close(layer(x), ref)
    layer.merge()
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


def test_autocast_bf16_runs_and_backprops():
    layer = _random_lora(LoRALinear(nn.Linear(8, 8), r=2, alpha=4))
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_a["default"].grad is not None and layer.lora_a["default"].grad.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, r"rank r must be a positive integer, got r=0"),
        ({"r": -2}, r"got r=-2"),
        ({"alpha": 0}, r"alpha must be a finite number > 0, got alpha=0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got dropout=1.0"),
        ({"dropout": -0.1}, r"got dropout=-0.1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRA(**kwargs)
    with pytest.raises(ValueError, match=match):
        LoRALinear(nn.Linear(2, 2), **kwargs)


def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {n: p.requires_grad for n, p in model.named_parameters()}


def test_no_match_lists_candidates_and_leaves_model_unchanged():
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"matched no module.*Candidate module names: \[.*q_proj.*\]"):
        inject_lora(model, ["query"])
    assert _snapshot(model) == before


def test_unsupported_type_names_it_and_leaves_model_unchanged():
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(TypeError, match=r"unsupported type: 'model\.layers\.0\.self_attn' \(LlamaAttention\)"):
        inject_lora(model, ["q_proj", "self_attn"])
    assert _snapshot(model) == before


def test_already_wrapped_is_refused():
    model = tiny_llama()
    inject_lora(model, ["q_proj"])
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"already carry a LoRA adapter named 'default'.*adapter_name="):
        LoRA(target_modules=["q_proj", "v_proj"]).inject(model)
    assert _snapshot(model) == before


def test_hf_peft_wrapped_model_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already carry an adapter|wrapped by Hugging Face PEFT"):
        LoRA(target_modules=["q_proj"]).inject(model)


def test_typed_counts():
    model = tiny_llama()
    base_total = sum(p.numel() for p in model.parameters())
    LoRA(r=4, target_modules=["q_proj", "v_proj"]).inject(model)
    counts = count_parameters(model)
    # q: 32 -> 32, v: 32 -> 16 (2 kv heads of 8), 2 layers: r * (in + out) each
    added = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert counts.added == added == counts.trainable
    assert counts.changed == 0 and counts.base_total == base_total
    assert counts.adapter_bytes == added * 4


def _copy_lora_into_peft(ours, peft_model):
    ours_params = dict(ours.named_parameters())
    n = 0
    for name, p in peft_model.named_parameters():
        if ".lora_A.default." in name or ".lora_B.default." in name:
            key = name.replace("base_model.model.", "").replace(".lora_A.default.weight", ".lora_a.default").replace(".lora_B.default.weight", ".lora_b.default")
            with torch.no_grad():
                p.copy_(ours_params[key])
            n += 1
    assert n > 0
    return n


def _randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".lora_a." in name or ".lora_b." in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_equivalent_to_hf_peft_on_tiny_llama(use_rslora):
    peft = pytest.importorskip("peft")
    ours = tiny_llama()
    LoRA(r=4, alpha=8, target_modules="all-linear", use_rslora=use_rslora).inject(ours)
    _randomize(ours)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=use_rslora))
    assert _copy_lora_into_peft(ours, theirs) == 2 * sum(isinstance(m, LoRALinear) for m in ours.modules())
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-6, rtol=0)


def test_equivalent_to_hf_peft_on_minilm(minilm_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModel

    ours = AutoModel.from_pretrained(minilm_path).eval()
    LoRA(r=8, alpha=16, target_modules=["query", "value"]).inject(ours)
    _randomize(ours)
    theirs = peft.get_peft_model(AutoModel.from_pretrained(minilm_path).eval(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    assert _copy_lora_into_peft(ours, theirs) == 24
    ids = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(input_ids=ids).last_hidden_state, theirs(input_ids=ids).last_hidden_state, atol=1e-6, rtol=0)


def test_merge_and_disable_on_a_model():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 10))
    base_logits = model(ids).logits
    LoRA(r=4, target_modules="all-linear").inject(model)
    _randomize(model)
    adapted = model(ids).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-4)
    with disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, base_logits)
    merge_adapters(model)
    torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-5)
    unmerge_adapters(model)
    torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_saved_bytes_ratios_vs_full_finetuning_and_hf_peft():
    """The acceptance ratios of the foundation issue (protocol in lightning_peft/bench/saved_bytes.py)."""
    pytest.importorskip("peft")
    from lightning_peft.bench.saved_bytes import saved_bytes_table

    t = saved_bytes_table(peers=True)
    full, peft0 = t["full fine-tuning"], t["HF PEFT LoRA, dropout 0"]
    ours0, ours05 = t["lightning-peft LoRA, dropout 0"], t["lightning-peft LoRA, dropout 0.05"]
    print({k: f"{v / 2**20:.2f} MiB" for k, v in t.items()})
    assert ours0 <= 0.9 * full, (ours0, full)
    assert ours0 <= 0.7 * peft0, (ours0, peft0)
    assert ours05 <= 1.0 * full, (ours05, full)


def test_trains_on_a_model_that_adds_into_a_linear_output_in_place():
    """Falcon's decoder does ``mlp_output += attention_output`` on a LoRA layer's output: the output must not be a
    view made inside the autograd Function (autograd forbids modifying those in place), and gradients flow."""
    from tests.methods.sst2_helpers import tiny_decoder

    model = tiny_decoder("falcon").train()
    inject_lora(model, "all-linear", None, r=4, alpha=8)
    mark_trainable(model)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_b" in n]  # B = 0 at init: A gets none yet
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# -- one forward contract: every path adds LoRALinear._update (or its fused equivalent) ----------------------
def _two_adapter_layer(dropout: float, dtype=torch.float64) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), r=2, alpha=4, dropout=dropout).to(dtype)
    layer.add_adapter("other", r=3, alpha=3, dropout=dropout)
    layer.to(dtype)
    for name in ("default", "other"):
        nn.init.normal_(layer.lora_b[name])
    return layer.train()


@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_gradcheck_of_the_update_alone_float64(dropout):
    from lightning_peft.methods.lora import _LoRADeltaFunction

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    fn = lambda x, a, b: _LoRADeltaFunction.apply(x, a, b, 0.7, dropout, 4321)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, a, b))
    mask = _dropout_mask(x.detach(), dropout, 4321) if dropout else 1.0
    torch.testing.assert_close(fn(x, a, b), 0.7 * ((x * mask) @ a.T) @ b.T)


@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_the_fused_path_is_base_plus_update_with_the_same_dropout(dropout, monkeypatch):
    """The fused function is an optimisation only: with it switched off (every adapter through ``_update``), the
    same seeds give the same outputs and gradients, dropout included."""
    layer = _two_adapter_layer(dropout)
    x = torch.randn(4, 3, 6, dtype=torch.float64)

    def run():
        torch.manual_seed(7)
        xi = x.clone().requires_grad_()
        out = layer(xi)
        grads = torch.autograd.grad(out.square().sum(), [xi, *layer.lora_a.values(), *layer.lora_b.values()])
        return out, grads

    fused = run()
    with monkeypatch.context() as m:
        m.setattr(LoRALinear, "_fusable", lambda self, name: False)
        unfused = run()
    torch.testing.assert_close(fused[0], unfused[0])
    for u, v in zip(fused[1], unfused[1]):
        torch.testing.assert_close(u, v)
    # and both equal the formula with the masks the seeds give (drawn in the order the adapters are applied)
    torch.manual_seed(7)
    masks = [_dropout_mask(x, dropout, int(torch.randint(0, 2**62, (1,)).item())) if dropout else 1.0 for _ in range(2)]
    ref = layer.base_forward(x) + sum(
        layer.specs[n].scaling * ((x * mk) @ layer.lora_a[n].T) @ layer.lora_b[n].T for n, mk in zip(("default", "other"), masks)
    )
    torch.testing.assert_close(fused[0], ref)


def test_no_adapter_keeps_a_dropped_copy_of_the_input_for_backward():
    """Two adapters with dropout: nothing input-shaped is saved but the input itself (the masks are regenerated
    from seeds), whichever adapter goes through the fused function."""
    layer = _two_adapter_layer(0.3, torch.float32)
    x = torch.randn(4, 3, 6, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    out.sum().backward()
    input_shaped = [t for t in saved if t.shape == x.shape or (t.dim() == 2 and t.shape[-1] == 6 and t.shape[0] == 12)]
    assert input_shaped and all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in input_shaped)


def test_per_sample_routing_applies_each_adapters_dropout_in_training():
    from lightning_peft import per_sample_adapters

    layer = _two_adapter_layer(0.5, torch.float32)
    x = torch.randn(4, 3, 6)
    names = ["default", "other", None, "default"]
    with per_sample_adapters(layer, names):
        layer.eval()
        clean = layer(x)
        layer.train()
        torch.manual_seed(3)
        dropped = layer(x)
    torch.testing.assert_close(dropped[2], clean[2])  # the base row: no adapter, no dropout
    assert not torch.allclose(dropped[0], clean[0]) and not torch.allclose(dropped[1], clean[1])
