"""A trained module per named adapter (#27, PEFT's ``modules_to_save`` with several adapters): each adapter that
declares ``trainable_modules=["classifier"]`` trains, switches, routes, saves and loads its own head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_peft import (
    LoRA,
    count_parameters,
    delete_adapter,
    load_adapter,
    per_sample_adapters,
    save_adapter,
    set_active_adapters,
    unload,
)
from lightning_peft.callbacks._checkpoints import adapter_checkpoint_state, check_adapter_checkpoint
from lightning_peft.core import peft_state
from lightning_peft.methods.lora import LoRALinear
from lightning_peft.module_copies import ModuleCopies

NAMES = ("a", "b", "c")


def _bert(dropout: float = 0.0, head_seed: int | None = None):
    """The same tiny BERT every call; the head re-drawn from ``head_seed`` if given (so only a file can restore it)."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, num_labels=3, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    if head_seed is not None:
        torch.manual_seed(head_seed)
        model.classifier.reset_parameters()
    return model


def _three(model=None, dropout: float = 0.0, order=NAMES):
    """A tiny BERT with LoRA adapters a, b, c, each with its own (different) head and non-zero B."""
    model = model if model is not None else _bert()
    for name in order:
        LoRA(r=2, target_modules=["query", "value"], dropout=dropout, adapter_name=name, trainable_modules=["classifier"]).inject(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_b" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _ids(n: int = 6, seed: int = 1):
    return torch.randint(1, 50, (n, 7), generator=torch.Generator().manual_seed(seed))


def _alone(model, name, ids):
    set_active_adapters(model, name)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_one_adapter_trains_the_head_in_place_and_a_second_one_makes_copies():
    model = _bert()
    LoRA(r=2, target_modules=["query", "value"], adapter_name="a", trainable_modules=["classifier"]).inject(model)
    assert type(model.classifier) is nn.Linear and peft_state(model)["trainable"] == ["classifier.bias", "classifier.weight"]
    single = count_parameters(model)
    head = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    LoRA(r=2, target_modules=["query", "value"], adapter_name="b", trainable_modules=["classifier"]).inject(model)
    assert isinstance(model.classifier, ModuleCopies) and peft_state(model)["owners"] == {"classifier": ["a", "b"]}
    keys = {k for k in model.state_dict() if k.startswith("classifier.")}
    # the original keeps its names (a base checkpoint still loads); each adapter's copy is PEFT's in-memory name
    assert keys == {"classifier.weight", "classifier.bias", *(f"classifier.modules_to_save.{n}.{p}" for n in "ab" for p in ("weight", "bias"))}
    assert peft_state(model)["trainable"] == []  # the head no longer trains in place
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("classifier.")}
    assert trainable == {f"classifier.modules_to_save.{n}.{p}" for n in "ab" for p in ("weight", "bias")}
    for n in "ab":  # both start from the head as it was
        assert all(torch.equal(model.classifier.modules_to_save[n].state_dict()[k], v) for k, v in head.items())
    counts = count_parameters(model)
    assert counts.changed == 0 and counts.added == 2 * (single.added + single.changed)


def test_each_adapter_trains_its_own_head_and_lora_only():
    model = _three().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with per_sample_adapters(model, ["b"] * 4):
        model(input_ids=_ids(4), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".b." in n or n.endswith(".b") for n in changed), sorted(changed)
    assert any("modules_to_save.b" in n for n in changed) and any("lora_a.b" in n for n in changed)


def test_switching_and_routing_use_each_adapters_head():
    model = _three()
    ids = _ids()
    alone = {n: _alone(model, n, ids) for n in NAMES}
    assert not torch.allclose(alone["a"], alone["b"])
    names = ["c", "a", "a", "b", "c", "b"]
    with torch.no_grad(), per_sample_adapters(model, names):
        mixed = model(input_ids=ids).logits
    torch.testing.assert_close(mixed, torch.stack([alone[n][i] for i, n in enumerate(names)]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"Adapters \['a', 'b'\] each have their own copy of classifier .*activate one of them"):
        set_active_adapters(model, ["a", "b"])
    torch.testing.assert_close(_alone(model, "c", ids), alone["c"])  # the refusal changed nothing


def test_delete_and_unload_follow_the_adapters_head():
    model = _three()
    ids = _ids()
    alone_b = _alone(model, "b", ids)
    delete_adapter(model, "a")
    assert model.classifier.adapter_names() == ["b", "c"] and peft_state(model)["owners"] == {"classifier": ["b", "c"]}
    torch.testing.assert_close(_alone(model, "b", ids), alone_b)
    set_active_adapters(model, "b")
    unload(model, merge=True)
    assert type(model.classifier) is nn.Linear and not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, alone_b, atol=1e-6, rtol=0)


