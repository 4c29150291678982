import pytest
import torch

from lightning_peft.core import count_parameters, disable_adapters, mark_trainable
from lightning_peft.methods.prompt_tuning import PromptEmbedding, inject_prompt_tuning, text_token_ids
from tests.methods.prompt_helpers import peft_generate_agrees, check_generate_equals_greedy_loop, check_padding_invariance, check_peft_round_trip, randomize
from tests.methods.sst2_helpers import PROMPT_DECODERS, minilm_classifier, sst2_batch, tiny_decoder, train_losses


def _prompted(family, n=4, **kw):
    model = tiny_decoder(family)
    inject_prompt_tuning(model, n, **kw)
    mark_trainable(model)
    return model


@pytest.mark.parametrize("family", PROMPT_DECODERS)
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


@pytest.mark.parametrize("family", PROMPT_DECODERS)
def test_generate_equals_a_greedy_forward_loop(family):
    model = _prompted(family)
    randomize(model.prompt_tuning)
    check_generate_equals_greedy_loop(model)


@pytest.mark.parametrize("family", PROMPT_DECODERS)
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
    with pytest.raises(RuntimeError, match="already has a 'prompt_tuning' submodule: give the new soft prompt another adapter_name"):
        inject_prompt_tuning(model, 4)
    with pytest.raises(ValueError, match=r"Adapter names must be non-empty identifiers .* got 'a.b'"):
        inject_prompt_tuning(model, 4, adapter_name="a.b")


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
    peft_generate_agrees(theirs, model, ids)


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


def test_loading_a_prompt_under_a_name_it_has_is_refused_and_another_name_is_a_sibling(tmp_path):
    """Prompts are named (issue 27): a prompt loaded under a name the model's soft prompts already use is refused,
    leaving the model unchanged; under another name it becomes the sibling ``prompt_tuning_<name>``, inactive."""
    from lightning_peft.io import load_adapter, save_adapter

    model = _prompted("llama")
    save_adapter(model, tmp_path / "prompt")
    target = _prompted("llama")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(NotImplementedError, match=r"LlamaForCausalLM already carries a soft prompt named 'default': load PROMPT_TUNING under another adapter_name"):
        load_adapter(target, tmp_path / "prompt")
    assert target.state_dict().keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    load_adapter(target, tmp_path / "prompt", adapter_name="other")
    torch.testing.assert_close(target.prompt_tuning_other.prompt_embeddings, model.prompt_tuning.prompt_embeddings, rtol=0, atol=0)
    assert target.prompt_tuning_other.active == [] and target.prompt_tuning.active == ["default"]
    fresh = load_adapter(tiny_decoder("llama"), tmp_path / "prompt", adapter_name="other")  # a fresh base: active
    assert [n for n, _ in fresh.named_children()][-1] == "prompt_tuning_other" and fresh.prompt_tuning_other.active == ["other"]


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("family", PROMPT_DECODERS)
def test_the_cache_gets_the_prompt_once_under_either_argument_name(family, method):
    """Prefill then one cached step: the cache holds n + T + 1 positions (the prompt is not inserted again at the
    step), and the step's logits equal a full forward. The cache is passed under the model's own argument name
    (``cache`` from transformers 5.24, ``past_key_values`` before) and, where that is ``cache``, under the
    deprecated ``past_key_values`` too."""
    from transformers import DynamicCache

    from lightning_peft.compat import cache_arg, output_cache
    from lightning_peft.methods.prefix_tuning import inject_prefix_tuning

    n, ids = 4, torch.tensor([[5, 17, 33, 2, 9, 11]])
    model = tiny_decoder(family)
    (inject_prompt_tuning if method == "prompt" else inject_prefix_tuning)(model, n)
    randomize(getattr(model, "prompt_tuning" if method == "prompt" else "prefix_tuning"))
    own = cache_arg(model.forward)
    names = [own] + (["past_key_values"] if own == "cache" else [])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
        for name in names:
            out = model(input_ids=ids[:, :-1], attention_mask=torch.ones(1, 5, dtype=torch.long), use_cache=True, **{name: DynamicCache(config=model.config)})
            cache = output_cache(out)
            assert cache.get_seq_length() == n + 5
            step = model(input_ids=ids[:, -1:], attention_mask=torch.ones(1, 6, dtype=torch.long), use_cache=True, **{name: cache})
            assert output_cache(step).get_seq_length() == n + 6, name
            torch.testing.assert_close(step.logits[:, -1], full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", PROMPT_DECODERS)
def test_prefixes_reach_the_attention_of_every_decoder(family):
    """Not a silent no-op (OPT's top model calls its decoder directly, past the backbone's forward): random prefixes
    change the logits, and disabling them gives the base model's logits back exactly."""
    from lightning_peft.methods.prefix_tuning import inject_prefix_tuning

    model, base = tiny_decoder(family), tiny_decoder(family)
    inject_prefix_tuning(model, 4)
    randomize(model.prefix_tuning)
    ids = torch.tensor([[5, 17, 33, 2, 9]])
    with torch.no_grad():
        ref = base(input_ids=ids).logits
        assert (model(input_ids=ids).logits - ref).abs().max() > 1e-3
        with disable_adapters(model):
            torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)


def test_vision_models_are_refused_with_the_alternative():
    """ViT embeds pixels (ViTPatchEmbeddings has no token table): prompt and prefix methods refuse it by name, and
    the model is left as it was."""
    from transformers import ViTConfig, ViTForImageClassification

    from lightning_peft.methods.p_tuning import inject_p_tuning
    from lightning_peft.methods.prefix_tuning import inject_prefix_tuning

    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for inject in (inject_prompt_tuning, inject_p_tuning, inject_prefix_tuning):
        with pytest.raises(NotImplementedError, match=r"cannot attach to ViTForImageClassification: its input embeddings are a ViTPatchEmbeddings, not a token-embedding table.*Use LoRA"):
            inject(model, 4)
    assert model.state_dict().keys() == before.keys() and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not any(isinstance(m, PromptEmbedding) for m in model.modules())
