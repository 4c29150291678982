import pytest
import torch

from lightning_peft.core import count_parameters, disable_adapters, mark_trainable
from lightning_peft.methods.prefix_tuning import PrefixKV, inject_prefix_tuning
from tests.methods.prompt_helpers import (  # noqa: I001
    PEFT_CACHE_OK, peft_generate_agrees,
    check_generate_equals_greedy_loop, check_padding_invariance, check_peft_round_trip, check_trains_like_peft, randomize, tiny_bert_classifier,
)
from tests.methods.sst2_helpers import DECODERS, PROMPT_DECODERS, minilm_classifier, sst2_batch, tiny_decoder, train_losses


def _prefixed(family, n=4, projection=True):
    model = tiny_decoder(family)
    inject_prefix_tuning(model, n, projection=projection, encoder_hidden_size=24)
    mark_trainable(model)
    return model


def test_attention_reads_the_prefixes_as_extra_keys_and_values():
    """One Llama layer: the attention output equals softmax over [prefix keys ; keys] by hand (float64)."""
    model = _prefixed("llama", n=3).double()
    layer = model.prefix_tuning
    attn = model.model.layers[0].self_attn
    seen = {}
    captured = {}
    attn.register_forward_hook(lambda m, a, out: seen.update(out=out[0]))
    attn.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids)
    h, cos_sin = captured["hidden_states"], captured["position_embeddings"]
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, T, _ = h.shape
    q = attn.q_proj(h).view(B, T, 4, 8).transpose(1, 2)
    k = attn.k_proj(h).view(B, T, 2, 8).transpose(1, 2)
    v = attn.v_proj(h).view(B, T, 2, 8).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *cos_sin)
    pk, pv = layer.prefixes()[0]  # (n, kv_heads, head_dim), no rotation: prefixes sit outside the sequence
    k = torch.cat([pk.permute(1, 0, 2)[None], k], dim=2).repeat_interleave(2, dim=1)
    v = torch.cat([pv.permute(1, 0, 2)[None], v], dim=2).repeat_interleave(2, dim=1)
    scores = q @ k.transpose(-1, -2) / 8**0.5
    causal = torch.ones(T, T).tril().bool()
    allowed = torch.cat([torch.ones(T, 3).bool(), causal], dim=1)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    ref = attn.o_proj((probs @ v).transpose(1, 2).reshape(B, T, 32))
    torch.testing.assert_close(seen["out"], ref)


@pytest.mark.parametrize("family", PROMPT_DECODERS)
def test_generate_equals_a_greedy_forward_loop(family):
    model = _prefixed(family)
    randomize(model.prefix_tuning)
    check_generate_equals_greedy_loop(model)


@pytest.mark.parametrize("family", PROMPT_DECODERS)
def test_left_and_right_padding_give_the_samples_alone(family):
    model = _prefixed(family)
    randomize(model.prefix_tuning)
    check_padding_invariance(model, torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10, 11, 12, 13]))


def test_minilm_right_padding_invariance(minilm_path):
    model = minilm_classifier(minilm_path)
    inject_prefix_tuning(model, 5)
    check_padding_invariance(model, torch.tensor([101, 2307, 102]), torch.tensor([101, 2023, 2003, 1037, 2307, 3185, 102]), sides=("right",))


def test_fold_drops_the_mlp_and_keeps_the_outputs():
    model = _prefixed("llama", n=4)
    layer = model.prefix_tuning
    ids = torch.randint(1, 100, (2, 6))
    before = model(input_ids=ids).logits
    counts = count_parameters(model)
    width = 2 * 2 * 2 * 8  # layers x (k, v) x kv_heads x head_dim
    assert counts.added == counts.trainable == 4 * 32 + (32 * 24 + 24) + (24 * width + width)
    layer.fold()
    layer.fold()
    assert not hasattr(layer, "prefix_mlp") and layer.prefix_kv.shape == (4, width)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-6)
    assert count_parameters(model).added == 4 * width
    with disable_adapters(model):
        torch.testing.assert_close(model(input_ids=ids).logits, tiny_decoder("llama")(input_ids=ids).logits, rtol=0, atol=0)


