import pytest
import torch
from torch import nn

from lightning_peft.callbacks.houlsby import Houlsby
from lightning_peft.callbacks.lora import LoRA
from lightning_peft.callbacks.prefix_tuning import PrefixTuning
from lightning_peft.callbacks.unipelt import UniPELT
from lightning_peft.core import adapter_param_names
from lightning_peft.io import save_adapter
from lightning_peft.methods.houlsby import HoulsbyAdapter
from lightning_peft.methods.lora import LoRALinear
from lightning_peft.methods.prefix_tuning import inject_prefix_tuning
from tests.methods.prompt_helpers import check_padding_invariance, randomize
from tests.methods.sst2_helpers import minilm_classifier, minilm_counts, sst2_batch, tiny_decoder, train_losses


def _ids(n=2, t=9, seed=0):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


# -- the gates on the existing layers -----------------------------------------------------------------
def test_gated_lora_matches_the_formula_and_refuses_to_merge():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5).double(), r=2, alpha=4.0)
    gate = layer.add_gate()
    with torch.no_grad():
        layer.lora_b["default"].normal_()
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    a, b = layer.lora_a["default"], layer.lora_b["default"]
    g = torch.sigmoid(x @ gate.weight.T + gate.bias)  # (3, 4, 1): per token
    ref = x @ layer.weight.T + layer.bias + g * 2.0 * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), ref)
    torch.autograd.gradcheck(lambda x: layer(x), (x,))
    layer(x).sum().backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    assert set(layer.adapter_params()) == {"lora_a.default", "lora_b.default", "lora_gate.default.weight", "lora_gate.default.bias"}
    with pytest.raises(ValueError, match=r"LoRA adapter\(s\) \['default'\] are gated"):
        layer.merge()


def test_gated_houlsby_matches_the_formula():
    torch.manual_seed(0)
    layer = HoulsbyAdapter(nn.Linear(6, 5).double(), bottleneck=3)
    gate = layer.add_gate()
    randomize(layer, seed=1, scale=0.3)  # moves base weights too; the formula below reads them
    x = torch.randn(4, 6, dtype=torch.float64)
    h = x @ layer.weight.T + layer.bias
    z = torch.relu(h @ layer.houlsby_down.T + layer.houlsby_down_bias) @ layer.houlsby_up.T + layer.houlsby_up_bias
    torch.testing.assert_close(layer(x), h + torch.sigmoid(h @ gate.weight.T + gate.bias) * z)
    assert "houlsby_gate.weight" in layer.adapter_params()


def test_gated_prefixes_scale_the_cached_keys_and_values_by_the_mean_gate():
    """One Llama layer, by hand (float64): the prefix keys and values are scaled by the gate read from the attention
    input, averaged over the sample's real tokens."""
    model = tiny_decoder("llama")
    inject_prefix_tuning(model, 3, encoder_hidden_size=24, gate=True)
    model = model.double()
    layer = model.prefix_tuning
    randomize(layer.prefix_gate, seed=4)
    attn = model.model.layers[0].self_attn
    seen, captured = {}, {}
    attn.register_forward_hook(lambda m, a, out: seen.update(out=out[0]))
    attn.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    model(input_ids=ids, attention_mask=mask)
    h, cos_sin = captured["hidden_states"], captured["position_embeddings"]
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, T, _ = h.shape
    gate = layer.prefix_gate[0]
    g = torch.sigmoid(h @ gate.weight.T + gate.bias)  # (B, T, 2)
    m = mask.double()[..., None]
    g = (g * m).sum(1) / m.sum(1)  # (B, 2)
    q = attn.q_proj(h).view(B, T, 4, 8).transpose(1, 2)
    k = attn.k_proj(h).view(B, T, 2, 8).transpose(1, 2)
    v = attn.v_proj(h).view(B, T, 2, 8).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *cos_sin)
    pk, pv = layer.prefixes()[0]
    pk = pk.permute(1, 0, 2)[None] * g[:, 0, None, None, None]
    pv = pv.permute(1, 0, 2)[None] * g[:, 1, None, None, None]
    k = torch.cat([pk, k], dim=2).repeat_interleave(2, dim=1)
    v = torch.cat([pv, v], dim=2).repeat_interleave(2, dim=1)
    scores = q @ k.transpose(-1, -2) / 8**0.5
    allowed = torch.cat([torch.ones(T, 3).bool(), torch.ones(T, T).tril().bool()], dim=1)[None, None] & torch.cat([torch.ones(B, 3), mask], 1).bool()[:, None, None]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    ref = attn.o_proj((probs @ v).transpose(1, 2).reshape(B, T, 32))
    torch.testing.assert_close(seen["out"][0], ref[0])
    torch.testing.assert_close(seen["out"][1, :3], ref[1, :3])  # the padded position's output is irrelevant
    torch.testing.assert_close(gate.last_mean, g.mean(0).float())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gated_prefixes_keep_padding_invariance(family):
    model = tiny_decoder(family)
    targets = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}[family]  # each entry of a list must match a module
    UniPELT(lora_target_modules=targets, num_virtual_tokens=4, bottleneck_size=8).inject(model)
    randomize(model, seed=3, scale=0.05)
    check_padding_invariance(model, torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10, 11, 12, 13]), atol=1e-4)


def test_ungated_layers_carry_no_gate_parameters():
    model = tiny_decoder("llama")
    LoRA(target_modules=["q_proj"]).inject(model)
    assert not any("_gate." in n for n, _ in model.named_parameters())  # (Llama's own mlp.gate_proj aside)
    assert LoRA().config() == LoRA(gate=False).config() and "gate" not in Houlsby().config() and "gate" not in PrefixTuning().config()


