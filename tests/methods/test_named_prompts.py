"""Soft prompts by name (issue 27, item 3): prompt tuning, P-tuning and prefix tuning prompts named like LoRA
adapters, switched with ``set_active_adapters``, deleted, saved and loaded, and routed per sample, where a mixed
batch trains each prompt exactly as the batch would with that prompt active (dropout included)."""

import pytest
import torch

from lightning_peft.core import (
    adapter_names, count_parameters, delete_adapter, disable_adapters, mark_trainable, peft_state, per_sample_adapters,
    set_active_adapters, set_adapter_trainable,
)
from lightning_peft.methods.p_tuning import inject_p_tuning
from lightning_peft.methods.prefix_tuning import inject_prefix_tuning
from lightning_peft.methods.prompt_tuning import inject_prompt_tuning
from tests.methods.prompt_helpers import randomize
from tests.methods.sst2_helpers import tiny_decoder

#: method -> (injection with the test's settings, the default prompt's attribute)
METHODS = {
    "prompt": (lambda m, n, name="default": inject_prompt_tuning(m, n, init="random", adapter_name=name), "prompt_tuning"),
    "p_tuning": (lambda m, n, name="default": inject_p_tuning(m, n, encoder="mlp", encoder_hidden_size=8, adapter_name=name), "p_tuning"),
    "prefix": (lambda m, n, name="default": inject_prefix_tuning(m, n, encoder_hidden_size=8, adapter_name=name), "prefix_tuning"),
}


def _attr(method: str, name: str) -> str:
    attr = METHODS[method][1]
    return attr if name == "default" else f"{attr}_{name}"


def _prompted(method, names, n=4, make=None, seed=1):
    """A float64 model (tiny Llama by default) carrying ``method``'s prompts ``names`` (each moved off its init)."""
    model = (make or (lambda: tiny_decoder("llama")))()
    for i, name in enumerate(names):
        METHODS[method][0](model, n if isinstance(n, int) else n[i], name)
        randomize(getattr(model, _attr(method, name)), seed=seed + i)
    mark_trainable(model)
    return model.double()


def _alone(method, model, name, n=4, make=None):
    """A fresh base carrying only ``model``'s prompt ``name`` (as its "default"), with the same values."""
    ref = (make or (lambda: tiny_decoder("llama")))()
    METHODS[method][0](ref, n)
    ref = ref.double()
    getattr(ref, _attr(method, "default")).load_state_dict(getattr(model, _attr(method, name)).state_dict())
    return ref


IDS = torch.tensor([[5, 17, 33, 2, 9, 11], [40, 41, 42, 43, 44, 45], [7, 8, 9, 10, 3, 1]])


@pytest.mark.parametrize("method", list(METHODS))
def test_switching_gives_each_prompt_the_logits_of_a_model_carrying_only_it(method):
    model = _prompted(method, ["default", "sst2", "cola"])
    assert adapter_names(model) == ["default", "sst2", "cola"]
    with torch.no_grad():
        base = tiny_decoder("llama").double()(input_ids=IDS).logits
        for name in ("sst2", "default", "cola"):
            set_active_adapters(model, name)
            torch.testing.assert_close(model(input_ids=IDS).logits, _alone(method, model, name)(input_ids=IDS).logits, rtol=0, atol=1e-12)
        with disable_adapters(model):
            torch.testing.assert_close(model(input_ids=IDS).logits, base, rtol=0, atol=0)
        set_active_adapters(model, [])  # none active: the base model
        torch.testing.assert_close(model(input_ids=IDS).logits, base, rtol=0, atol=0)


