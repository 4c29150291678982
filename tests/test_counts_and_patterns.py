"""Parameter counts on models whose parameters are shared (tied word embeddings), and the regular-expression
keys of LoRA's ``rank_pattern`` / ``alpha_pattern``, each against an independent count or Hugging Face PEFT."""

import re

import pytest
import torch

from lightning_peft import LoRA, count_parameters
from lightning_peft.methods.lora import LoRALinear, inject_lora, pattern_value
from tests.conftest import tiny_llama, tiny_llama_config

peft = pytest.importorskip("peft")


# -- counts on tied models -------------------------------------------------------------------------
def _tied(family: str):
    """A tiny random model built from its config (no download) whose output head shares the input embedding."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = tiny_llama_config()
        cfg.tie_word_embeddings = True
        model = LlamaForCausalLM(cfg)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model.eval()


def _independent_counts(model, is_added) -> dict:
    """The five counts from scratch: each tensor once by its storage (``data_ptr``, shape), every name it has seen."""
    tensors: dict[tuple, list] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is not None:
                tensors.setdefault((p.data_ptr(), tuple(p.shape)), [p, set()])[1].add(f"{module_name}.{pname}".lstrip("."))
    added = sum(p.numel() for p, names in tensors.values() if any(map(is_added, names)))
    base = sum(p.numel() for p, names in tensors.values() if not any(map(is_added, names)))
    trainable = sum(p.numel() for p, _ in tensors.values() if p.requires_grad)
    changed = sum(p.numel() for p, names in tensors.values() if p.requires_grad and not any(map(is_added, names)))
    nbytes = sum(p.numel() * p.element_size() for p, names in tensors.values() if p.requires_grad or any(map(is_added, names)))
    return dict(trainable=trainable, added=added, changed=changed, adapter_bytes=nbytes, base_total=base)


def _is_lora(name: str) -> bool:
    return ".lora_" in name


def _as_dict(counts) -> dict:
    return dict(trainable=counts.trainable, added=counts.added, changed=counts.changed, adapter_bytes=counts.adapter_bytes, base_total=counts.base_total)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_counts_of_a_tied_model_count_the_shared_embedding_once(family):
    model = _tied(family)
    embedding = model.get_input_embeddings().weight.numel()
    listed_twice = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    counts = count_parameters(model)
    assert counts.base_total == listed_twice - embedding == model.num_parameters()
    assert _as_dict(counts) == _independent_counts(model, _is_lora)
    assert counts.trainable == counts.changed == counts.base_total and counts.added == 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_counts_with_lora_on_all_linear_equal_peft(family):
    model, twin = _tied(family), _tied(family)
    LoRA(r=4, alpha=8, target_modules="all-linear").inject(model)
    counts = count_parameters(model)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    assert _as_dict(counts) == _independent_counts(model, _is_lora)
    added = sum(p.numel() for n, p in model.named_parameters() if _is_lora(n))
    assert (counts.added, counts.trainable, counts.changed, counts.adapter_bytes) == (added, added, 0, 4 * added)
    theirs = peft.get_peft_model(twin, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert theirs.get_nb_trainable_parameters() == (counts.trainable, counts.base_total + counts.added)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_counts_with_the_tied_embedding_trained_count_it_once(family):
    model = _tied(family)
    embedding_name = "wte" if family == "gpt2" else "embed_tokens"
    base_total = count_parameters(model).base_total
    LoRA(r=4, alpha=8, target_modules="all-linear", trainable_modules=[embedding_name]).inject(model)
    embedding = model.get_input_embeddings().weight
    assert embedding.requires_grad and model.get_output_embeddings().weight.requires_grad  # one tensor
    counts = count_parameters(model)
    added = sum(p.numel() for n, p in model.named_parameters() if _is_lora(n))
    assert counts.changed == embedding.numel()
    assert (counts.added, counts.trainable, counts.base_total) == (added, added + embedding.numel(), base_total)
    assert counts.adapter_bytes == 4 * (added + embedding.numel())
    assert _as_dict(counts) == _independent_counts(model, _is_lora)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_counts_with_lora_on_the_tied_head_count_the_shared_weight_once(family):
    model = _tied(family)
    base_total = count_parameters(model).base_total
    LoRA(r=4, alpha=8, target_modules=["lm_head", "c_attn" if family == "gpt2" else "q_proj"]).inject(model)
    assert isinstance(model.lm_head, LoRALinear) and model.lm_head.weight is model.get_input_embeddings().weight
    counts = count_parameters(model)
    assert counts.base_total == base_total and counts.changed == 0
    assert _as_dict(counts) == _independent_counts(model, _is_lora)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_trainable_modules_naming_the_tied_head_train_the_shared_weight(family):
    model = _tied(family)
    LoRA(r=4, alpha=8, target_modules="all-linear", trainable_modules=["lm_head"]).inject(model)
    # the head is tied to the input embedding: naming either of its names trains the one shared tensor
    assert model.lm_head.weight.requires_grad and model.get_input_embeddings().weight.requires_grad
    assert count_parameters(model).changed == model.lm_head.weight.numel()


# -- rank_pattern / alpha_pattern keys: regular expressions matching the end of a name at a dot --------
#: keys that match a whole name, a dotted suffix, a regex suffix, and keys that only match inside a name or
#: without the dot boundary (which PEFT leaves at the default)
_KEYS = [
    "q_proj", "self_attn.v_proj", r"layers\.1\.mlp\..*", "model.layers.0.mlp.down_proj", "0.self_attn.k_proj",
    "proj", "q_pro", "self_attn", "layers.0", "o_proj|up_proj", r"(?:gate|down)_proj",
]


def _llama_names():
    return [n for n, m in tiny_llama().named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


@pytest.mark.parametrize("key", _KEYS)
def test_pattern_keys_match_like_peft(key):
    from peft.utils.other import get_pattern_key

    for name in _llama_names():
        ours = pattern_value(name, {key: 3}, 8)
        theirs = {key: 3}.get(get_pattern_key([key], name), 8)
        assert ours == theirs, (key, name)


def test_pattern_key_rules_on_names():
    name = "model.layers.0.self_attn.q_proj"
    for key in ("q_proj", "self_attn.q_proj", name, r"layers\.\d\.self_attn\.q_proj", "(q|k)_proj"):
        assert pattern_value(name, {key: 3}, 8) == 3, key
    # not at the end, not at a dot, or more than the name: the default
    for key in ("proj", "_proj", "q_pro", "self_attn", "layers.0", "x." + name, "model"):
        assert pattern_value(name, {key: 3}, 8) == 8, key
    # the first key that matches wins, in the dict's order (as PEFT's get_pattern_key)
    assert pattern_value(name, {"q_proj": 3, "self_attn.q_proj": 5}, 8) == 3


def test_rank_and_alpha_patterns_give_the_layers_peft_gives():
    rank_pattern = {"proj": 1, "q_proj": 2, r"layers\.1\.mlp\..*": 3, "self_attn": 5, "0.self_attn.k_proj": 6}
    alpha_pattern = {"v_proj": 3.0, "q_pro": 7.0, "model.layers.0.mlp.down_proj": 12.0}
    ours = tiny_llama()
    inject_lora(ours, "all-linear", r=4, alpha=8, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, strict=False)
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    )
    got = {n: (m.specs["default"].r, m.specs["default"].scaling) for n, m in ours.named_modules() if isinstance(m, LoRALinear)}
    want = {
        n.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
        for n, m in theirs.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert got == want
    assert {r for r, _ in got.values()} == {2, 3, 4, 6}  # the keys that match only inside names changed nothing


@pytest.mark.parametrize("arg", ["rank_pattern", "alpha_pattern"])
@pytest.mark.parametrize("key", ["proj", "q_pro", "self_attn", "layers.0"])
def test_pattern_key_matching_only_inside_names_is_a_typo(arg, key):
    value = 2 if arg == "rank_pattern" else 2.0
    with pytest.raises(ValueError, match=rf"{arg} key {re.escape(repr(key))} matches none of the adapted modules \(a typo\?\)"):
        LoRA(target_modules="all-linear", **{arg: {key: value}}).inject(tiny_llama())
