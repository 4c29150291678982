import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_peft.methods.adalora import (
    AdaLoRALinear,
    RankAllocator,
    budget_schedule,
    check_adalora_args,
    check_schedule,
    from_peft,
    inject_adalora,
    orthogonal_regularization,
    to_peft,
)
from lightning_peft.methods.lora import inject_lora

peft = pytest.importorskip("peft")


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return GPT2LMHeadModel(cfg).eval()


IDS = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(0))


def peft_adalora(model, targets, init_r=6, target_r=3, alpha=8, **kw):
    cfg = peft.AdaLoraConfig(
        init_r=init_r, target_r=target_r, lora_alpha=alpha, target_modules=targets, total_step=kw.pop("total_step", 20),
        tinit=kw.pop("tinit", 2), tfinal=kw.pop("tfinal", 4), deltaT=kw.pop("deltaT", 1), **kw,
    )
    return peft.get_peft_model(model, cfg)


def copy_from_peft(ours: nn.Module, theirs, names):
    """Copy peft's lora_A/E/B into our layers (paths relative to the HF model)."""
    inner = theirs.base_model.model
    with torch.no_grad():
        for n in names:
            src, dst = inner.get_submodule(n), ours.get_submodule(n)
            dst.adalora_a.copy_(src.lora_A["default"])
            dst.adalora_e.copy_(src.lora_E["default"])
            dst.adalora_b.copy_(src.lora_B["default"])


def randomize(layers, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in layers:
            for p in (m.adalora_a, m.adalora_e, m.adalora_b):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# -- the layer ------------------------------------------------------------------------------------
def test_forward_and_grads_match_the_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 4).double()
    layer = AdaLoRALinear(base, r=3, alpha=5.0).double()
    randomize([layer])
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    a, e, b = layer.adalora_a, layer.adalora_e, layer.adalora_b
    ref = x @ base.weight.T + base.bias + (5.0 / 3) * x @ (a * e).T @ b.T
    out = layer(x)
    torch.testing.assert_close(out, ref)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))


def test_identity_at_init_zero_e_and_shared_base():
    base = nn.Linear(6, 4)
    layer = AdaLoRALinear(base, r=4)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert torch.count_nonzero(layer.adalora_e) == 0 and layer.adalora_a.std() > 0 and layer.adalora_b.std() > 0
    assert sorted(layer.adapter_params()) == ["adalora_a", "adalora_b", "adalora_e"]
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_forward_equals_peft_svdlinear(kind):
    """Same outputs as peft's SVDLinear given the same weights (nn.Linear in BERT, Conv1D in GPT-2)."""
    model, targets = (tiny_bert(), ["query", "value"]) if kind == "bert" else (tiny_gpt2(), ["c_attn", "c_fc"])
    theirs = peft_adalora(copy.deepcopy(model), targets).eval()
    ours = copy.deepcopy(model)
    names = inject_adalora(ours, targets, r=6, alpha=8)
    assert len(names) == 4
    with torch.no_grad():  # peft's E starts at zero, A and B near it: give everything sizeable random values
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.5)
    copy_from_peft(ours, theirs, names)
    out = ours(input_ids=IDS).logits
    ref = theirs(input_ids=IDS).logits
    assert (out - model(input_ids=IDS).logits).abs().max() > 1e-3  # the update matters
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merge_unmerge_disable_and_prune(fan_in_fan_out):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(5, 8) if fan_in_fan_out else nn.Linear(8, 5)
    w0 = base.weight.detach().clone()
    ref_base = copy.deepcopy(base)
    layer = AdaLoRALinear(base, r=4, alpha=4)
    randomize([layer])
    x = torch.randn(3, 8)
    y = layer(x)
    layer.merge()
    layer.merge()  # idempotent
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.disabled = True
    torch.testing.assert_close(layer(x), ref_base(x), rtol=1e-5, atol=1e-5)
    layer.disabled = False
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, rtol=1e-6, atol=1e-6)
    # prune: masked triplets go away, output unchanged once the mask is applied
    layer.rank_mask.copy_(torch.tensor([True, False, True, False]))
    layer.apply_mask()
    y_masked = layer(x)
    kept_a = layer.adalora_a[[0, 2]].detach().clone()
    layer.prune()
    assert (layer.r, layer.rank, layer.kept, layer.rank_pattern()) == (2, 2, [0, 2], [True, False, True, False])
    assert layer.adalora_a.shape == (2, 8) and layer.adalora_e.shape == (2, 1) and layer.adalora_b.shape == (5, 2)
    torch.testing.assert_close(layer.adalora_a, kept_a)
    torch.testing.assert_close(layer(x), y_masked)
    assert layer.scaling == 1.0  # alpha / init_r, unchanged by pruning


