"""Several named adapters on one base; merge and unload; weighted combinations (peft as oracle)."""

import pytest
import torch
from torch import nn

from lightning_peft import (
    AdapterLayer,
    LoRA,
    add_weighted_adapter,
    adapter_names,
    delete_adapter,
    disable_adapters,
    load_adapter,
    merge_adapters,
    per_sample_adapters,
    save_adapter,
    set_active_adapters,
    set_adapter_trainable,
    unload,
    unmerge_adapters,
)
from lightning_peft.core import mark_trainable
from lightning_peft.methods.lora import LoRALinear
from tests.conftest import tiny_llama


def _randomize(model, name, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(f".{name}") and ("lora_a" in n or "lora_b" in n):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _ids(n=3):
    return torch.randint(0, 128, (n, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def two_adapters():
    """A tiny Llama with adapter 'a' (q,v; r=4) and 'b' (q,k,down; r=2), both randomized, plus references."""
    model = tiny_llama()
    base = model(_ids()).logits
    LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"], adapter_name="a").inject(model)
    _randomize(model, "a", 1)
    only_a = model(_ids()).logits
    LoRA(r=2, alpha=4, target_modules=["q_proj", "k_proj", "down_proj"], adapter_name="b").inject(model)
    _randomize(model, "b", 2)
    return model, base, only_a


def _alone(name, seed, **kw):
    model = tiny_llama()
    LoRA(adapter_name=name, **kw).inject(model)
    _randomize(model, name, seed)
    return model(_ids()).logits


def test_add_switch_activate_several_disable_delete(two_adapters):
    model, base, only_a = two_adapters
    assert adapter_names(model) == ["a", "b"]
    # the callback activates its adapter next to the existing one: both apply
    only_b = _alone("b", 2, r=2, alpha=4, target_modules=["q_proj", "k_proj", "down_proj"])
    set_active_adapters(model, "a")
    torch.testing.assert_close(model(_ids()).logits, only_a, atol=1e-6, rtol=0)
    set_active_adapters(model, "b")
    torch.testing.assert_close(model(_ids()).logits, only_b, atol=1e-6, rtol=0)
    set_active_adapters(model, ["a", "b"])
    both = model(_ids()).logits
    assert not torch.allclose(both, only_a, atol=1e-4) and not torch.allclose(both, only_b, atol=1e-4)
    # the two updates add up: delta(a+b) = delta(a) + delta(b) at the layer level
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(4, 32)
    set_active_adapters(model, ["a", "b"])
    ab = q(x)
    set_active_adapters(model, "a")
    a = q(x)
    set_active_adapters(model, "b")
    torch.testing.assert_close(ab - a, q(x) - q.base_layer()(x), atol=1e-6, rtol=0)
    with disable_adapters(model):
        torch.testing.assert_close(model(_ids()).logits, base, atol=1e-6, rtol=0)
    delete_adapter(model, "b")
    assert adapter_names(model) == ["a"]
    assert type(model.model.layers[0].self_attn.k_proj) is nn.Linear  # left without adapters: unwrapped
    assert not any(".b" in n for n, _ in model.named_parameters())
    set_active_adapters(model, "a")
    torch.testing.assert_close(model(_ids()).logits, only_a, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"No adapter named 'b' in LlamaForCausalLM: its adapters are \['a'\]"):
        set_active_adapters(model, "b")


def test_train_one_while_the_other_stays_frozen(two_adapters, tmp_path):
    model, _, _ = two_adapters
    set_adapter_trainable(model, "a", False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".b") for n in trainable)
    # adding or loading another adapter recomputes the flags: 'a' never flips back on
    save_adapter(model, tmp_path / "out", adapter_name="b")
    load_adapter(model, tmp_path / "out", adapter_name="c", is_trainable=True)
    LoRA(r=2, target_modules=["v_proj"], adapter_name="d").inject(model)
    mark_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.endswith(".a") for n in trainable)
    assert {n.rsplit(".", 1)[1] for n in trainable} == {"b", "c", "d"}
    # a step changes b only, never a
    set_active_adapters(model, ["a", "b"])
    a_before = {n: p.clone() for n, p in model.named_parameters() if n.endswith(".a")}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(_ids(), labels=_ids()).loss.backward()
    opt.step()
    assert all(torch.equal(p, a_before[n]) for n, p in model.named_parameters() if n.endswith(".a"))


def test_loaded_adapter_is_added_inactive_by_default(two_adapters, tmp_path):
    model, _, only_a = two_adapters
    save_adapter(model, tmp_path / "all")
    # layout as peft writes it: one directory per adapter under the root
    assert (tmp_path / "all" / "a" / "adapter_config.json").is_file() and (tmp_path / "all" / "b" / "adapter_model.safetensors").is_file()
    fresh = load_adapter(tiny_llama(), tmp_path / "all" / "a", adapter_name="a")
    load_adapter(fresh, tmp_path / "all" / "b", adapter_name="b")
    torch.testing.assert_close(fresh(_ids()).logits, only_a, atol=1e-6, rtol=0)  # 'b' added, not active
    set_active_adapters(fresh, ["a", "b"])
    set_active_adapters(model, ["a", "b"])
    torch.testing.assert_close(fresh(_ids()).logits, model(_ids()).logits, atol=1e-6, rtol=0)


def test_per_sample_adapter_selection_equals_each_sample_alone(two_adapters):
    model, base, only_a = two_adapters
    set_active_adapters(model, "b")
    only_b = model(_ids()).logits
    names = ["a", None, "b"]
    with torch.no_grad(), per_sample_adapters(model, names):
        mixed = model(_ids()).logits
    expected = torch.stack([only_a[0], base[1], only_b[2]])
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"adapter_names has 2 entries but the batch has 3 rows"):
        with per_sample_adapters(model, ["a", "b"]):
            model(_ids())
    with pytest.raises(ValueError, match="No adapter named 'zz'"):
        with per_sample_adapters(model, ["zz", "a", "b"]):
            pass


