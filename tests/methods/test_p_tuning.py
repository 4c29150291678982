import pytest
import torch

from lightning_peft.core import count_parameters, disable_adapters, mark_trainable
from lightning_peft.methods.p_tuning import PromptEncoder, inject_p_tuning
from tests.methods.prompt_helpers import (  # noqa: I001
    peft_generate_agrees,
    check_generate_equals_greedy_loop, check_padding_invariance, check_peft_round_trip, check_trains_like_peft, tiny_bert_classifier,
)
from tests.methods.sst2_helpers import DECODERS, PROMPT_DECODERS, minilm_classifier, sst2_batch, tiny_decoder, train_losses


def _encoded(family, encoder="mlp", n=4):
    model = tiny_decoder(family)
    inject_p_tuning(model, n, encoder=encoder, encoder_hidden_size=16)
    mark_trainable(model)
    return model


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_prompt_is_the_encoder_output_and_fold_keeps_it(encoder):
    model = _encoded("llama", encoder)
    layer = model.p_tuning
    x = layer.ptuning_embedding
    expected = layer.ptuning_mlp(layer.ptuning_lstm(x[None])[0][0] if encoder == "lstm" else x)
    torch.testing.assert_close(layer.prompt(), expected)
    ids = torch.randint(1, 100, (2, 5))
    with disable_adapters(model):
        ref = model(inputs_embeds=torch.cat([expected[None].expand(2, -1, -1), model.get_input_embeddings()(ids)], 1)).logits
    before = model(input_ids=ids).logits
    torch.testing.assert_close(before, ref)
    added = count_parameters(model).added
    assert added == sum(p.numel() for p in layer.parameters()) and count_parameters(model).trainable == added
    layer.fold()
    layer.fold()
    assert not hasattr(layer, "ptuning_mlp") and count_parameters(model).added == 4 * 32
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-5)  # LSTM kernels round differently


@pytest.mark.parametrize("family", PROMPT_DECODERS)
def test_generate_equals_a_greedy_forward_loop(family):
    check_generate_equals_greedy_loop(_encoded(family, "lstm"))


@pytest.mark.parametrize("family", PROMPT_DECODERS)
def test_left_and_right_padding_give_the_samples_alone(family):
    check_padding_invariance(_encoded(family), torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10, 11, 12, 13]))


def test_bad_input():
    with pytest.raises(ValueError, match="num_virtual_tokens must be an integer >= 1, got 0"):
        inject_p_tuning(tiny_decoder("llama"), 0)
    with pytest.raises(ValueError, match="encoder must be 'mlp' or 'lstm'"):
        inject_p_tuning(tiny_decoder("llama"), 4, encoder="gru")
    with pytest.raises(ValueError, match="num_virtual_tokens=128 leaves no room for the input: LlamaForCausalLM takes at most 128"):
        inject_p_tuning(tiny_decoder("llama"), 128)


def test_learns_sst2_on_minilm(minilm_path, shared_data):
    model = minilm_classifier(minilm_path)
    torch.manual_seed(0)
    inject_p_tuning(model, 10)
    mark_trainable(model, extra=["classifier.weight", "classifier.bias"])
    losses = train_losses(model, sst2_batch(minilm_path, shared_data, n=16), steps=20, lr=3e-3)
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_peft_round_trip_holds_the_output_only(tmp_path, encoder):
    pytest.importorskip("peft")
    model = _encoded("llama", encoder, n=5)
    ids = torch.randint(1, 100, (2, 7))
    theirs, back = check_peft_round_trip(tmp_path, model, lambda: tiny_decoder("llama"), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert isinstance(back.p_tuning, PromptEncoder) and back.p_tuning.folded  # served without an encoder
    peft_generate_agrees(theirs, model, ids)


def test_peft_round_trip_minilm_classifier(tmp_path, minilm_path):
    pytest.importorskip("peft")
    from lightning_peft.callbacks.p_tuning import PTuning

    model = minilm_classifier(minilm_path)
    PTuning(num_virtual_tokens=6, trainable_modules=["classifier"]).inject(model)
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 2307, 102]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    check_peft_round_trip(tmp_path, model, lambda: minilm_classifier(minilm_path), batch)


def _classifier_batch():
    ids = torch.randint(1, 64, (4, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2:, 6:] = 0  # right padding
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}


def test_trains_like_peft_with_the_mlp_encoder():
    """Training dynamics, not only the forward: the same AdamW steps from the same weights give PEFT's losses,
    gradients and weights (encoder and classifier)."""
    peft = pytest.importorskip("peft")
    ours = tiny_bert_classifier()
    inject_p_tuning(ours, 5, encoder_hidden_size=16)
    mark_trainable(ours, extra=["classifier.weight", "classifier.bias"])
    config = peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=5, encoder_reparameterization_type="MLP", encoder_hidden_size=16)
    theirs = peft.get_peft_model(tiny_bert_classifier(), config).train()
    names = {"p_tuning.ptuning_embedding": "prompt_encoder.default.embedding.weight"}
    names.update({f"p_tuning.ptuning_mlp.{i}.{w}": f"prompt_encoder.default.mlp_head.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")})
    check_trains_like_peft(ours, theirs, names, _classifier_batch())