# -- UniPELT as a composition ---------------------------------------------------------------------------
def test_equals_gated_lora_prefix_and_adapter_by_hand():
    torch.manual_seed(5)
    ours = UniPELT(num_virtual_tokens=4, bottleneck_size=8).inject(tiny_decoder("llama").train())
    torch.manual_seed(5)
    by_hand = tiny_decoder("llama").train()
    LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"], gate=True).inject(by_hand)
    PrefixTuning(num_virtual_tokens=4, gate=True).inject(by_hand)
    Houlsby(bottleneck_size=8, sites=["ffn"], gate=True).inject(by_hand)
    a, b = ours.state_dict(), by_hand.state_dict()
    assert a.keys() == b.keys() and sum("_gate." in k for k in a) == 2 * (2 * 2 + 2 + 2)  # weight + bias: q, v, prefix, adapter x 2 layers
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    ids = _ids()
    for model in (ours, by_hand):
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    a, b = ours.state_dict(), by_hand.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_defaults_on_minilm_identity_apart_from_the_gated_prefix_and_gate_means(minilm_path):
    model = minilm_classifier(minilm_path)
    ids = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    base = model(input_ids=ids, attention_mask=mask).logits
    cb = UniPELT()
    cb.inject(model)
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    adapters = [m for m in model.modules() if isinstance(m, HoulsbyAdapter)]
    assert len(loras) == 12 and {m.r for m in loras} == {8} and all(n.endswith(("query", "value")) for n in cb.injected[:12])
    assert len(adapters) == 6 and {(m.bottleneck, m.hidden) for m in adapters} == {(24, 384)}
    assert model.prefix_tuning.num_virtual_tokens == 10 and model.prefix_tuning.gated
    out = model(input_ids=ids, attention_mask=mask).logits
    for m in loras + adapters:  # LoRA (B = 0) and the adapters (W_up = 0) add exactly zero at init
        m.disabled = True
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, out, rtol=0, atol=0)
    for m in loras + adapters:
        m.disabled = False
    model.prefix_tuning.disabled = True
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, base, rtol=0, atol=0)
    model.prefix_tuning.disabled = False
    assert not torch.allclose(out, base, atol=1e-4)
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    missing = [n for n in adapter_param_names(model) if model.get_parameter(n).grad is None]
    assert not missing, missing  # every gate (and every part) is on the graph
    means = UniPELT.gate_means(model)
    kinds = ("lora_query", "lora_value", "prefix_key", "prefix_value", "adapter")
    assert sorted(means) == sorted(f"layer{i}/{k}" for i in range(6) for k in kinds)
    assert all(0.0 < v < 1.0 for v in means.values())


def test_typed_counts_are_the_sum_of_the_parts(minilm_path):
    ours = minilm_counts(minilm_path, UniPELT(trainable_modules=["classifier"]))
    lora = minilm_counts(minilm_path, LoRA(r=8, alpha=16, target_modules=["query", "value"], gate=True))
    prefix = minilm_counts(minilm_path, PrefixTuning(num_virtual_tokens=10, gate=True))
    adapter = minilm_counts(minilm_path, Houlsby(reduction_factor=16, sites=["ffn"], gate=True))
    head = 384 * 2 + 2
    assert ours.added == lora.added + prefix.added + adapter.added
    assert ours.trainable == ours.added + head and ours.changed == head
    ungated = minilm_counts(minilm_path, LoRA(r=8, alpha=16, target_modules=["query", "value"]), PrefixTuning(num_virtual_tokens=10), Houlsby(reduction_factor=16, sites=["ffn"]))
    gates = 6 * (2 * (384 + 1) + (2 * 384 + 2) + (384 + 1))  # q and v LoRA gates, the prefix's key/value gate, the adapter's gate
    assert ours.added == ungated.added + gates


def test_learning_on_sst2_with_minilm(minilm_path, shared_data):
    torch.manual_seed(0)
    model = minilm_classifier(minilm_path)
    batch = sst2_batch(minilm_path, shared_data, n=16)
    UniPELT(trainable_modules=["classifier"]).inject(model)
    losses = train_losses(model, batch, steps=12, lr=1e-3)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses


def test_no_peft_format_for_gates(tmp_path):
    for cb in (LoRA(target_modules=["q_proj"], gate=True), PrefixTuning(num_virtual_tokens=2, gate=True)):
        model = cb.inject(tiny_decoder("llama"))
        with pytest.raises(NotImplementedError, match="no gates"):
            save_adapter(model, tmp_path / "a")


def test_a_failing_part_leaves_the_model_unchanged():
    model = tiny_decoder("llama")
    before = sorted(n for n, _ in model.named_modules())
    with pytest.raises(ValueError, match=r"matched no module"):
        UniPELT(num_virtual_tokens=2, adapter_target_modules=["no_such_module"]).inject(model)
    assert sorted(n for n, _ in model.named_modules()) == before
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj")))


def test_bad_arguments():
    with pytest.raises(ValueError, match="LoRA rank r must be a positive integer, got r=0"):
        UniPELT(r=0)
    with pytest.raises(ValueError, match="sites must be a non-empty list"):
        UniPELT(adapter_sites=[])
    with pytest.raises(TypeError, match="lora_target_modules must be a string or a list of strings, got int"):
        UniPELT(lora_target_modules=3)