def test_the_default_prompt_keeps_its_keys_and_further_prompts_are_siblings():
    single = _prompted("prompt", ["default"])
    model = _prompted("prompt", ["default", "sst2"])
    keys = sorted(k for k in model.state_dict() if "prompt" in k)
    assert keys == ["prompt_tuning.prompt_embeddings", "prompt_tuning_sst2.prompt_embeddings"]
    assert [k for k in single.state_dict() if "prompt" in k] == ["prompt_tuning.prompt_embeddings"]
    # a checkpoint of the one-prompt model loads into the two-prompt model's default unchanged
    missing, unexpected = model.load_state_dict(single.state_dict(), strict=False)
    assert missing == ["prompt_tuning_sst2.prompt_embeddings"] and unexpected == []
    counts = count_parameters(model)
    assert counts.added == counts.trainable == 2 * 4 * 32
    set_adapter_trainable(model, "default", False)
    assert not model.prompt_tuning.prompt_embeddings.requires_grad and model.prompt_tuning_sst2.prompt_embeddings.requires_grad
    assert count_parameters(model).trainable == 4 * 32


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_deleting_the_prompt_that_holds_the_hook_hands_it_to_the_next(method):
    model = _prompted(method, ["default", "a", "b"])
    host, first = _attr(method, "default"), _attr(method, "a")
    set_active_adapters(model, "a")
    with torch.no_grad():
        before = model(input_ids=IDS).logits
        delete_adapter(model, "default")
        assert adapter_names(model) == ["a", "b"] and not hasattr(model, host)  # taken out, no placeholder left
        assert not any(k.startswith(host + ".") for k in model.state_dict())
        torch.testing.assert_close(model(input_ids=IDS).logits, before, rtol=0, atol=0)
        delete_adapter(model, "a")
        assert not hasattr(model, first)
        set_active_adapters(model, "b")
        torch.testing.assert_close(model(input_ids=IDS).logits, _alone(method, model, "b")(input_ids=IDS).logits, rtol=0, atol=1e-12)
        delete_adapter(model, "b")
        torch.testing.assert_close(model(input_ids=IDS).logits, tiny_decoder("llama").double()(input_ids=IDS).logits, rtol=0, atol=0)
    METHODS[method][0](model, 4)  # the name is free again, and the new prompt hosts the hook
    assert model(input_ids=IDS).logits.shape[1] == IDS.shape[1] + (4 if method == "prompt" else 0)