def test_per_sample_selection_matches_peft_adapter_names(two_adapters, tmp_path):
    peft = pytest.importorskip("peft")
    model, _, _ = two_adapters
    save_adapter(model, tmp_path / "all")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "all" / "a", adapter_name="a").eval()
    theirs.load_adapter(tmp_path / "all" / "b", adapter_name="b")
    names = ["b", "a", "b"]
    with torch.no_grad(), per_sample_adapters(model, names):
        ours = model(_ids()).logits
    torch.testing.assert_close(ours, theirs(_ids(), adapter_names=names).logits, atol=1e-5, rtol=0)


def test_weighted_cat_is_the_exact_weighted_sum_of_updates(two_adapters):
    model, _, _ = two_adapters
    add_weighted_adapter(model, ["a", "b"], [0.7, -0.3], "mix", combination_type="cat")
    q = model.model.layers[0].self_attn.q_proj
    expected = 0.7 * q.delta_weight("a") - 0.3 * q.delta_weight("b")
    torch.testing.assert_close(q.delta_weight("mix"), expected, atol=1e-6, rtol=0)
    assert q.specs["mix"].r == 6
    v = model.model.layers[0].self_attn.v_proj  # only 'a' there
    torch.testing.assert_close(v.delta_weight("mix"), 0.7 * v.delta_weight("a"), atol=1e-6, rtol=0)
    assert "mix" not in q.active and not q.lora_a["mix"].requires_grad


def test_weighted_linear_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    for name, seed in (("a", 1), ("b", 2)):
        LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"], adapter_name=name).inject(model)
        _randomize(model, name, seed)
    save_adapter(model, tmp_path / "all")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "all" / "a", adapter_name="a").eval()
    theirs.load_adapter(tmp_path / "all" / "b", adapter_name="b")
    theirs.add_weighted_adapter(["a", "b"], [0.6, 0.4], "mix", combination_type="linear")
    theirs.set_adapter("mix")
    add_weighted_adapter(model, ["a", "b"], [0.6, 0.4], "mix", combination_type="linear")
    set_active_adapters(model, "mix")
    torch.testing.assert_close(model(_ids()).logits, theirs(_ids()).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"combination_type='linear' needs adapters of one rank, found ranks \[2, 4\]; use 'cat'"):
        LoRA(r=2, target_modules=["q_proj"], adapter_name="c").inject(model)
        add_weighted_adapter(model, ["a", "c"], [0.5, 0.5], "bad", combination_type="linear")


