import pytest
import torch
from torch import nn

from lightning_peft.callbacks.parallel_adapter import ParallelAdapter
from lightning_peft.core import adapter_param_names, count_parameters, disable_adapters
from lightning_peft.methods.parallel_adapter import ParallelAdapter as ParallelAdapterLayer
from lightning_peft.methods.parallel_adapter import inject_parallel_adapter
from tests.methods.sst2_helpers import DECODERS, minilm_classifier, sst2_batch, tiny_decoder, train_losses
from tests.methods.test_houlsby import _randomize


def _adapter_ref(layer, x):
    z = torch.relu(x @ layer.parallel_down.T + layer.parallel_down_bias)
    return layer.scaling * (z @ layer.parallel_up.T + layer.parallel_up_bias)


def test_llama_mlp_matches_the_formula():
    model = tiny_decoder("llama")
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, 32)
    base_out = mlp(x)
    inject_parallel_adapter(model, bottleneck_size=4, scaling=2.5)
    layer = model.model.layers[0].mlp
    assert isinstance(layer, ParallelAdapterLayer) and not layer.residual_input
    _randomize(model, "parallel_")
    torch.testing.assert_close(layer(x), base_out + _adapter_ref(layer, x))
    with disable_adapters(model):
        torch.testing.assert_close(layer(x), base_out)


def test_bert_output_adds_the_adapter_before_the_layernorm(minilm_path):
    model = minilm_classifier(minilm_path)
    out = model.bert.encoder.layer[0].output  # LayerNorm(dropout(dense(h)) + input_tensor)
    h, x = torch.randn(2, 5, 1536), torch.randn(2, 5, 384)
    inject_parallel_adapter(model, bottleneck_size=8)
    layer = model.bert.encoder.layer[0].output
    assert layer.residual_input
    _randomize(model, "parallel_")
    ref = out.LayerNorm(out.dense(h) + _adapter_ref(layer, x) + x)
    torch.testing.assert_close(layer(h, x), ref)
    torch.testing.assert_close(layer(hidden_states=h, input_tensor=x), ref)


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("sites", [["ffn"], ["attention"]])
def test_identity_at_init_and_grads_only_on_adapters(family, sites):
    model = tiny_decoder(family)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    cb = ParallelAdapter(sites=sites)
    cb.inject(model)
    assert len(cb.injected) == 2 * len(sites)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    model(ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(adapter_param_names(model))
    _randomize(model, "parallel_")
    assert not torch.allclose(model(ids).logits, before, atol=1e-4)  # each site is live
    counts = count_parameters(model)
    assert counts.trainable == counts.added > 0 and counts.changed == 0


def test_attention_site_on_minilm_is_identity_at_init_and_live(minilm_path):
    model = minilm_classifier(minilm_path)
    ids = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    names = inject_parallel_adapter(model, sites=("attention", "ffn"))
    assert len(names) == 12 and sum(n.endswith("attention.output") for n in names) == 6
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def test_learning_on_sst2_with_minilm(minilm_path, shared_data):
    torch.manual_seed(0)
    model = minilm_classifier(minilm_path)
    batch = sst2_batch(minilm_path, shared_data)
    ParallelAdapter().inject(model)
    losses = train_losses(model, batch, steps=20, lr=5e-3)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses


def test_no_known_sublayer_names_what_it_looked_for():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"no attention or feed-forward sublayer in Sequential.*llama: \['self_attn'\] \+ \['mlp'\]"):
        ParallelAdapter().inject(model)
    assert not any(isinstance(m, ParallelAdapterLayer) for m in model.modules())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scaling": 0}, r"scaling must be > 0, got 0"),
        ({"bottleneck_size": 8, "reduction_factor": 4}, r"Parallel adapter: give bottleneck_size or reduction_factor, not both"),
        ({"sites": ["block"]}, r"sites must be a non-empty list of 'attention' and/or 'ffn'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelAdapter(**kwargs)