def test_a_named_prompt_round_trips_through_save_and_load(tmp_path):
    from lightning_peft.io import load_adapter, save_adapter

    model = _prompted("prompt", ["default", "sst2"], make=lambda: tiny_decoder("llama").double())
    save_adapter(model, tmp_path / "all")  # "default" at the root, "sst2" in all/sst2 (peft's layout)
    save_adapter(model, tmp_path / "one", adapter_name="sst2")
    assert (tmp_path / "all" / "sst2" / "adapter_config.json").is_file()
    fresh = load_adapter(tiny_decoder("llama").double(), tmp_path / "all")
    load_adapter(fresh, tmp_path / "all" / "sst2", adapter_name="sst2")
    alone = load_adapter(tiny_decoder("llama").double(), tmp_path / "one", adapter_name="sst2")
    assert adapter_names(fresh) == ["default", "sst2"] and adapter_names(alone) == ["sst2"]
    assert peft_state(fresh)["methods"][-1]["adapter_name"] == "sst2" and "adapter_name" not in peft_state(fresh)["methods"][0]
    with torch.no_grad():
        for name in ("default", "sst2"):
            set_active_adapters(model, name)
            set_active_adapters(fresh, name)
            torch.testing.assert_close(fresh(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=0, atol=0)
        torch.testing.assert_close(alone(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=0, atol=0)


def test_the_callbacks_record_the_name_so_a_checkpoint_record_rebuilds_the_siblings():
    from lightning_peft.callbacks.base import inject_recorded_adapters
    from lightning_peft.callbacks.p_tuning import PTuning
    from lightning_peft.callbacks.prefix_tuning import PrefixTuning
    from lightning_peft.callbacks.prompt_tuning import PromptTuning

    assert "adapter_name" not in PromptTuning(num_virtual_tokens=4).config()  # a default record as it always was
    assert PromptTuning(num_virtual_tokens=4, adapter_name="sst2").config()["adapter_name"] == "sst2"
    assert PTuning(adapter_name="a").state_key != PTuning().state_key == PTuning(adapter_name="default").state_key
    for cls in (PromptTuning, PTuning, PrefixTuning):
        with pytest.raises(ValueError, match=r"Adapter names must be non-empty identifiers \(letters, digits, '_' or '-', no dots\), got 'a.b'"):
            cls(adapter_name="a.b")
    model = tiny_decoder("llama")
    PromptTuning(num_virtual_tokens=4, init="random").inject(model)
    PromptTuning(num_virtual_tokens=4, init="random", adapter_name="sst2", trainable_modules=["lm_head"]).inject(model)
    rebuilt = inject_recorded_adapters(tiny_decoder("llama"), peft_state(model))
    assert rebuilt.state_dict().keys() == model.state_dict().keys() and adapter_names(rebuilt) == ["default", "sst2"]
    assert {n for n, p in rebuilt.named_parameters() if p.requires_grad} == {n for n, p in model.named_parameters() if p.requires_grad}


# -- per-sample routing --------------------------------------------------------------------------------------
def _bert(dropout: float):
    """A tiny random BERT classifier, float64, eager attention; ``dropout`` on hidden states and attention."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, classifier_dropout=dropout, num_labels=3)
    cfg._attn_implementation = "eager"
    return BertForSequenceClassification(cfg)


def _bert_batch(rows: int = 6):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 64, (rows, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padded rows too
    mask[4, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}, torch.randint(0, 3, (rows,), generator=g)


def _grads(model):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("order", ["sorted", "mixed"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("method", list(METHODS))
def test_a_routed_step_equals_the_per_prompt_steps_on_the_same_rows(method, dropout, order):
    """The acceptance test of issue 27 for soft prompts. Routed: one forward of the whole batch, row ``r`` through
    its prompt, loss = sum of the per-row losses / N. Reference: per prompt ``x``, the whole batch with ``x`` active
    and the same seed (so the same dropout masks: the batch has the same shape), loss = sum over ``x``'s rows / N,
    gradients accumulated. Equal outputs per row, equal gradients of every prompt (a prompt absent from the batch
    gets none) and of the trained head."""
    model = _prompted(method, ["a", "b", "c"], make=lambda: _bert(dropout))
    mark_trainable(model, extra=["classifier.weight", "classifier.bias"])
    model.train()
    batch, labels = _bert_batch()
    names = ["a", "a", "b", "b", "b", "b"] if order == "sorted" else ["b", "a", "b", "b", "a", "b"]
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")

    torch.manual_seed(7)
    with per_sample_adapters(model, names):
        routed = model(**batch).logits
    (loss_fn(routed, labels).sum() / len(names)).backward()
    routed_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    expected = torch.empty_like(routed)
    for x in ("a", "b"):
        rows = torch.tensor([i for i, n in enumerate(names) if n == x])
        set_active_adapters(model, x)
        torch.manual_seed(7)
        out = model(**batch).logits
        expected[rows] = out[rows].detach()
        (loss_fn(out[rows], labels[rows]).sum() / len(names)).backward()
    reference = _grads(model)

    torch.testing.assert_close(routed.detach(), expected, rtol=0, atol=1e-12)
    assert routed_grads.keys() == reference.keys()
    for n, g in reference.items():
        if "_c." in n:  # the prompt no row names: no gradient, as when it is never active
            assert g is None and routed_grads[n] is None, n
        else:
            assert g is not None and g.abs().sum() > 0, n
            torch.testing.assert_close(routed_grads[n], g, rtol=0, atol=1e-10, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_routed_generation_gives_each_row_what_its_prompt_generates_alone(method):
    model = _prompted(method, ["a", "b"])
    ids = IDS[:2]
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with per_sample_adapters(model, ["b", "a"]):
        both = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)
    for row, name in enumerate(["b", "a"]):
        set_active_adapters(model, name)
        alone = model.generate(input_ids=ids[row:row + 1], attention_mask=torch.ones_like(ids[row:row + 1]), **gen)
        assert torch.equal(both[row], alone[0]), (name, both, alone)


def test_routing_refusals_name_the_problem_and_the_fix():
    ids = IDS
    model = _prompted("prompt", ["a", "b", "c"], n=[4, 4, 6])
    with pytest.raises(ValueError, match=r"The soft prompts \['a', 'b', 'c'\] are all active, and a forward applies one soft prompt\. Choose one with set_active_adapters"):
        model(input_ids=ids)
    with per_sample_adapters(model, ["a", "c", "b"]), pytest.raises(
        ValueError, match=r"the soft prompts in this batch have different lengths \{'a': 4, 'c': 6, 'b': 4\} \(num_virtual_tokens\).*Give the prompts routed together equal num_virtual_tokens"
    ):
        model(input_ids=ids)
    with per_sample_adapters(model, ["a", None, "b"]), pytest.raises(
        ValueError, match=r"row 1 names None, which has no prompt_tuning prompt on LlamaForCausalLM \(its prompts: \['a', 'b', 'c'\]\)\. Routed soft prompts need a prompt for every row"
    ):
        model(input_ids=ids)
    with per_sample_adapters(model, ["a", "b"]), pytest.raises(ValueError, match=r"per_sample_adapters names 2 rows but the batch has 3"):
        model(input_ids=ids)
    with torch.no_grad():
        set_active_adapters(model, "a")
        alone = model(input_ids=ids).logits
        with per_sample_adapters(model, ["a", "a", "a"]):  # one prompt for every row: the active path, exactly
            torch.testing.assert_close(model(input_ids=ids).logits, alone, rtol=0, atol=0)
        base = tiny_decoder("llama").double()(input_ids=ids).logits
        with per_sample_adapters(model, [None, None, None]):  # no row has a prompt: the base model
            torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=0)
        with per_sample_adapters(model, ["a", "b", "a"]), disable_adapters(model):
            torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=0)


def test_rows_of_another_methods_adapter_get_no_prompt_and_cannot_share_a_batch_with_prompted_rows():
    from lightning_peft.methods.lora import inject_lora

    model = _prompted("prompt", ["a", "b"])
    inject_lora(model, ["q_proj"], adapter_name="x")
    with torch.no_grad():
        set_active_adapters(model, "x")  # the prompts are switched off
        lora_only = model(input_ids=IDS).logits
        with per_sample_adapters(model, ["x", "x", "x"]):  # no row names a prompt: the prompts pass the batch through
            torch.testing.assert_close(model(input_ids=IDS).logits, lora_only, rtol=0, atol=1e-12)
        with per_sample_adapters(model, ["a", "x", "b"]), pytest.raises(ValueError, match=r"row 1 names 'x', which has no prompt_tuning prompt"):
            model(input_ids=IDS)


def test_gated_prefixes_route_one_adapter_per_batch():
    model = tiny_decoder("llama")
    inject_prefix_tuning(model, 4, gate=True, adapter_name="a")
    inject_prefix_tuning(model, 4, gate=True, adapter_name="b")
    with torch.no_grad():
        with per_sample_adapters(model, ["b", "b", "b"]):
            routed = model(input_ids=IDS).logits
        set_active_adapters(model, "b")
        torch.testing.assert_close(routed, model(input_ids=IDS).logits, rtol=0, atol=0)
        assert model.prefix_tuning_b.prefix_gate[0].last_mean is not None and model.prefix_tuning_a.prefix_gate[0].last_mean is None
        with per_sample_adapters(model, ["a", "b", "a"]), pytest.raises(
            NotImplementedError, match=r"the gated prefixes \['a', 'b'\] cannot share a batch with other prompts.*Batch their rows separately"
        ):
            model(input_ids=IDS)


def test_named_prompts_of_different_methods_are_refused_and_unnamed_ones_still_combine():
    model = tiny_decoder("llama")
    inject_prompt_tuning(model, 4, adapter_name="a")
    with pytest.raises(NotImplementedError, match=r"carries the soft prompts \['prompt_tuning_a'\]; a p_tuning prompt named 'b' cannot join them: named soft prompts .* must all be of one method"):
        inject_p_tuning(model, 4, adapter_name="b")
    with pytest.raises(NotImplementedError, match=r"a prefix_tuning prompt named 'default' cannot join them"):
        inject_prefix_tuning(model, 4)
    assert [n for n, _ in model.named_children()] == ["model", "lm_head", "prompt_tuning_a"]  # nothing was attached
    both = tiny_decoder("llama")
    inject_prompt_tuning(both, 4)
    inject_prefix_tuning(both, 4)  # one unnamed prompt per method, as before
    assert adapter_names(both) == ["default"] and both(input_ids=IDS).logits.shape[1] == IDS.shape[1] + 4