def test_merge_unmerge_unload_and_a_plain_hf_model(two_adapters, tmp_path):
    from transformers import AutoModelForCausalLM

    model, base, _ = two_adapters
    set_active_adapters(model, ["a", "b"])
    adapted = model(_ids()).logits
    merge_adapters(model)
    torch.testing.assert_close(model(_ids()).logits, adapted, atol=1e-5, rtol=1e-5)
    with disable_adapters(model):  # merged updates are taken back out on the fly
        torch.testing.assert_close(model(_ids()).logits, base, atol=1e-5, rtol=1e-5)
    set_active_adapters(model, "a")  # 'b' is merged but no longer wanted: subtracted
    a_only = model(_ids()).logits
    unmerge_adapters(model)
    torch.testing.assert_close(model(_ids()).logits, a_only, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="is merged into the base weights: call unmerge_adapters"):
        merge_adapters(model)
        delete_adapter(model, "a")
    unmerge_adapters(model)
    set_active_adapters(model, ["a", "b"])
    plain = unload(model, merge=True)
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(plain(_ids()).logits, adapted, atol=1e-5, rtol=1e-5)
    plain.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    torch.testing.assert_close(reloaded(_ids()).logits, adapted, atol=1e-5, rtol=1e-5)


def test_unload_without_merge_gives_the_base_back():
    model = tiny_llama()
    base = model(_ids()).logits
    LoRA(r=4, target_modules="all-linear").inject(model)
    _randomize(model, "default", 1)
    merge_adapters(model)
    unload(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(_ids()).logits, base, atol=1e-5, rtol=1e-5)


class _Scale(AdapterLayer):
    """A non-mergeable adapter for the error path."""

    adapter_prefix = "scale_"

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.scale_v = nn.Parameter(torch.ones(base.out_features))

    def forward(self, x):
        return self.base(x) * self.scale_v


def test_non_mergeable_methods_say_so():
    model = nn.Sequential(nn.Linear(4, 4))
    model[0] = _Scale(model[0])
    with pytest.raises(NotImplementedError, match="_Scale cannot be merged into the base weights"):
        merge_adapters(model)
    with pytest.raises(ValueError, match=r"unload\(merge=True\): \['_Scale'\] cannot be merged.*unload\(merge=False\)"):
        unload(model, merge=True)
    with pytest.raises(NotImplementedError, match=r"Named adapters are implemented for LoRA layers, soft prompts .*; this model also carries \['_Scale'\]"):
        set_active_adapters(model, "default")


def _model_state(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize("fault", ["nan", "overflow"])
def test_unload_merge_that_fails_on_a_later_layer_changes_nothing(fault):
    from lightning_peft import LoRA

    model = LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]).inject(tiny_llama(seed=0))
    for n, p in model.named_parameters():
        if "lora_b" in n:
            torch.nn.init.normal_(p, std=0.1)
    last = model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        if fault == "nan":  # found up front: nothing is touched
            last.lora_b["default"][0, 0] = float("nan")
        else:  # finite values whose update overflows: found while merging, after the other layers merged
            last.lora_a["default"].fill_(3e38)
            last.lora_b["default"].fill_(3e38)
    before = _model_state(model)
    with pytest.raises(ValueError, match="hold NaN/inf" if fault == "nan" else "would write NaN/inf into the base weight"):
        unload(model, merge=True)
    after = _model_state(model)
    assert after[0] == before[0]  # every LoRA layer still in place
    for k, v in before[1].items():  # values back (an unmerge rounds in float32)
        torch.testing.assert_close(after[1][k], v, atol=0 if fault == "nan" else 1e-6, rtol=0, equal_nan=True)
    assert not any(m.merged for m in model.modules() if isinstance(m, LoRALinear))


def test_unload_merge_refuses_a_gated_lora_up_front():
    from lightning_peft import LoRA

    model = LoRA(r=4, alpha=8, target_modules=["q_proj"], gate=True).inject(tiny_llama(seed=0))
    before = _model_state(model)
    with pytest.raises(ValueError, match=r"unload\(merge=True\): \['LoRALinear'\] cannot be merged .*gated.*nothing was changed"):
        unload(model, merge=True)
    assert _same_state(_model_state(model), before)