def test_disabled_gives_the_base_output_merged_or_not():
    torch.manual_seed(0)
    base = nn.Linear(8, 5)
    ref = copy.deepcopy(base)
    layer = AdaLoRALinear(base, r=3)
    randomize([layer])
    x = torch.randn(4, 8)
    for merged in (False, True):
        if merged:
            layer.merge()
        layer.disabled = True
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)
        layer.disabled = False


def test_orthogonal_regularization_equals_peft():
    """peft adds orth_reg_weight * mean_i ||P_i P_i^T - I||_F to outputs.loss; ours is the same number."""
    model = tiny_bert()
    # (peft adds it only in AdaLoraModel.forward, which a PeftModel reaches with a task type)
    theirs = peft_adalora(copy.deepcopy(model), ["query", "value"], orth_reg_weight=0.7, task_type="SEQ_CLS").train()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.normal_(std=0.3)
    ours = copy.deepcopy(model)
    names = inject_adalora(ours, ["query", "value"], r=6, alpha=8)
    copy_from_peft(ours, theirs, names)
    labels = torch.tensor([0, 1, 1])
    with_reg = theirs(input_ids=IDS, labels=labels).loss
    theirs.peft_config["default"].orth_reg_weight = 0.0
    without = theirs(input_ids=IDS, labels=labels).loss
    reg = orthogonal_regularization([ours.get_submodule(n) for n in names])
    torch.testing.assert_close(with_reg - without, 0.7 * reg, rtol=1e-5, atol=1e-6)
    a = ours.get_submodule(names[0]).adalora_a
    manual = torch.linalg.matrix_norm(a @ a.T - torch.eye(6))
    torch.testing.assert_close(ours.get_submodule(names[0]).orth_terms()[0], manual)


# -- schedule and allocator -----------------------------------------------------------------------
def test_budget_schedule_equals_peft_at_every_step():
    model = peft_adalora(tiny_bert(), ["query", "value"], init_r=6, target_r=3, total_step=40, tinit=5, tfinal=10, deltaT=3)
    alloc = model.base_model.rankallocator
    assert alloc.init_bgt == 24 and alloc.target_bgt == 12
    for step in range(0, 45):
        assert budget_schedule(step, 24, 12, tinit=5, tfinal=10, total_steps=40, delta_t=3) == alloc.budget_schedule(step), step


def _grads_for(model, ids, seed):
    labels = torch.randint(0, 2, (ids.shape[0],), generator=torch.Generator().manual_seed(seed))
    model.zero_grad()
    model(input_ids=ids, labels=labels).loss.backward()


def test_importance_scores_and_masks_equal_peft():
    """Given the same weights and gradients, peft's RankAllocator and ours make the same EMAs and masks."""
    model = tiny_bert()
    theirs = peft_adalora(copy.deepcopy(model), ["query", "value", "intermediate.dense"], orth_reg_weight=0.0).train()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_E" in n:
                p.normal_()
    ours = copy.deepcopy(model).train()
    names = inject_adalora(ours, ["query", "value", "intermediate.dense"], r=6, alpha=8)
    copy_from_peft(ours, theirs, names)
    layers = {n: ours.get_submodule(n) for n in names}
    mine = RankAllocator(layers, target_r=3, tinit=2, tfinal=4, delta_t=1, total_steps=20)
    ref = theirs.base_model.rankallocator
    for step in range(4):
        ids = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(10 + step))
        _grads_for(theirs, ids, step)
        _grads_for(ours, ids, step)
        ref.update_ipt(theirs.base_model.model)
        mine.update_importance()
    for n in names:
        for key, pname in (("a", "lora_A"), ("e", "lora_E"), ("b", "lora_B")):
            torch.testing.assert_close(mine.ema_ipt[n][key], ref.exp_avg_ipt[f"{n}.{pname}.default"])
            torch.testing.assert_close(mine.ema_unc[n][key], ref.exp_avg_unc[f"{n}.{pname}.default"])
    for budget in (30, 20, 9):
        pattern = ref.mask_to_budget(theirs.base_model.model, budget)
        masks = mine.mask_to_budget(budget)
        mine.apply_masks()
        assert sum(int(m.sum()) for m in masks.values()) == budget
        for n in names:
            assert masks[n].tolist() == pattern[f"{n}.lora_E.default"], n
            torch.testing.assert_close(layers[n].adalora_e, theirs.base_model.model.get_submodule(n).lora_E["default"])


