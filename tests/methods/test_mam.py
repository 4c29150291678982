import pytest
import torch

from lightning_peft.callbacks.mam_adapter import MAMAdapter
from lightning_peft.callbacks.parallel_adapter import ParallelAdapter
from lightning_peft.callbacks.prefix_tuning import PrefixTuning
from lightning_peft.methods.parallel_adapter import ParallelAdapter as ParallelAdapterLayer
from lightning_peft.methods.prefix_tuning import PrefixKV
from tests.methods.prompt_helpers import randomize
from tests.methods.sst2_helpers import minilm_classifier, minilm_counts, sst2_batch, tiny_decoder, train_losses


def _ids(n=2, t=9, seed=0):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def _adam_steps(model, ids, steps=3):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_equals_prefix_tuning_then_parallel_adapter_by_hand(family):
    """Same seed: the same parameters, the same outputs, and the same parameters after training."""
    torch.manual_seed(5)
    ours = MAMAdapter(num_virtual_tokens=4, bottleneck_size=8).inject(tiny_decoder(family).train())
    torch.manual_seed(5)
    by_hand = tiny_decoder(family).train()
    PrefixTuning(num_virtual_tokens=4).inject(by_hand)
    ParallelAdapter(bottleneck_size=8, scaling=4.0).inject(by_hand)
    a, b = ours.state_dict(), by_hand.state_dict()
    assert a.keys() == b.keys() and any(".parallel_up" in k for k in a) and any("prefix_mlp" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    ids = _ids()
    _adam_steps(ours, ids)
    _adam_steps(by_hand, ids)
    a, b = ours.state_dict(), by_hand.state_dict()
    assert not torch.equal(a[next(k for k in a if k.endswith("parallel_up"))], torch.zeros(1))  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    ours.eval(), by_hand.eval()
    torch.testing.assert_close(ours(ids).logits, by_hand(ids).logits, rtol=0, atol=0)


def test_defaults_on_minilm_and_identity_apart_from_the_prefix(minilm_path):
    """Paper defaults scaled to MiniLM (30 prefixes, FFN bottleneck 384 / 2, s = 4). At init the parallel adapters add
    exactly zero: MAM equals the prefixes alone, and with the prefix switched off it equals the base model."""
    model = minilm_classifier(minilm_path)
    ids = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    base = model(input_ids=ids, attention_mask=mask).logits
    cb = MAMAdapter()
    cb.inject(model)
    prefix = model.prefix_tuning
    parallels = [m for m in model.modules() if isinstance(m, ParallelAdapterLayer)]
    assert isinstance(prefix, PrefixKV) and prefix.num_virtual_tokens == 30
    assert len(parallels) == 6 and {(p.bottleneck, p.scaling, p.hidden) for p in parallels} == {(192, 4.0, 384)}
    assert all(n.endswith(".output") and ".attention." not in n for n in cb.injected[1:]) and cb.injected[0] == "prefix_tuning"
    mam = model(input_ids=ids, attention_mask=mask).logits
    for p in parallels:
        p.disabled = True
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, mam, rtol=0, atol=0)
    for p in parallels:
        p.disabled = False
    prefix.disabled = True
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, base, rtol=0, atol=0)
    prefix.disabled = False
    assert not torch.allclose(mam, base, atol=1e-4)  # the prefix is live from step 0
    randomize(parallels[0], seed=2, scale=0.1)
    assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, mam, atol=1e-5)  # and so are the adapters


def test_typed_counts_are_the_sum_of_the_parts(minilm_path):
    mam = minilm_counts(minilm_path, MAMAdapter(trainable_modules=["classifier"]))
    prefix = minilm_counts(minilm_path, PrefixTuning(num_virtual_tokens=30, trainable_modules=["classifier"]))
    parallel = minilm_counts(minilm_path, ParallelAdapter(reduction_factor=2, scaling=4.0, trainable_modules=["classifier"]))
    head = 384 * 2 + 2
    assert mam.added == prefix.added + parallel.added
    assert parallel.added == 6 * (2 * 384 * 192 + 192 + 384)
    assert mam.changed == prefix.changed == parallel.changed == head
    assert mam.trainable == prefix.trainable + parallel.trainable - head == mam.added + head
    assert mam.adapter_bytes == prefix.adapter_bytes + parallel.adapter_bytes - 4 * head
    assert mam.base_total == prefix.base_total == parallel.base_total


def test_learning_on_sst2_with_minilm(minilm_path, shared_data):
    torch.manual_seed(0)
    model = minilm_classifier(minilm_path)
    batch = sst2_batch(minilm_path, shared_data, n=16)
    MAMAdapter(trainable_modules=["classifier"]).inject(model)
    losses = train_losses(model, batch, steps=12, lr=1e-3)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses


def test_a_failing_part_leaves_the_model_unchanged():
    model = tiny_decoder("llama")
    ids = _ids()
    before = model(ids).logits
    names = sorted(n for n, _ in model.named_modules())
    with pytest.raises(ValueError, match=r"target_modules=\['no_such_module'\].*matched no module"):
        MAMAdapter(num_virtual_tokens=4, ffn_target_modules=["no_such_module"]).inject(model)
    assert sorted(n for n, _ in model.named_modules()) == names and not hasattr(model, "prefix_tuning")
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)  # the prefix hook is gone too
    MAMAdapter(num_virtual_tokens=4, bottleneck_size=8).inject(model)  # and the model takes a MAM adapter again


def test_bad_arguments():
    with pytest.raises(ValueError, match="give bottleneck_size or reduction_factor, not both"):
        MAMAdapter(bottleneck_size=64, reduction_factor=2)
    with pytest.raises(ValueError, match="scaling must be > 0, got 0"):
        MAMAdapter(scaling=0)
    with pytest.raises(ValueError, match="num_virtual_tokens must be an integer >= 1, got 0"):
        MAMAdapter(num_virtual_tokens=0)
