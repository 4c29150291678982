import pytest
import torch
from torch import nn

from lightning_peft.callbacks.houlsby import Houlsby
from lightning_peft.core import adapter_param_names, count_parameters, disable_adapters, merge_adapters
from lightning_peft.methods.houlsby import HoulsbyAdapter, inject_houlsby
from tests.methods.sst2_helpers import DECODERS, minilm_classifier, sst2_batch, tiny_decoder, train_losses


def _randomize(model, prefix="houlsby_", seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith(prefix):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def test_forward_matches_the_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 8).double()
    layer = HoulsbyAdapter(base, bottleneck=3, activation="gelu").double()
    _randomize(layer)
    x = torch.randn(5, 6, dtype=torch.float64)
    h = base(x)
    ref = h + torch.nn.functional.gelu(h @ layer.houlsby_down.T + layer.houlsby_down_bias) @ layer.houlsby_up.T + layer.houlsby_up_bias
    torch.testing.assert_close(layer(x), ref)
    with disable_adapters(layer):
        torch.testing.assert_close(layer(x), h)
    assert sorted(layer.adapter_params()) == ["houlsby_down", "houlsby_down_bias", "houlsby_up", "houlsby_up_bias"]


@pytest.mark.parametrize("family", DECODERS)
def test_defaults_identity_at_init_names_kept_and_grads_only_on_adapters(family):
    model = tiny_decoder(family)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    Houlsby().inject(model)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, HoulsbyAdapter)]
    assert len(wrapped) == 4  # attention output + FFN output in 2 blocks
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    # the base checkpoint loads unchanged: only adapter keys are missing, none unexpected
    result = model.load_state_dict(base_sd, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) == set(adapter_param_names(model))
    model(ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(adapter_param_names(model))
    counts = count_parameters(model)
    assert counts.trainable == counts.added > 0 and counts.changed == 0


def test_default_sites_and_bottleneck_on_minilm(minilm_path):
    model = minilm_classifier(minilm_path)
    names = inject_houlsby(model)
    assert len(names) == 12 and sum(n.endswith("attention.output.dense") for n in names) == 6
    layer = model.get_submodule(names[0])
    assert (layer.hidden, layer.bottleneck) == (384, 24)  # reduction factor 16
    ffn_only = inject_houlsby(minilm_classifier(minilm_path), sites=("ffn",), bottleneck_size=8)
    assert len(ffn_only) == 6 and not any("attention" in n for n in ffn_only)


def test_dtype_and_device_moves_reach_the_base():
    model = tiny_decoder("llama")
    Houlsby(bottleneck_size=4).inject(model)
    _randomize(model)
    ids = torch.randint(0, 128, (2, 9))
    ref = model(ids).logits.double()
    model.double()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_merge_is_refused():
    model = tiny_decoder("gpt2")
    Houlsby().inject(model)
    with pytest.raises(NotImplementedError, match="HoulsbyAdapter cannot be merged"):
        merge_adapters(model)


def test_learning_on_sst2_with_minilm(minilm_path, shared_data):
    torch.manual_seed(0)
    model = minilm_classifier(minilm_path)
    batch = sst2_batch(minilm_path, shared_data)
    Houlsby().inject(model)  # adapters only: the random head stays frozen
    losses = train_losses(model, batch, steps=20, lr=5e-3)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses


def test_no_known_block_names_what_it_looked_for():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"no attention-output or feed-forward-output projection in Sequential.*bert: \['attention\.output\.dense'\].*llama: \['self_attn\.o_proj'\]"):
        Houlsby().inject(model)
    assert not any(isinstance(m, HoulsbyAdapter) for m in model.modules())
    Houlsby(target_modules=["0"], bottleneck_size=2).inject(model)  # explicit targets work on any model
    assert isinstance(model[0], HoulsbyAdapter)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bottleneck_size": 8, "reduction_factor": 4}, r"give bottleneck_size or reduction_factor, not both"),
        ({"bottleneck_size": 0}, r"bottleneck_size must be a positive integer, got 0"),
        ({"reduction_factor": -1}, r"reduction_factor must be > 0, got -1"),
        ({"activation": "sigmoid"}, r"activation must be one of \['gelu', 'relu', 'silu', 'tanh'\], got 'sigmoid'"),
        ({"sites": ["mlp"]}, r"sites must be a non-empty list of 'attention' and/or 'ffn', got \['mlp'\]"),
        ({"sites": []}, r"sites must be a non-empty list"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Houlsby(**kwargs)


def test_target_without_linear_layer_is_refused_and_model_unchanged():
    model = tiny_decoder("llama")
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(TypeError, match=r"hidden size of LlamaRMSNorm.*has none"):
        Houlsby(target_modules=["o_proj", "input_layernorm"]).inject(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == before