def _random_grads_and_e(layers, seed):
    """Random gradients on A, E, B and a random (non-zero) E, so every triplet gets a distinct score."""
    g = torch.Generator().manual_seed(seed)
    for m in layers.values():
        for p in (m.adalora_a, m.adalora_e, m.adalora_b):
            p.grad = torch.randn(p.shape, generator=g)
        with torch.no_grad():
            m.adalora_e.normal_(generator=g)


def test_mask_keeps_exactly_the_budget_even_with_ties():
    layers = {f"l{i}": AdaLoRALinear(nn.Linear(4, 4), r=5) for i in range(3)}
    alloc = RankAllocator(layers, target_r=2, total_steps=10)
    assert alloc.triplet_scores()["l0"].tolist() == [0.0] * 5  # no gradient seen: all tied (peft would mask all)
    for budget in (15, 11, 7, 6, 1, 0):
        masks = alloc.mask_to_budget(budget)
        assert sum(int(m.sum()) for m in masks.values()) == budget == alloc.budget()
    _random_grads_and_e(layers, seed=0)
    alloc.update_importance()
    scores = torch.cat([alloc.triplet_scores()[n] for n in layers])
    masks = alloc.mask_to_budget(6)
    kept = torch.cat([masks[n] for n in layers])
    assert scores[kept].min() > scores[~kept].max()  # the global threshold


def test_parameter_budget_keeps_the_best_triplets_whose_cost_fits():
    """budget="params": a triplet of an in x out layer costs in + out + 1; the final budget is rank target_r everywhere."""
    layers = {"narrow": AdaLoRALinear(nn.Linear(4, 4), r=6), "wide": AdaLoRALinear(nn.Linear(4, 20), r=6)}
    by_rank = RankAllocator(layers, target_r=2, total_steps=10)
    alloc = RankAllocator(layers, target_r=2, total_steps=10, budget="params")
    assert (by_rank.init_budget, by_rank.target_budget) == (12, 4)
    assert (alloc.init_budget, alloc.target_budget) == (6 * 9 + 6 * 25, 2 * 9 + 2 * 25)
    _random_grads_and_e(layers, seed=1)
    with torch.no_grad():
        layers["wide"].adalora_e.mul_(10.0)  # the wide layer's triplets score far higher
    alloc.update_importance()
    for budget in (alloc.target_budget, 100, 60, 30, 25):
        masks = alloc.mask_to_budget(budget)
        spent = 9 * int(masks["narrow"].sum()) + 25 * int(masks["wide"].sum())
        assert spent == alloc.budget() <= budget
        scores = torch.cat([alloc.triplet_scores()[n] for n in layers])
        costs = torch.tensor([9] * 6 + [25] * 6)
        kept = torch.cat([masks[n] for n in layers])
        assert kept.any() and not kept.all()
        assert scores[kept].min() > scores[~kept].max()  # still one global threshold
        best_left = scores.masked_fill(kept, -1.0).argmax()
        assert spent + int(costs[best_left]) > budget  # the next triplet by score does not fit
    masks = alloc.mask_to_budget(alloc.target_budget)  # 68 parameters: two wide triplets (50), the third would not fit
    assert (int(masks["wide"].sum()), int(masks["narrow"].sum()), alloc.budget()) == (2, 0, 50)
    # with a triplet budget the same scores give the wide layer all four triplets: 100 parameters, over 68
    by_rank.update_importance()
    masks = by_rank.mask_to_budget(by_rank.target_budget)
    assert int(masks["wide"].sum()) == 4 and 25 * 4 > alloc.target_budget
    with pytest.raises(ValueError, match=r"budget='triplets'.*choose 'rank'.*or 'params'"):
        RankAllocator(layers, target_r=2, total_steps=10, budget="triplets")


def test_allocator_state_dict_round_trip():
    layers = {f"l{i}": AdaLoRALinear(nn.Linear(4, 4), r=5) for i in range(2)}
    alloc = RankAllocator(layers, target_r=2, total_steps=10, tinit=1, tfinal=2)
    for m in layers.values():
        for p in (m.adalora_a, m.adalora_e, m.adalora_b):
            p.grad = torch.randn(p.shape)
    for step in range(4):
        alloc.update_and_allocate(step)
    state = alloc.state_dict()
    layers2 = {n: copy.deepcopy(m) for n, m in layers.items()}
    for m in layers2.values():
        m.rank_mask.fill_(True)
    other = RankAllocator(layers2, target_r=2, total_steps=10, tinit=1, tfinal=2)
    other.load_state_dict(state)
    assert other.step == 3 and other.ranks() == alloc.ranks()
    torch.testing.assert_close(other.ema_ipt, alloc.ema_ipt)
    with pytest.raises(ValueError, match="does not fit these layers"):
        RankAllocator({"l0": layers2["l0"]}, target_r=2, total_steps=10).load_state_dict(state)


