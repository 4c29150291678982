import pytest
import torch
from torch import nn

from lightning_peft.callbacks.bitfit import BitFit
from lightning_peft.core import count_parameters
from lightning_peft.methods.bitfit import apply_bitfit, find_biases
from tests.methods.sst2_helpers import minilm_classifier, sst2_batch, tiny_decoder, train_losses


def test_all_biases_train_and_are_counted_as_changed(minilm_path):
    model = minilm_classifier(minilm_path)
    BitFit().inject(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    biases = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert names == biases and len(biases) > 50  # q, k, v, dense, LayerNorm, ... in 6 blocks + head
    counts = count_parameters(model)
    assert counts.added == 0 and counts.changed == counts.trainable == sum(model.get_parameter(n).numel() for n in biases)


def test_subset_of_biases(minilm_path):
    model = minilm_classifier(minilm_path)
    names = apply_bitfit(model, ["query", "intermediate.dense"])
    assert len(names) == 12 and all(n.endswith(("query.bias", "intermediate.dense.bias")) for n in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    assert find_biases(model, r".*\.0\.attention\.self\.(query|key)") == [
        "bert.encoder.layer.0.attention.self.query.bias", "bert.encoder.layer.0.attention.self.key.bias",
    ]
    assert "classifier.bias" not in find_biases(model, exclude_modules=["classifier"])


def test_identity_at_init_and_grads_only_on_biases_on_gpt2():
    model = tiny_decoder("gpt2")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    cb = BitFit()
    cb.inject(model)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    model(ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and with_grad == set(cb.injected) and all(n.endswith("bias") for n in with_grad)


def test_llama_has_no_bias_and_the_error_says_what_to_use():
    model = tiny_decoder("llama")
    with pytest.raises(ValueError, match=r"no bias parameter in LlamaForCausalLM.*Use IA3\(\) or LoRA\(\)"):
        BitFit().inject(model)
    assert all(p.requires_grad for p in model.parameters())  # untouched


def test_qwen2_trains_its_attention_biases():
    model = tiny_decoder("qwen2")  # Qwen2 has biases on q, k, v only
    names = apply_bitfit(model)
    assert names and all(n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for n in names)


def test_subset_that_matches_no_bias_lists_the_modules_with_biases(minilm_path):
    model = minilm_classifier(minilm_path)
    with pytest.raises(ValueError, match=r"biases=\['q_proj'\].*matched no module with a bias.*\['LayerNorm', 'classifier', 'dense'.*'query'"):
        BitFit(biases=["q_proj"]).inject(model)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kwargs, err, match", [
    ({"biases": []}, ValueError, r"biases=\[\] selects nothing"),
    ({"biases": 3}, TypeError, r"biases must be None, a string or a list of strings, got int"),
])
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        BitFit(**kwargs)


def test_learning_on_sst2_with_minilm(minilm_path, shared_data):
    torch.manual_seed(0)
    model = minilm_classifier(minilm_path)
    batch = sst2_batch(minilm_path, shared_data)
    BitFit(exclude_modules=["classifier"]).inject(model)  # biases of the encoder only
    losses = train_losses(model, batch, steps=20, lr=1e-2)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses


def test_plain_module_without_bias():
    with pytest.raises(ValueError, match="no bias parameter in Linear"):
        find_biases(nn.Linear(3, 3, bias=False))