def test_bad_input_is_refused_with_the_fix():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    with pytest.raises(ValueError, match=r"num_virtual_tokens must be an integer >= 1, got 0"):
        inject_prefix_tuning(tiny_decoder("llama"), 0)
    with pytest.raises(ValueError, match=r"num_virtual_tokens=200 leaves no room for the input: LlamaForCausalLM takes at most 128"):
        inject_prefix_tuning(tiny_decoder("llama"), 200)
    model = tiny_decoder("llama")
    inject_prefix_tuning(model, 100)
    with pytest.raises(ValueError, match=r"100 virtual tokens \+ 30 input positions = 130 exceed the 128 positions"):
        model(input_ids=torch.ones(1, 30, dtype=torch.long))
    distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    with pytest.raises(NotImplementedError, match=r"cannot attach to DistilBertForSequenceClassification: none of its modules takes the input and a key/value cache"):
        inject_prefix_tuning(distil, 4)
    assert not hasattr(distil, "prefix_tuning")


def test_learns_sst2_on_minilm(minilm_path, shared_data):
    model = minilm_classifier(minilm_path)
    torch.manual_seed(0)
    inject_prefix_tuning(model, 10)
    mark_trainable(model, extra=["classifier.weight", "classifier.bias"])
    losses = train_losses(model, sst2_batch(minilm_path, shared_data, n=16), steps=25, lr=3e-3)
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("projection", [True, False])
def test_peft_round_trip_tiny_llama(tmp_path, projection):
    pytest.importorskip("peft")
    model = _prefixed("llama", n=5, projection=projection)
    randomize(model.prefix_tuning, scale=0.3)
    ids = torch.randint(1, 100, (2, 7))
    theirs, back = check_peft_round_trip(tmp_path, model, lambda: tiny_decoder("llama"), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert isinstance(back.prefix_tuning, PrefixKV) and not back.prefix_tuning.projection  # the file holds the prefixes only
    peft_generate_agrees(theirs, model, ids)


def test_peft_round_trip_minilm_classifier(tmp_path, minilm_path):
    pytest.importorskip("peft")
    from lightning_peft.callbacks.prefix_tuning import PrefixTuning

    model = minilm_classifier(minilm_path)
    PrefixTuning(num_virtual_tokens=6, trainable_modules=["classifier"]).inject(model)
    randomize(model.classifier)
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 2307, 102]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    check_peft_round_trip(tmp_path, model, lambda: minilm_classifier(minilm_path), batch)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_half_precision_model_gets_prefixes_in_its_dtype(family):
    """A bf16 model given token ids (no embeddings to read a dtype from) runs with fp32 prefix parameters cast to
    bf16, and equals the fp32 model with the same weights up to bf16 rounding."""
    model = _prefixed(family, n=3)
    randomize(model.prefix_tuning)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    want = model(input_ids=ids).logits
    for name, p in model.named_parameters():  # the base in bf16, the prefix parameters stay fp32
        if not name.startswith("prefix_tuning."):
            p.data = p.data.to(torch.bfloat16)
    assert {p.dtype for p in model.prefix_tuning.parameters()} == {torch.float32}
    got = model(input_ids=ids).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)
    got.float().sum().backward()
    grads = [p.grad for p in model.prefix_tuning.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)  # a zero gradient (prefixes cut off from the loss) would pass the line above


def test_trains_like_peft_through_the_mlp():
    """Training dynamics, not only the forward: the same AdamW steps from the same weights give PEFT's losses,
    gradients and weights (embedding, MLP and classifier)."""
    peft = pytest.importorskip("peft")
    if not PEFT_CACHE_OK:
        pytest.skip("peft's prefix tuning refuses transformers >= 5.24 (its cache argument is 'cache'); checked in the floor job")
    ours = tiny_bert_classifier()
    inject_prefix_tuning(ours, 5, encoder_hidden_size=16)
    mark_trainable(ours, extra=["classifier.weight", "classifier.bias"])
    config = peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=16)
    theirs = peft.get_peft_model(tiny_bert_classifier(), config).train()
    names = {"prefix_tuning.prefix_embedding": "prompt_encoder.default.embedding.weight"}
    names.update({f"prefix_tuning.prefix_mlp.{i}.{w}": f"prompt_encoder.default.transform.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")})
    ids = torch.randint(1, 64, (4, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2:, 6:] = 0  # right padding
    check_trains_like_peft(ours, theirs, names, {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])})