# -- Hugging Face PEFT format, both ways ----------------------------------------------------------
def _write(tmp_path, config, tensors):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "ADALORA", **config}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "adapter_model.safetensors"))


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_saved_here_loads_in_peft_with_equal_logits(tmp_path, kind):
    model, targets = (tiny_bert(), ["query", "value"]) if kind == "bert" else (tiny_gpt2(), ["c_attn", "c_fc"])
    ours = copy.deepcopy(model)
    names = inject_adalora(ours, targets, r=6, alpha=8)
    layers = [ours.get_submodule(n) for n in names]
    randomize(layers)
    g = torch.Generator().manual_seed(3)
    for m in layers:
        m.rank_mask.copy_(torch.rand(6, generator=g) > 0.4)
        m.apply_mask()
    layers[1].prune()  # one physically pruned, the others only masked
    config, tensors = to_peft(ours, list(zip(names, layers)))
    assert set(config["rank_pattern"]) == {f"{n}.lora_E" for n in names}
    assert tensors[f"base_model.model.{names[0]}.lora_A"].shape == (layers[0].rank, layers[0].in_features)
    _write(tmp_path, config, tensors)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    for n in names:
        assert theirs.base_model.model.get_submodule(n).lora_A["default"].shape[0] == ours.get_submodule(n).rank
    torch.testing.assert_close(theirs(input_ids=IDS).logits, ours(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_saved_by_peft_loads_here_with_equal_logits(tmp_path):
    model = tiny_bert()
    theirs = peft_adalora(copy.deepcopy(model), ["query", "value"], total_step=6, tinit=1, tfinal=2).train()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_E" in n:
                p.normal_()
    for step in range(6):  # peft's own loop, so that it writes a rank_pattern and pruned tensors
        ids = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(step))
        _grads_for(theirs, ids, step)
        theirs.base_model.update_and_allocate(step)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] and sum(sum(v) for v in config["rank_pattern"].values()) == 12
    ours = copy.deepcopy(model)
    injected = from_peft(ours, config, load_file(str(tmp_path / "adapter_model.safetensors")))
    assert sorted(ours.get_submodule(n).r for n in injected) == sorted(sum(v) for v in config["rank_pattern"].values())
    torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_from_peft_refuses_bad_shapes_before_changing_the_model():
    model = tiny_bert()
    ours = copy.deepcopy(model)
    names = inject_adalora(ours, ["query"], r=4)
    config, tensors = to_peft(ours, [(n, ours.get_submodule(n)) for n in names])
    tensors[f"base_model.model.{names[0]}.lora_A"] = torch.zeros(3, 32)
    fresh = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"lora_A: expected shape \[4, 32\], found \[3, 32\]"):
        from_peft(fresh, config, tensors)
    assert not any(isinstance(m, AdaLoRALinear) for m in fresh.modules())


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"init_r": 4, "target_r": 8}, "target_r=8 is larger than init_r=4"),
        ({"init_r": 0, "target_r": 0}, "init_r must be a positive integer"),
        ({"init_r": 12, "target_r": 8, "beta1": 1.0}, r"beta1 .* \(0, 1\)"),
        ({"init_r": 12, "target_r": 8, "beta2": 0.0}, r"beta2 .* \(0, 1\)"),
        ({"init_r": 12, "target_r": 8, "orth_reg_weight": -1}, "orth_reg_weight must be >= 0"),
        ({"init_r": 12, "target_r": 8, "delta_t": 0}, "delta_t"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_adalora_args(**kwargs)


def test_schedule_without_budgeting_phase_is_refused():
    with pytest.raises(ValueError, match=r"tinit=30 \+ tfinal=70 >= total_steps=100"):
        check_schedule(30, 70, 100)
    check_schedule(29, 70, 100)


def test_adalora_on_lora_wrapped_layers_is_refused_clearly():
    model = tiny_bert()
    inject_lora(model, ["query", "value"], r=4)
    before = [type(m).__name__ for m in model.modules()]
    with pytest.raises(ValueError, match=r"AdaLoRA cannot wrap layers that already carry an adapter \(LoRALinear\).*disjoint target_modules"):
        inject_adalora(model, ["query"], r=6)
    assert [type(m).__name__ for m in model.modules()] == before
    # disjoint targets are fine
    assert len(inject_adalora(model, ["key"], r=6)) == 2
