import pytest
import torch

from lightning_peft.core import count_parameters, disable_adapters, mark_trainable
from lightning_peft.methods.p_tuning_v2 import DeepPrompt, inject_p_tuning_v2
from tests.methods.prompt_helpers import check_generate_equals_greedy_loop, check_padding_invariance, check_peft_round_trip, randomize
from tests.methods.sst2_helpers import DECODERS, PROMPT_DECODERS, minilm_classifier, sst2_batch, tiny_decoder, train_losses


def _deep(family, n=4):
    model = tiny_decoder(family)
    inject_p_tuning_v2(model, n)
    mark_trainable(model)
    with torch.no_grad():
        model.p_tuning_v2.prefix_kv.mul_(0.5)
    return model


@pytest.mark.parametrize("family", PROMPT_DECODERS)
def test_generate_equals_a_greedy_forward_loop(family):
    check_generate_equals_greedy_loop(_deep(family))


@pytest.mark.parametrize("family", PROMPT_DECODERS)
def test_left_and_right_padding_give_the_samples_alone(family):
    check_padding_invariance(_deep(family), torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10, 11, 12, 13]))


def test_counts_and_disable():
    model = _deep("qwen2", n=6)
    counts = count_parameters(model)
    assert counts.trainable == counts.added == 6 * 2 * 2 * 2 * 8 and counts.changed == 0  # n x layers x (k, v) x kv_heads x head_dim
    ids = torch.randint(1, 100, (1, 5))
    assert not torch.allclose(model(input_ids=ids).logits, tiny_decoder("qwen2")(input_ids=ids).logits)
    with disable_adapters(model):
        torch.testing.assert_close(model(input_ids=ids).logits, tiny_decoder("qwen2")(input_ids=ids).logits, rtol=0, atol=0)


def test_bad_input():
    with pytest.raises(ValueError, match="num_virtual_tokens must be an integer >= 1, got -1"):
        inject_p_tuning_v2(tiny_decoder("gpt2"), -1)
    with pytest.raises(ValueError, match="num_virtual_tokens=64 leaves no room for the input: GPT2LMHeadModel takes at most 64"):
        inject_p_tuning_v2(tiny_decoder("gpt2"), 64)
    with pytest.raises(ValueError, match="P-tuning v2 trains its prompts directly"):
        DeepPrompt(tiny_decoder("gpt2"), 4, projection=True)


def test_learns_sst2_with_a_classification_head(minilm_path, shared_data):
    model = minilm_classifier(minilm_path)
    inject_p_tuning_v2(model, 10)
    with torch.no_grad():
        model.p_tuning_v2.prefix_kv.mul_(0.1)
    mark_trainable(model, extra=["classifier.weight", "classifier.bias"])
    losses = train_losses(model, sst2_batch(minilm_path, shared_data, n=16), steps=15, lr=1e-2)
    assert losses[-1] < losses[0] - 0.1, losses


def test_minilm_right_padding_invariance(minilm_path):
    model = minilm_classifier(minilm_path)
    inject_p_tuning_v2(model, 5)
    check_padding_invariance(model, torch.tensor([101, 2307, 102]), torch.tensor([101, 2023, 2003, 1037, 2307, 3185, 102]), sides=("right",))


def test_exports_as_peft_prefix_tuning_without_projection(tmp_path, minilm_path):
    pytest.importorskip("peft")
    import json

    from lightning_peft.callbacks.p_tuning_v2 import PTuningV2

    model = minilm_classifier(minilm_path)
    PTuningV2(num_virtual_tokens=6, trainable_modules=["classifier"]).inject(model)  # PEFT's SEQ_CLS models load the head too
    randomize(model.p_tuning_v2, scale=0.1)
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 2307, 102]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    check_peft_round_trip(tmp_path, model, lambda: minilm_classifier(minilm_path), batch)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["prefix_projection"], config["task_type"], config["num_layers"]) == ("PREFIX_TUNING", False, "SEQ_CLS", 6)
