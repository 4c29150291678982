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
# (total_steps, tinit, tfinal, delta_t): tinit a multiple of delta_t or not (a `step < tinit` bug only shows when it is:
# step tinit then falls in the cubic branch, whose mask flag is `tinit % delta_t == 0`), total - tfinal a multiple of
# delta_t or not (same for `step >= total - tfinal`), tinit = 0, tfinal = 0 and 1, a single budgeting step.
SCHEDULES = [
    (40, 5, 10, 3), (40, 6, 10, 3), (40, 6, 11, 3), (40, 9, 13, 3), (20, 0, 0, 1), (20, 4, 0, 2), (22, 0, 5, 4), (15, 3, 1, 3),
    (12, 10, 1, 5), (12, 10, 1, 1),
]


@pytest.mark.parametrize(("total", "tinit", "tfinal", "delta_t"), SCHEDULES)
def test_budget_schedule_equals_peft_at_every_step(total, tinit, tfinal, delta_t):
    model = peft_adalora(tiny_bert(), ["query", "value"], init_r=6, target_r=3, total_step=total, tinit=tinit, tfinal=tfinal, deltaT=delta_t)
    alloc = model.base_model.rankallocator
    assert alloc.init_bgt == 24 and alloc.target_bgt == 12
    layers = {f"l{i}": AdaLoRALinear(nn.Linear(4, 4), r=6) for i in range(4)}
    mine = RankAllocator(layers, target_r=3, tinit=tinit, tfinal=tfinal, delta_t=delta_t, total_steps=total)
    assert (mine.init_budget, mine.target_budget) == (24, 12)
    for step in range(0, total + 5):
        ref = alloc.budget_schedule(step)
        assert budget_schedule(step, 24, 12, tinit=tinit, tfinal=tfinal, total_steps=total, delta_t=delta_t) == ref, step
        assert mine.budget_schedule(step) == ref, step


def _grads_for(model, ids, seed):
    labels = torch.randint(0, 2, (ids.shape[0],), generator=torch.Generator().manual_seed(seed))
    model.zero_grad()
    model(input_ids=ids, labels=labels).loss.backward()


# unequal EMA factors, both ways round, so that beta1 used where beta2 belongs (or the reverse) changes the numbers
BETAS = [(0.85, 0.85), (0.85, 0.95), (0.95, 0.85), (0.6, 0.99)]


def assert_ema_close(mine, ref, msg=None):
    """Importance EMAs are ~1e-7 to 1e-10 here: compare them on their own scale (assert_close's default atol=1e-5 would
    accept any two of them, e.g. beta1 and beta2 swapped)."""
    assert mine.shape == ref.shape, msg
    torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()), msg=msg)


@pytest.mark.parametrize(("beta1", "beta2"), BETAS)
def test_importance_scores_and_masks_equal_peft(beta1, beta2):
    """Given the same weights and gradients, peft's RankAllocator and ours make the same EMAs and masks."""
    model = tiny_bert()
    theirs = peft_adalora(copy.deepcopy(model), ["query", "value", "intermediate.dense"], orth_reg_weight=0.0, beta1=beta1, beta2=beta2).train()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_E" in n:
                p.normal_()
    ours = copy.deepcopy(model).train()
    names = inject_adalora(ours, ["query", "value", "intermediate.dense"], r=6, alpha=8)
    copy_from_peft(ours, theirs, names)
    layers = {n: ours.get_submodule(n) for n in names}
    mine = RankAllocator(layers, target_r=3, tinit=2, tfinal=4, delta_t=1, total_steps=20, beta1=beta1, beta2=beta2)
    ref = theirs.base_model.rankallocator
    assert (ref.beta1, ref.beta2) == (beta1, beta2)
    for step in range(4):
        ids = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(10 + step))
        _grads_for(theirs, ids, step)
        _grads_for(ours, ids, step)
        ref.update_ipt(theirs.base_model.model)
        mine.update_importance()
    for n in names:
        for key, pname in (("a", "lora_A"), ("e", "lora_E"), ("b", "lora_B")):
            assert_ema_close(mine.ema_ipt[n][key], ref.exp_avg_ipt[f"{n}.{pname}.default"], f"{n} S_{key}")
            assert_ema_close(mine.ema_unc[n][key], ref.exp_avg_unc[f"{n}.{pname}.default"], f"{n} U_{key}")
    for budget in (30, 20, 9):
        pattern = ref.mask_to_budget(theirs.base_model.model, budget)
        masks = mine.mask_to_budget(budget)
        mine.apply_masks()
        assert sum(int(m.sum()) for m in masks.values()) == budget
        for n in names:
            assert masks[n].tolist() == pattern[f"{n}.lora_E.default"], n
            torch.testing.assert_close(layers[n].adalora_e, theirs.base_model.model.get_submodule(n).lora_E["default"])


def _spy_reallocations(alloc, events, clock):
    """Record ``(step, budget)`` each time ``alloc.mask_to_budget`` runs (peft's or ours; both call it through self)."""
    original = alloc.mask_to_budget

    def spy(*args):
        events.append((clock[0], args[-1]))
        return original(*args)

    alloc.mask_to_budget = spy


# (total_steps, tinit, tfinal, delta_t), run step by step against peft: tinit a multiple of delta_t with the final
# allocation (total - tfinal) off the delta_t grid, both on it, both off it, tinit = tfinal = 0 (no final phase in the
# run), tfinal = 1
ALLOCATION_SCHEDULES = [(18, 4, 5, 2), (18, 6, 6, 3), (18, 5, 4, 3), (14, 0, 0, 1), (15, 3, 1, 3)]