def test_save_and_load_keep_a_head_per_adapter(tmp_path):
    model = _three()
    ids = _ids()
    alone = {n: _alone(model, n, ids) for n in NAMES}
    save_adapter(model, tmp_path / "all")
    fresh = _bert(head_seed=9)  # another head: only the files can restore them
    for n in NAMES:
        assert (tmp_path / "all" / n / "adapter_config.json").is_file()
        load_adapter(fresh, tmp_path / "all" / n, adapter_name=n, is_trainable=True)
    assert isinstance(fresh.classifier, ModuleCopies) and sorted(fresh.classifier.adapter_names()) == list(NAMES)
    for n in NAMES:
        torch.testing.assert_close(_alone(fresh, n, ids), alone[n], atol=1e-6, rtol=0)
    # and back: the reloaded model writes the same files
    save_adapter(fresh, tmp_path / "again")
    from safetensors.torch import load_file

    for n in NAMES:
        a, b = load_file(tmp_path / "all" / n / "adapter_model.safetensors"), load_file(tmp_path / "again" / n / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_heads_per_adapter_round_trip_with_peft_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    model = _three()
    ids = _ids()
    alone = {n: _alone(model, n, ids) for n in NAMES}
    save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(_bert(head_seed=9), tmp_path / "ours" / "a", adapter_name="a").eval()
    for n in NAMES[1:]:
        theirs.load_adapter(tmp_path / "ours" / n, adapter_name=n)
    for n in NAMES:
        theirs.set_adapter(n)
        with torch.no_grad():
            torch.testing.assert_close(theirs(input_ids=ids).logits, alone[n], atol=1e-6, rtol=0)
    names = ["b", "a", "c", "c", "a", "b"]
    with torch.no_grad():
        their_mixed = theirs(input_ids=ids, adapter_names=names).logits
        with per_sample_adapters(model, names):
            torch.testing.assert_close(model(input_ids=ids).logits, their_mixed, atol=1e-6, rtol=0)
    # peft -> ours: peft writes its own multi-adapter layout (a folder per adapter not named "default")
    theirs.save_pretrained(tmp_path / "theirs")
    ours = _bert(head_seed=9)
    for n in NAMES:
        load_adapter(ours, tmp_path / "theirs" / n, adapter_name=n)
    for n in NAMES:
        torch.testing.assert_close(_alone(ours, n, ids), alone[n], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_a_routed_step_with_heads_equals_the_per_adapter_steps(dropout):
    """Mixed rows train each adapter and its head as the per-adapter passes over the same batch do (float64; base
    dropout and LoRA dropout on: the same seed gives the same masks)."""
    model = _three(_bert(dropout=dropout), dropout=dropout).double().train()
    ids, labels = _ids(), torch.tensor([0, 1, 2, 2, 1, 0])
    names = ["a", "a", "b", "b", "c", "c"]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss(row_mask):
        logits = model(input_ids=ids).logits
        return (nn.functional.cross_entropy(logits, labels, reduction="none") * row_mask).sum()

    torch.manual_seed(3)
    with per_sample_adapters(model, names):
        loss(torch.ones(6, dtype=torch.float64)).backward()
    routed = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    for name in NAMES:
        set_active_adapters(model, name)
        torch.manual_seed(3)
        loss(torch.tensor([float(n == name) for n in names], dtype=torch.float64)).backward()
    for n, p in params.items():
        torch.testing.assert_close(routed[n], p.grad, atol=1e-10, rtol=1e-8, msg=n)
    assert all(routed[f"classifier.modules_to_save.{n}.weight"].abs().sum() > 0 for n in NAMES)


def test_checkpoint_records_are_per_adapter_and_a_changed_one_is_named():
    model = _three()
    checkpoint = {"state_dict": model.state_dict()}
    adapter_checkpoint_state(model, checkpoint)
    assert {r.get("adapter_name") for r in checkpoint["lightning_peft"]["methods"]} == set(NAMES)
    assert checkpoint["lightning_peft"]["owners"] == {"classifier": list(NAMES)}
    assert {"classifier.modules_to_save.c.weight", "classifier.weight"} & set(checkpoint["state_dict"]) == {"classifier.modules_to_save.c.weight"}
    check_adapter_checkpoint(_three(order=("c", "a", "b")), checkpoint)  # the same three adapters, added in another order
    other = _bert()
    for name in NAMES:
        LoRA(r=4 if name == "b" else 2, target_modules=["query", "value"], adapter_name=name, trainable_modules=["classifier"]).inject(other)
    with pytest.raises(ValueError, match=r"lora \(adapter 'b'\) setting r: checkpoint 2, now 4"):
        check_adapter_checkpoint(other, checkpoint, shapes=False)


def test_a_tied_module_is_not_copied_and_nothing_changes():
    from tests.conftest import tiny_llama

    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied
    LoRA(r=2, target_modules=["q_proj"], adapter_name="a", trainable_modules=["lm_head"]).inject(model)
    keys = set(model.state_dict())
    with pytest.raises(NotImplementedError, match=r"lm_head shares parameters with .*embed_tokens.* \(tied weights\)"):
        LoRA(r=2, target_modules=["q_proj"], adapter_name="b", trainable_modules=["lm_head"]).inject(model)
    assert set(model.state_dict()) == keys and type(model.lm_head) is nn.Linear
    assert [m.get("adapter_name", "default") for m in peft_state(model)["methods"]] == ["a"]


def test_an_adapter_checkpoint_restores_every_adapter_and_head_on_a_fresh_base():
    from lightning_peft.callbacks.base import load_adapter_checkpoint

    model = _three()
    ids = _ids()
    alone = {n: _alone(model, n, ids) for n in NAMES}
    checkpoint = {"state_dict": model.state_dict()}
    adapter_checkpoint_state(model, checkpoint)
    fresh = load_adapter_checkpoint(_bert(head_seed=9), checkpoint)
    assert isinstance(fresh.classifier, ModuleCopies) and peft_state(fresh)["owners"] == {"classifier": list(NAMES)}
    for n in NAMES:
        torch.testing.assert_close(_alone(fresh, n, ids), alone[n], atol=0, rtol=0)


def test_a_weighted_combination_takes_the_heads_of_the_adapter_named():
    from lightning_peft import add_weighted_adapter

    model = _three()
    ids = _ids()
    with pytest.raises(ValueError, match=r"have their own copies of \['classifier'\].*pass heads_from="):
        add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "mix")
    with pytest.raises(ValueError, match=r"heads_from='c' must be one of the combined adapters \['a', 'b'\]"):
        add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "mix", heads_from="c")
    add_weighted_adapter(model, ["a", "b"], [1.0, 0.0], "mix", heads_from="a")
    assert "mix" in peft_state(model)["owners"]["classifier"] and "mix" in model.classifier.frozen
    torch.testing.assert_close(_alone(model, "mix", ids), _alone(model, "a", ids), atol=1e-6, rtol=0)  # weight 1 on a: a


