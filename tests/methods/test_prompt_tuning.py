import pytest
import torch

from lightning_peft.core import count_parameters, disable_adapters, mark_trainable
from lightning_peft.methods.prompt_tuning import PromptEmbedding, inject_prompt_tuning, text_token_ids
from tests.methods.prompt_helpers import check_generate_equals_greedy_loop, check_padding_invariance, check_peft_round_trip, randomize
from tests.methods.sst2_helpers import DECODERS, minilm_classifier, sst2_batch, tiny_decoder, train_losses


def _prompted(family, n=4, **kw):
    model = tiny_decoder(family)
    inject_prompt_tuning(model, n, **kw)
    mark_trainable(model)
    return model


@pytest.mark.parametrize("family", DECODERS)
def test_forward_is_the_base_on_prepended_embeddings(family):
    model = _prompted(family)
    randomize(model.prompt_tuning)
    ids = torch.randint(1, 100, (2, 6))
    prompt = model.prompt_tuning.prompt_embeddings
    with disable_adapters(model):
        embeds = torch.cat([prompt[None].expand(2, -1, -1), model.get_input_embeddings()(ids)], dim=1)
        ref = model(inputs_embeds=embeds).logits  # the base model on [P ; E(x)]
    out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, ref)
    # virtual positions are not targets: the last one predicts the first real token, as in PEFT
    logits = out.logits[:, 3:-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("family", DECODERS)
def test_generate_equals_a_greedy_forward_loop(family):
    model = _prompted(family)
    randomize(model.prompt_tuning)
    check_generate_equals_greedy_loop(model)


@pytest.mark.parametrize("family", DECODERS)
def test_left_and_right_padding_give_the_samples_alone(family):
    model = _prompted(family)
    randomize(model.prompt_tuning)
    check_padding_invariance(model, torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10, 11, 12, 13]))


def test_disable_adapters_and_counts():
    model = _prompted("llama", n=5)
    base = tiny_decoder("llama")
    ids = torch.randint(1, 100, (2, 6))
    with disable_adapters(model):
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)
    assert model(input_ids=ids).logits.shape[1] == 6 + 5
    counts = count_parameters(model)
    assert (counts.trainable, counts.added, counts.changed) == (5 * 32, 5 * 32, 0)
    assert counts.adapter_bytes == 5 * 32 * 4 and counts.base_total == sum(p.numel() for p in base.parameters())


def test_inits():
    model = tiny_decoder("llama")
    table = model.get_input_embeddings().weight
    torch.manual_seed(0)
    inject_prompt_tuning(model, 6, init="vocab")
    rows = model.prompt_tuning.prompt_embeddings.detach()
    assert all(any(torch.equal(r, t) for t in table.detach()) for r in rows)

    class Tok:  # a stand-in tokenizer: one id per character
        def __call__(self, text):
            return {"input_ids": [ord(c) % 100 for c in text]}

    assert text_token_ids(Tok(), "abc", 7) == [97, 98, 99, 97, 98, 99, 97]
    model = tiny_decoder("llama")
    inject_prompt_tuning(model, 7, init="text", init_text="abc", tokenizer=Tok())
    torch.testing.assert_close(model.prompt_tuning.prompt_embeddings.detach(), table.detach()[[97, 98, 99, 97, 98, 99, 97]])


def test_text_init_with_the_real_tokenizer(minilm_path):
    from transformers import AutoTokenizer

    model = minilm_classifier(minilm_path)
    inject_prompt_tuning(model, 8, init="text", init_text="Classify the sentiment:", tokenizer=minilm_path)
    ids = AutoTokenizer.from_pretrained(minilm_path)("Classify the sentiment:")["input_ids"]
    table = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(model.prompt_tuning.prompt_embeddings.detach(), table[(ids * 8)[:8]])


def test_bad_input_is_refused_with_the_fix():
    model = tiny_decoder("llama")
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=r"num_virtual_tokens must be an integer >= 1, got"):
            inject_prompt_tuning(model, bad)
    with pytest.raises(ValueError, match=r"num_virtual_tokens=128 leaves no room for the input: LlamaForCausalLM takes at most 128"):
        inject_prompt_tuning(model, 128)
    with pytest.raises(ValueError, match=r"init='text' needs the model's tokenizer"):
        inject_prompt_tuning(model, 4, init="text", init_text="hello")
    with pytest.raises(ValueError, match=r"init='text' needs a non-empty init_text"):
        inject_prompt_tuning(model, 4, init="text")
    assert not hasattr(model, "prompt_tuning")  # nothing was attached
    inject_prompt_tuning(model, 100)
    with pytest.raises(ValueError, match=r"100 virtual tokens \+ 40 input positions = 140 exceed the 128 positions LlamaForCausalLM takes"):
        model(input_ids=torch.ones(1, 40, dtype=torch.long))
    with pytest.raises(RuntimeError, match="already has a 'prompt_tuning' submodule"):
        inject_prompt_tuning(model, 4)


def test_learns_sst2_on_minilm(minilm_path, shared_data):
    model = minilm_classifier(minilm_path)
    inject_prompt_tuning(model, 10)
    mark_trainable(model, extra=["classifier.weight", "classifier.bias"])
    losses = train_losses(model, sst2_batch(minilm_path, shared_data, n=16), steps=15, lr=3e-2)
    assert losses[-1] < losses[0] - 0.1, losses


def test_peft_round_trip_tiny_llama(tmp_path):
    pytest.importorskip("peft")
    model = _prompted("llama", n=5)
    randomize(model.prompt_tuning)
    ids = torch.randint(1, 100, (2, 7))
    theirs, back = check_peft_round_trip(tmp_path, model, lambda: tiny_decoder("llama"), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert isinstance(back.prompt_tuning, PromptEmbedding)
    assert torch.equal(theirs.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0),
                       model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0))


def test_peft_round_trip_minilm_classifier(tmp_path, minilm_path):
    pytest.importorskip("peft")
    from lightning_peft.callbacks.prompt_tuning import PromptTuning

    model = minilm_classifier(minilm_path)
    PromptTuning(num_virtual_tokens=6, trainable_modules=["classifier"]).inject(model)
    randomize(model.prompt_tuning, scale=0.05)
    randomize(model.classifier)
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 2307, 102]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    check_peft_round_trip(tmp_path, model, lambda: minilm_classifier(minilm_path), batch)


def test_minilm_padding_invariance(minilm_path):
    model = minilm_classifier(minilm_path)
    inject_prompt_tuning(model, 6)
    check_padding_invariance(model, torch.tensor([101, 2307, 102]), torch.tensor([101, 2023, 2003, 1037, 2307, 3185, 102]))


def test_loading_refuses_a_named_adapter_and_a_second_prompt(tmp_path):
    """A soft-prompt adapter is one per model: another name, or a base that already has one, is refused unchanged."""
    from lightning_peft.io import load_adapter, save_adapter

    model = _prompted("llama")
    save_adapter(model, tmp_path / "prompt")
    with pytest.raises(NotImplementedError, match=r"A PROMPT_TUNING adapter is one prompt per model: load it as 'default', not 'other'"):
        load_adapter(tiny_decoder("llama"), tmp_path / "prompt", adapter_name="other")
    with pytest.raises(NotImplementedError, match=r"LlamaForCausalLM already carries a soft prompt: load PROMPT_TUNING onto a fresh base"):
        load_adapter(_prompted("llama"), tmp_path / "prompt")