@pytest.mark.parametrize(("beta1", "beta2"), [(0.85, 0.95), (0.95, 0.85)])
@pytest.mark.parametrize(("total", "tinit", "tfinal", "delta_t"), ALLOCATION_SCHEDULES)
def test_allocation_equals_peft_at_every_step(total, tinit, tfinal, delta_t, beta1, beta2):
    """A whole schedule, step by step: our model trains (our order: scores from the weights and gradients before the
    step, SGD step, masks applied), and at every step peft's AdaLoraModel.update_and_allocate gets the same weights and
    gradients. Same EMAs, same reallocation steps and budgets, same allocated triplets at every step, the final allocation
    at total - tfinal, fixed afterwards (and reapplied after every step) in both."""
    targets = ["query", "value", "intermediate.dense"]
    model = tiny_bert()
    theirs = peft_adalora(
        copy.deepcopy(model), targets, orth_reg_weight=0.0, total_step=total, tinit=tinit, tfinal=tfinal, deltaT=delta_t,
        beta1=beta1, beta2=beta2,
    ).train()
    ours = copy.deepcopy(model).train()
    names = inject_adalora(ours, targets, r=6, alpha=8)
    for p in ours.parameters():
        p.requires_grad_(False)
    layers = {n: ours.get_submodule(n) for n in names}
    params = [p for m in layers.values() for p in (m.adalora_a, m.adalora_e, m.adalora_b)]
    for p in params:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in layers.values():  # non-zero E, so that every triplet gets a distinct score
            m.adalora_e.copy_(torch.randn(m.adalora_e.shape, generator=g))
    mine = RankAllocator(layers, target_r=3, tinit=tinit, tfinal=tfinal, delta_t=delta_t, total_steps=total, beta1=beta1, beta2=beta2)
    ref, cfg, inner = theirs.base_model.rankallocator, theirs.peft_config["default"], theirs.base_model.model
    clock, ref_events, my_events = [None], [], []
    _spy_reallocations(ref, ref_events, clock)
    _spy_reallocations(mine, my_events, clock)
    final, final_pattern, reapplied = total - tfinal, None, False
    for step in range(total):
        clock[0] = step
        ids = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(100 + step))
        _grads_for(ours, ids, step)
        e_before = {}
        with torch.no_grad():  # peft sees exactly our weights and gradients
            for n, m in layers.items():
                peft_layer = inner.get_submodule(n)
                for src, dst in ((m.adalora_a, peft_layer.lora_A["default"]), (m.adalora_e, peft_layer.lora_E["default"]), (m.adalora_b, peft_layer.lora_B["default"])):
                    dst.copy_(src)
                    dst.grad = src.grad.clone()
                e_before[n] = m.adalora_e.detach().clone()
        theirs.base_model.update_and_allocate(step)
        mine.update_and_allocate(step)
        # the EMAs (peft drops them at the final allocation, and so do we)
        assert bool(mine.ema_ipt) == bool(ref.exp_avg_ipt) == (step < final), step
        for n in names if step < final else []:
            for key, pname in (("a", "lora_A"), ("e", "lora_E"), ("b", "lora_B")):
                assert_ema_close(mine.ema_ipt[n][key], ref.exp_avg_ipt[f"{n}.{pname}.default"], f"step {step} {n} S_{key}")
                assert_ema_close(mine.ema_unc[n][key], ref.exp_avg_unc[f"{n}.{pname}.default"], f"step {step} {n} U_{key}")
        assert my_events == ref_events, step  # reallocated at the same steps, to the same budgets
        with torch.no_grad():  # our optimizer step, then the masks (the callback's order)
            for p in params:
                p.sub_(0.5 * p.grad)
        if step > final:
            reapplied |= any(bool(m.adalora_e[~m.rank_mask].abs().sum() > 0) for m in layers.values())
        mine.apply_masks()
        # the allocation in force after this step: peft's latest rank_pattern (all kept before its first reallocation)
        pattern = {n: cfg.rank_pattern[f"{n}.lora_E.default"] if cfg.rank_pattern else [True] * 6 for n in names}
        assert sum(sum(v) for v in pattern.values()) == mine.budget(), step
        for n, m in layers.items():
            assert m.rank_pattern() == pattern[n], (step, n)
            assert torch.count_nonzero(m.adalora_e[~m.rank_mask]) == 0, (step, n)  # masked E zero after every step
            keep = torch.tensor(pattern[n]).view(-1, 1)  # peft zeroed the same entries of the same E
            torch.testing.assert_close(inner.get_submodule(n).lora_E["default"], e_before[n] * keep, rtol=0, atol=0)
        if step == final:
            final_pattern = pattern
            assert ref_events[-1] == (final, mine.target_budget) and mine.finalized
        elif step > final:  # no reallocation after the final one: the same triplets in both
            assert pattern == final_pattern and ref_events[-1][0] == final, step
    assert [s for s, _ in ref_events] == [s for s in range(tinit + 1, min(final, total)) if s % delta_t == 0] + ([final] if final < total else [])
    if final < total - 1:
        assert reapplied  # the masked E moved in the optimizer step and was zeroed again in the final phase
    assert len(set(mine.ranks().values())) > 1  # the budget moved between layers


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
