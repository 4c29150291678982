"""Per-sample routed LoRA in training (#27): a step over a batch whose rows name their adapters equals the sum of the
steps each adapter takes alone over its rows of the same batch, dropout included (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_peft import LoRA, disable_adapters, per_sample_adapters, set_active_adapters
from lightning_peft.core import Routing, mark_trainable
from lightning_peft.methods.lora import LoRALinear


def _layer(dropout: float, names=("a", "b", "c")) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), r=2, alpha=4, dropout=dropout, adapter_name=names[0])
    for i, n in enumerate(names[1:]):
        layer.add_adapter(n, r=2 + i, alpha=3, dropout=dropout)
    layer.double()
    for n in names:
        nn.init.normal_(layer.lora_b[n])
    return layer.train()


def _grads(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}


def _routed_and_separate(layer: nn.Module, x: torch.Tensor, names: list, weights: torch.Tensor, seed: int = 7):
    """(output, grads, grad_x) of the routed pass, and the same assembled from one pass per adapter over the whole
    batch with the loss over that adapter's rows only (accumulated gradients)."""
    params = dict(layer.named_parameters())
    x1 = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    with per_sample_adapters(layer, names):
        out = layer(x1)
    (out * weights).sum().backward()
    routed = (out.detach(), _grads(params), x1.grad.clone())
    layer.zero_grad(set_to_none=True)

    x2 = x.clone().requires_grad_(True)
    expected = torch.empty_like(out)
    for name in dict.fromkeys(names):
        rows = torch.tensor([i for i, n in enumerate(names) if n == name])
        torch.manual_seed(seed)
        if name is None:
            with disable_adapters(layer):
                full = layer(x2)
        else:
            set_active_adapters(layer, name)
            full = layer(x2)
        expected[rows] = full.detach()[rows]
        (full[rows] * weights[rows]).sum().backward()
    separate = (expected, _grads(params), x2.grad.clone())
    layer.zero_grad(set_to_none=True)
    return routed, separate


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("order", ["sorted", "mixed"])
def test_a_routed_step_equals_the_sum_of_the_per_adapter_steps(dropout, order):
    layer = _layer(dropout)
    names = ["a", "a", "b", "b", "b", None] if order == "sorted" else ["b", "a", None, "b", "a", "b"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 6, dtype=torch.float64, generator=g)
    weights = torch.randn(6, 3, 5, dtype=torch.float64, generator=g)
    (out, grads, grad_x), (exp_out, exp_grads, exp_grad_x) = _routed_and_separate(layer, x, names, weights)
    torch.testing.assert_close(out, exp_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_x, exp_grad_x, atol=1e-12, rtol=0)
    for n in ("lora_a.a", "lora_b.a", "lora_a.b", "lora_b.b", "weight", "bias"):
        torch.testing.assert_close(grads[n], exp_grads[n], atol=1e-12, rtol=0, msg=n)
    # 'c' is in no row: it is not an input of the step, as if it had not trained at all
    assert grads["lora_a.c"] is None and grads["lora_b.c"] is None
    if dropout:  # dropout is really applied: the routed output is not the evaluation output
        layer.eval()
        with torch.no_grad(), per_sample_adapters(layer, names):
            assert not torch.allclose(layer(x), out)


def test_sorted_rows_give_the_results_of_any_order_and_work_on_views():
    layer = _layer(0.3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, 6, dtype=torch.float64, generator=g)
    names = ["b", "a", "b", "c", "a", "b"]
    perm = sorted(range(6), key=lambda i: ["a", "b", "c"].index(names[i]))
    routing = Routing([names[i] for i in perm])
    assert routing.contiguous and dict(routing.groups) == {"a": slice(0, 2), "b": slice(2, 5), "c": slice(5, 6)}
    assert not Routing(names).contiguous and dict(Routing(names).groups)["a"] == [1, 4]
    layer.eval()
    with torch.no_grad():
        with per_sample_adapters(layer, names):
            mixed = layer(x)
        with per_sample_adapters(layer, list(routing)):
            ordered = layer(x[perm])
    torch.testing.assert_close(ordered, mixed[perm], atol=1e-12, rtol=0)


def test_routed_training_of_a_model_equals_the_per_adapter_steps_with_its_own_dropout_too():
    """Tiny BERT classifier, hidden and attention dropout on, LoRA dropout on, a shared trained head: the gradients of
    one routed pass equal the sum of one pass per adapter (the same seed, so the base model's dropout masks agree)."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).double().train()
    for name in ("a", "b"):
        LoRA(r=2, target_modules=["query", "value", "dense"], dropout=0.25, adapter_name=name).inject(model)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            for n in m.lora_b:
                nn.init.normal_(m.lora_b[n], std=0.1)
    mark_trainable(model, [n for n, _ in model.named_parameters() if n.startswith("classifier.")])
    ids = torch.randint(0, 50, (5, 7), generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 2, 1, 1, 0])
    names = ["a", "a", "b", "b", "b"]

    class Wrapped(nn.Module):  # the per-row loss summed, so the loss over some rows is a part of the whole
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, rows_weights):
            logits = model(input_ids=ids).logits
            return nn.functional.cross_entropy(logits, labels, reduction="none")[:, None] * rows_weights

    wrapped = Wrapped()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    torch.manual_seed(11)
    with per_sample_adapters(model, names):
        wrapped(torch.ones(5, 1, dtype=torch.float64)).sum().backward()
    routed = _grads(params)
    model.zero_grad(set_to_none=True)
    for name in ("a", "b"):
        set_active_adapters(model, name)
        torch.manual_seed(11)
        mask = torch.tensor([[float(n == name)] for n in names], dtype=torch.float64)
        wrapped(mask).sum().backward()
    separate = _grads(params)
    assert routed.keys() == separate.keys() and any(".lora_a.b" in n for n in routed)
    for n in routed:
        torch.testing.assert_close(routed[n], separate[n], atol=1e-10, rtol=1e-8, msg=n)


def test_disabled_adapters_are_honoured_under_routing():
    layer = _layer(0.0).eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    base = layer.base_forward(x)
    with torch.no_grad(), per_sample_adapters(layer, ["a", "b", "c"]), disable_adapters(layer):
        torch.testing.assert_close(layer(x), base, atol=0, rtol=0)


def test_variants_without_a_fused_routed_path_route_by_rows_too():
    """DoRA (and gated, PiSSA, embeddings, convolutions) add each adapter's update over its rows: in evaluation each
    row equals that adapter alone."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), r=2, alpha=4, adapter_name="a", use_dora=True).double().eval()
    layer.add_adapter("b", r=2, alpha=4)
    for n in ("a", "b"):
        nn.init.normal_(layer.lora_b[n])
    x = torch.randn(4, 6, dtype=torch.float64)
    alone = {}
    for n in ("a", "b"):
        set_active_adapters(layer, n)
        alone[n] = layer(x)
    with torch.no_grad(), per_sample_adapters(layer, ["b", "a", "a", None]):
        mixed = layer(x)
    expected = torch.stack([alone["b"][0], alone["a"][1], alone["a"][2], layer.base_forward(x)[3]])
    torch.testing.assert_close(mixed, expected.detach(), atol=1e-12, rtol=0)


def test_routing_names_are_checked():
    layer = _layer(0.0)
    with pytest.raises(TypeError, match="one adapter name .or None. per row, got 'ab'"):
        with per_sample_adapters(layer, "ab"):
            pass
    with pytest.raises(TypeError, match="must be a string or None, got 3"):
        with per_sample_adapters(layer, ["a", 3]):
            pass