def test_deleting_the_only_owner_of_a_head_trained_in_place_stops_training_it():
    """One adapter trains the head in place (no copy): deleting that adapter leaves the head frozen and out of what
    is saved, not training for nobody; with copies, deleting the last owner unwraps the original, frozen too."""
    model = _bert()
    LoRA(r=2, target_modules=["query"], adapter_name="a", trainable_modules=["classifier"]).inject(model)
    state = peft_state(model)
    assert model.classifier.weight.requires_grad and "classifier.weight" in state["trainable"]
    delete_adapter(model, "a")
    assert not any(p.requires_grad for p in model.parameters())
    assert state["owners"] == {} and not [t for t in state["trainable"] if t.startswith("classifier.")]
    model = _three()
    for n in NAMES:
        delete_adapter(model, n)
    assert type(model.classifier) is nn.Linear and not any(p.requires_grad for p in model.parameters())
    assert peft_state(model)["owners"] == {} and not peft_state(model)["trainable"]


def test_deleting_the_owner_of_a_head_leaves_another_adapters_layers_inside_it_training():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.head = nn.Sequential()
            self.head.add_module("dense", nn.Linear(4, 4))
            self.head.add_module("out", nn.Linear(4, 2))

        def forward(self, x):
            return self.head(self.body(x))

    model = Net()
    LoRA(r=2, target_modules=["body"], adapter_name="a", trainable_modules=["head"]).inject(model)
    LoRA(r=2, target_modules=["head.dense"], adapter_name="b").inject(model)
    delete_adapter(model, "a")
    training = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert training and all(".b" in n and "lora_" in n for n in training), training  # b's LoRA in the head trains on
    assert not model.head.out.weight.requires_grad
