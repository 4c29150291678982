"""Adapter files of classifiers and causal LMs in Hugging Face PEFT's format, both ways, with ``peft`` as the oracle:
classification heads (PEFT's ``modules_to_save``, matched as PEFT matches them), ``task_type``, loadable base paths,
and configs that ``peft`` reads without warnings."""

import json
import warnings

import pytest
import torch
from packaging.version import Version
from torch import nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lightning_peft import IA3, AdaLoRA, AdapterFileError, LlamaAdapter, LoRA, load_adapter, save_adapter, set_active_adapters
from lightning_peft.core import adapter_param_names
from tests.conftest import tiny_llama
from tests.methods.prompt_helpers import check_peft_round_trip, randomize

peft = pytest.importorskip("peft")


# -- tiny classifiers, built from configs -------------------------------------------------------------
def _config(arch, **kw):
    from transformers import BertConfig, DebertaV2Config, DistilBertConfig, RobertaConfig

    common = dict(vocab_size=64, num_labels=3, **kw)
    if arch == "distilbert":
        return DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, **common)
    bert_like = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    if arch == "roberta":
        return RobertaConfig(max_position_embeddings=72, pad_token_id=1, **bert_like)
    if arch == "deberta-v2":
        return DebertaV2Config(max_position_embeddings=64, pooler_dropout=0.0, **bert_like)
    return BertConfig(max_position_embeddings=64, **bert_like)


def _classifier(arch, head_seed=None, task="seq", head_keys=None):
    """The same encoder every call (seed 0); the head (every module PEFT matches as ``classifier``, or the parameters
    ``head_keys``) re-drawn from ``head_seed`` if given, so that a round trip only passes if the file restores it."""
    import transformers

    names = {"bert": "Bert", "roberta": "Roberta", "deberta-v2": "DebertaV2", "distilbert": "DistilBert"}
    cls = getattr(transformers, f"{names[arch]}For{'SequenceClassification' if task == 'seq' else 'TokenClassification'}")
    torch.manual_seed(0)
    model = cls(_config(arch)).eval()
    if head_seed is not None:
        g = torch.Generator().manual_seed(head_seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if (n in head_keys) if head_keys is not None else n.split(".")[0].endswith("classifier"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


LORA_TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "distilbert": ["q_lin", "v_lin"]}
#: what PEFT stores of each head (its modules_to_save=["classifier"] also takes DistilBERT's pre_classifier)
HEAD_KEYS = {
    "bert": ["classifier.bias", "classifier.weight"],
    "deberta-v2": ["classifier.bias", "classifier.weight"],
    "roberta": ["classifier.dense.bias", "classifier.dense.weight", "classifier.out_proj.bias", "classifier.out_proj.weight"],
    "distilbert": ["classifier.bias", "classifier.weight", "pre_classifier.bias", "pre_classifier.weight"],
}
ARCHS = list(LORA_TARGETS)
#: peft 0.22 matches modules_to_save at dot boundaries: an explicit ["classifier"] no longer takes DistilBERT's
#: pre_classifier (task_type="SEQ_CLS" adds "pre_classifier" by name instead)
PEFT_MATCHES_AT_DOTS = Version(peft.__version__) >= Version("0.22.0")


def _peft_head_keys(arch, explicit_modules_to_save):
    """What PEFT stores of the head: HEAD_KEYS, less pre_classifier for an explicit ["classifier"] in peft >= 0.22."""
    if explicit_modules_to_save and PEFT_MATCHES_AT_DOTS:
        return [k for k in HEAD_KEYS[arch] if not k.startswith("pre_classifier.")]
    return HEAD_KEYS[arch]


def _batch(n=2, t=9):
    ids = torch.randint(3, 64, (n, t), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _randomize_lora(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _peft_load(base, directory):
    """``peft.PeftModel.from_pretrained`` and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, directory).eval()
    return model, [str(w.message) for w in caught]


def _keys(directory):
    return set(load_file(directory / "adapter_model.safetensors"))


def _config_of(directory):
    return json.loads((directory / "adapter_config.json").read_text())


# -- LoRA on classifiers, both ways ------------------------------------------------------------------
@pytest.mark.parametrize("trained_head", [True, False], ids=["trained-head", "frozen-head"])
@pytest.mark.parametrize("arch", ARCHS)
def test_lora_classifier_saved_here_loads_in_peft(tmp_path, arch, trained_head):
    """The head is in the file whether it trained or not (PEFT's SEQ_CLS models always load it), whole: RoBERTa's
    ``classifier.dense``/``out_proj``, DistilBERT's ``pre_classifier`` (PEFT matches ``classifier`` as a suffix)."""
    ours = _classifier(arch)
    LoRA(r=4, alpha=8, target_modules=LORA_TARGETS[arch], trainable_modules=["classifier"] if trained_head else None).inject(ours)
    _randomize_lora(ours)
    if trained_head:
        randomize(ours.classifier, seed=7)
    save_adapter(ours, tmp_path / "a")
    config = _config_of(tmp_path / "a")
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
    assert {k for k in _keys(tmp_path / "a") if "lora_" not in k} == {f"base_model.model.{k}" for k in HEAD_KEYS[arch]}
    theirs, _ = _peft_load(_classifier(arch, head_seed=11), tmp_path / "a")
    torch.testing.assert_close(_logits(theirs, _batch()), _logits(ours, _batch()), atol=1e-5, rtol=0)


def _perturb(peft_model, parts: tuple[str, ...], seed: int = 5) -> None:
    """Move the peft model's parameters whose names contain one of ``parts`` away from their init (seeded)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if any(part in n for part in parts):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("peft_config", ["task", "modules_to_save"], ids=["task_type=SEQ_CLS", "modules_to_save=classifier"])
@pytest.mark.parametrize("arch", ARCHS)
def test_lora_classifier_saved_by_peft_loads_here(tmp_path, arch, peft_config):
    """PEFT's standard classifier adapters (``task_type="SEQ_CLS"``, or ``modules_to_save=["classifier"]``) load with
    every head parameter restored and the same logits; trainable when asked, as in PEFT."""
    kw = dict(task_type="SEQ_CLS") if peft_config == "task" else dict(modules_to_save=["classifier"])
    theirs = peft.get_peft_model(_classifier(arch), peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[arch], **kw)).eval()
    _perturb(theirs, ("lora_B", "modules_to_save"))
    theirs.save_pretrained(tmp_path / "p")
    head = _peft_head_keys(arch, peft_config == "modules_to_save")
    assert {k for k in _keys(tmp_path / "p") if "lora_" not in k} == {f"base_model.model.{k}" for k in head}
    ours = load_adapter(_classifier(arch, head_seed=11, head_keys=head), tmp_path / "p")  # what the file holds re-drawn
    torch.testing.assert_close(_logits(ours, _batch()), _logits(theirs, _batch()), atol=1e-5, rtol=0)
    saved = load_file(tmp_path / "p" / "adapter_model.safetensors")
    params = dict(ours.named_parameters())
    for key in head:
        assert torch.equal(params[key], saved[f"base_model.model.{key}"]), key
    trainable = load_adapter(_classifier(arch, head_seed=11, head_keys=head), tmp_path / "p", is_trainable=True)
    expected = set(adapter_param_names(trainable)) | set(head)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == expected
    peft_trainable = {n for n, p in peft.get_peft_model(_classifier(arch), peft.LoraConfig(r=4, target_modules=LORA_TARGETS[arch], **kw)).named_parameters() if p.requires_grad}
    assert len(peft_trainable) == len(expected)  # PEFT trains the same parameters


def test_lora_classifier_round_trips_through_peft_and_back(tmp_path):
    """ours -> peft -> peft's own save -> ours: the same logits at each step (DistilBERT: the trickiest head)."""
    ours = _classifier("distilbert")
    LoRA(r=4, alpha=8, target_modules=LORA_TARGETS["distilbert"], trainable_modules=["classifier"]).inject(ours)
    _randomize_lora(ours)
    randomize(ours.classifier, seed=7)
    save_adapter(ours, tmp_path / "ours")
    theirs, _ = _peft_load(_classifier("distilbert", head_seed=11), tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    back = load_adapter(_classifier("distilbert", head_seed=12), tmp_path / "theirs")
    expected = _logits(ours, _batch())
    torch.testing.assert_close(_logits(theirs, _batch()), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(back, _batch()), expected, atol=1e-5, rtol=0)


def test_token_classifier_round_trips_with_its_head(tmp_path):
    ours = _classifier("roberta", task="token")
    LoRA(r=4, alpha=8, target_modules=["query", "value"]).inject(ours)
    _randomize_lora(ours)
    save_adapter(ours, tmp_path / "ours")
    assert _config_of(tmp_path / "ours")["task_type"] == "TOKEN_CLS"
    theirs, _ = _peft_load(_classifier("roberta", head_seed=11, task="token"), tmp_path / "ours")
    assert type(theirs).__name__ == "PeftModelForTokenClassification"
    torch.testing.assert_close(_logits(theirs, _batch()), _logits(ours, _batch()), atol=1e-5, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    back = load_adapter(_classifier("roberta", head_seed=12, task="token"), tmp_path / "theirs")
    torch.testing.assert_close(_logits(back, _batch()), _logits(ours, _batch()), atol=1e-5, rtol=0)


def test_older_peft_spelling_of_a_saved_module_loads(tmp_path):
    """``<module>.modules_to_save.<adapter>.<param>`` (the wrapper's own names) is read as ``<module>.<param>``."""
    theirs = peft.get_peft_model(_classifier("roberta"), peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")).eval()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(0.1)
    theirs.save_pretrained(tmp_path / "p")
    path = tmp_path / "p" / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k.replace("classifier.", "classifier.modules_to_save.default."): v for k, v in tensors.items()}, str(path))
    ours = load_adapter(_classifier("roberta", head_seed=11), tmp_path / "p")
    torch.testing.assert_close(_logits(ours, _batch()), _logits(theirs, _batch()), atol=1e-5, rtol=0)


# -- soft prompts on classifiers: the head goes with the prompt ---------------------------------------------
def _prompt_callback(method, n=4):
    from lightning_peft.callbacks.p_tuning import PTuning
    from lightning_peft.callbacks.prefix_tuning import PrefixTuning
    from lightning_peft.callbacks.prompt_tuning import PromptTuning

    return {"prompt_tuning": lambda: PromptTuning(num_virtual_tokens=n), "p_tuning": lambda: PTuning(num_virtual_tokens=n, encoder_hidden_size=16),
            "prefix_tuning": lambda: PrefixTuning(num_virtual_tokens=n)}[method]()


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_prompt_adapter_on_a_classifier_carries_its_head(tmp_path, arch, method):
    """peft's prompt-learning SEQ_CLS models load the head from the file (``base_model.classifier...``); the user's
    head goes with the prompt even when it did not train, and comes back from peft's own save."""
    ours = _classifier(arch)
    _prompt_callback(method).inject(ours)
    randomize(getattr(ours, method), scale=0.2)
    heads = iter(range(20, 30))
    batch = _batch()
    theirs, back = check_peft_round_trip(tmp_path, ours, lambda: _classifier(arch, head_seed=next(heads)), batch)
    config = _config_of(tmp_path / "ours")
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    assert _keys(tmp_path / "ours") == {"prompt_embeddings", *(f"base_model.{k}" for k in HEAD_KEYS[arch])}
    params = dict(back.named_parameters())
    for key in HEAD_KEYS[arch]:
        assert torch.equal(params[key], dict(ours.named_parameters())[key]), key


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_prompt_on_roberta_with_a_mask_positions_like_peft(tmp_path, method):
    """RoBERTa's embeddings number real tokens from padding_idx + 1: the position ids the prompt hook derives from
    the attention mask must start there too (they started at 0: logits off by up to 0.024 against peft)."""
    ours = _classifier("roberta")
    _prompt_callback(method).inject(ours)
    randomize(getattr(ours, method), scale=0.2)
    check_peft_round_trip(tmp_path, ours, lambda: _classifier("roberta"), _batch())


def test_prefix_adapter_on_a_classifier_carries_its_head(tmp_path):
    ours = _classifier("bert")
    _prompt_callback("prefix_tuning").inject(ours)
    randomize(ours.prefix_tuning, scale=0.2)
    heads = iter(range(20, 30))
    check_peft_round_trip(tmp_path, ours, lambda: _classifier("bert", head_seed=next(heads)), _batch())
    assert _keys(tmp_path / "ours") == {"prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"}


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_prompt_adapter_saved_by_peft_loads_here_with_its_head(tmp_path, arch):
    theirs = peft.get_peft_model(_classifier(arch), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)).eval()
    _perturb(theirs, ("prompt_encoder", "modules_to_save"))
    theirs.save_pretrained(tmp_path / "p")
    ours = load_adapter(_classifier(arch, head_seed=11), tmp_path / "p", is_trainable=True)
    batch = _batch()
    torch.testing.assert_close(_logits(ours, batch), _logits(theirs, batch), atol=1e-5, rtol=0)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {"prompt_tuning.prompt_embeddings", *HEAD_KEYS[arch]}


# -- task_type, base path, no warnings ------------------------------------------------------------------
def _bert(kind):
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, kind)(_config("bert")).eval()


@pytest.mark.parametrize(
    ("make", "task"),
    [
        (tiny_llama, "CAUSAL_LM"),
        (lambda: _bert("BertForSequenceClassification"), "SEQ_CLS"),
        (lambda: _bert("BertForTokenClassification"), "TOKEN_CLS"),
        (lambda: _bert("BertModel"), None),  # peft's plain PeftModel
    ],
    ids=["causal-lm", "seq-cls", "token-cls", "backbone"],
)
def test_task_type_follows_the_model_class(tmp_path, make, task):
    model = make()
    LoRA(r=2, target_modules=["q_proj"] if task == "CAUSAL_LM" else ["query"]).inject(model)
    save_adapter(model, tmp_path / "a")
    assert _config_of(tmp_path / "a")["task_type"] == task
    assert peft.PeftConfig.from_pretrained(tmp_path / "a").task_type == task


def test_auto_peft_model_loads_a_causal_lm_adapter_from_its_recorded_base(tmp_path):
    from transformers import LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]).inject(ours)
    _randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter")
    config = _config_of(tmp_path / "adapter")
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(tmp_path / "base")
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert type(theirs).__name__ == "PeftModelForCausalLM"
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_auto_peft_model_loads_a_classifier_adapter_from_its_recorded_base(tmp_path):
    from transformers import AutoModelForSequenceClassification

    _classifier("roberta").save_pretrained(tmp_path / "base")
    ours = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    LoRA(r=4, alpha=8, target_modules=["query", "value"], trainable_modules=["classifier"]).inject(ours)
    _randomize_lora(ours)
    randomize(ours.classifier, seed=7)
    save_adapter(ours, tmp_path / "adapter")
    theirs = peft.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(theirs, _batch()), _logits(ours, _batch()), atol=1e-5, rtol=0)


def _with_lora(model, targets):
    LoRA(r=4, alpha=8, target_modules=targets, trainable_modules=["classifier"] if hasattr(model, "classifier") else None).inject(model)
    return model


@pytest.mark.parametrize(
    ("make", "fresh"),
    [
        (lambda: _with_lora(tiny_llama(), ["q_proj", "v_proj"]), tiny_llama),
        (lambda: _with_lora(_classifier("distilbert"), ["q_lin"]), lambda: _classifier("distilbert")),
        (lambda: _prompt_callback("prompt_tuning").inject(_classifier("roberta")), lambda: _classifier("roberta")),
        (lambda: _prompt_callback("p_tuning").inject(tiny_llama()), tiny_llama),
        (lambda: _prompt_callback("prefix_tuning").inject(tiny_llama()), tiny_llama),
        (lambda: IA3().inject(tiny_llama()), tiny_llama),
        (lambda: AdaLoRA(init_r=4, target_r=2, total_steps=10, target_modules=["q_proj"]).inject(tiny_llama()), tiny_llama),
        (lambda: LlamaAdapter(adapter_len=2).inject(tiny_llama()), tiny_llama),
    ],
    ids=["lora-llama", "lora-distilbert", "prompt-tuning-roberta", "p-tuning-llama", "prefix-tuning-llama", "ia3", "adalora", "llama-adapter"],
)
def test_peft_reads_our_config_without_a_newer_version_warning(tmp_path, make, fresh):
    """No field peft does not know (it warns that the file was saved by a newer peft); our provenance is in the
    safetensors header instead, beside the base fingerprint."""
    save_adapter(make(), tmp_path / "a")
    _, caught = _peft_load(fresh(), tmp_path / "a")
    assert not [m for m in caught if "Unexpected keyword arguments" in m or "higher version" in m], caught
    assert "library" not in _config_of(tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["lightning_peft"].startswith("lightning-peft ") and "lightning_peft_base" in meta


# -- bad heads and several adapters: checked before the model changes -------------------------------------
def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_a_head_of_the_wrong_shape_names_the_module_and_leaves_the_model_unchanged(tmp_path):
    ours = _with_lora(_classifier("roberta"), ["query", "value"])
    save_adapter(ours, tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.classifier.out_proj.weight"] = torch.zeros(5, 32)
    save_file(tensors, str(path))
    model = _classifier("roberta")
    before = _snapshot(model)
    with pytest.raises(AdapterFileError, match=r"module classifier \(out_proj\.weight\): the model has shape \[3, 32\], the adapter file \[5, 32\]"):
        load_adapter(model, tmp_path / "a", check_base=False)
    assert _unchanged(model, before)


def test_a_second_classifier_adapter_shares_an_equal_head_and_keeps_its_own_otherwise(tmp_path):
    """Every classifier adapter carries the head: another named adapter whose head equals the model's (loaded frozen)
    shares it; one with another head gets its own copy (#27), and each adapter then runs with its own head."""
    for name, seed in (("a", 3), ("b", 4)):
        m = _classifier("bert")
        LoRA(r=4, target_modules=["query", "value"]).inject(m)
        _randomize_lora(m, seed=seed)
        save_adapter(m, tmp_path / name)
    model = load_adapter(_classifier("bert"), tmp_path / "a")
    load_adapter(model, tmp_path / "b", adapter_name="b")
    assert model.bert.encoder.layer[0].attention.self.query.adapter_names() == ["default", "b"]
    assert type(model.classifier) is nn.Linear  # the same head: shared, not copied
    tensors = load_file(tmp_path / "b" / "adapter_model.safetensors")
    tensors["base_model.model.classifier.bias"] = tensors["base_model.model.classifier.bias"] + 1
    save_file(tensors, str(tmp_path / "b" / "adapter_model.safetensors"))
    model = load_adapter(_classifier("bert"), tmp_path / "a")
    x = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        only_a = model(x).logits
    load_adapter(model, tmp_path / "b", adapter_name="c")
    assert sorted(model.classifier.adapter_names()) == ["c", "default"]
    torch.testing.assert_close(model.classifier.modules_to_save["c"].bias, tensors["base_model.model.classifier.bias"])
    alone_c = load_adapter(_classifier("bert"), tmp_path / "b")
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, only_a, atol=0, rtol=0)  # 'c' loaded inactive: 'default' and its head
        set_active_adapters(model, "c")
        torch.testing.assert_close(model(x).logits, alone_c(x).logits, atol=1e-6, rtol=0)


def test_ia3_classifier_round_trips_with_its_head(tmp_path):
    ours = IA3(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]).inject(_classifier("bert"))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "ia3_" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    save_adapter(ours, tmp_path / "ours")
    assert _config_of(tmp_path / "ours")["task_type"] == "SEQ_CLS"
    theirs, _ = _peft_load(_classifier("bert", head_seed=11), tmp_path / "ours")
    torch.testing.assert_close(_logits(theirs, _batch()), _logits(ours, _batch()), atol=1e-5, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    back = load_adapter(_classifier("bert", head_seed=12), tmp_path / "theirs")
    torch.testing.assert_close(_logits(back, _batch()), _logits(ours, _batch()), atol=1e-5, rtol=0)


def test_an_adapted_head_is_written_as_a_plain_adapter(tmp_path):
    """LoRA inside RoBERTa's head (``dense`` also names ``classifier.dense``): PEFT's SEQ_CLS models would replace the
    whole head and adapt nothing in it, so the file is a plain (task-less) LoRA adapter, which peft loads as it is."""
    ours = _classifier("roberta")
    LoRA(r=4, alpha=8, target_modules=["query", "value", "dense"]).inject(ours)
    _randomize_lora(ours)
    save_adapter(ours, tmp_path / "a")
    config = _config_of(tmp_path / "a")
    assert config["task_type"] is None and config["modules_to_save"] is None and "classifier.dense" in config["target_modules"]
    theirs, _ = _peft_load(_classifier("roberta"), tmp_path / "a")
    torch.testing.assert_close(_logits(theirs, _batch()), _logits(ours, _batch()), atol=1e-5, rtol=0)
    back = load_adapter(_classifier("roberta"), tmp_path / "a")
    torch.testing.assert_close(_logits(back, _batch()), _logits(ours, _batch()), atol=1e-5, rtol=0)


def test_a_module_both_trained_whole_and_adapted_is_refused_with_the_fix(tmp_path):
    ours = _classifier("roberta")
    LoRA(r=4, target_modules=["query", "value", "dense"], trainable_modules=["classifier"]).inject(ours)
    with pytest.raises(NotImplementedError, match=r"Modules \['classifier\.dense'\] are trained in full \(trainable_modules\) and also carry adapter "
                                                  r"layers.*Leave them out of trainable_modules or out of the adapter's target_modules"):
        save_adapter(ours, tmp_path / "a")


@pytest.mark.parametrize("kept", [(), ("pre_classifier.weight",)], ids=["none", "weight-only"])
def test_a_head_matched_only_by_the_old_suffix_rule_may_be_absent_but_not_partial(tmp_path, kept):
    """modules_to_save=["classifier"] on DistilBERT: PEFT <= 0.21 stored pre_classifier too (suffix match), PEFT 0.22
    does not (dot match). Both files load; one holding part of pre_classifier is refused, naming what is missing."""
    from safetensors.torch import load_file as load_tensors

    ours = _classifier("distilbert")
    LoRA(r=4, alpha=8, target_modules=LORA_TARGETS["distilbert"], trainable_modules=["classifier"]).inject(ours)
    _randomize_lora(ours)
    randomize(ours.classifier, seed=7)
    save_adapter(ours, tmp_path / "a")
    tensors = load_tensors(tmp_path / "a" / "adapter_model.safetensors")
    assert {"base_model.model.pre_classifier.weight", "base_model.model.pre_classifier.bias"} <= set(tensors)
    save_file({k: v for k, v in tensors.items() if "pre_classifier" not in k or any(k.endswith(x) for x in kept)},
              tmp_path / "a" / "adapter_model.safetensors")
    config = _config_of(tmp_path / "a")
    config.update(task_type=None, modules_to_save=["classifier"])  # what PEFT 0.22 writes for an explicit list
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    fresh = _classifier("distilbert", head_seed=11, head_keys=["classifier.weight", "classifier.bias"])
    if kept:
        with pytest.raises(AdapterFileError, match=r"lacks 1 of their tensors \(pre_classifier.bias\)"):
            load_adapter(fresh, tmp_path / "a", check_base=False)
        return
    before = fresh.pre_classifier.weight.detach().clone()
    load_adapter(fresh, tmp_path / "a", check_base=False)
    assert torch.equal(fresh.pre_classifier.weight, before)  # not in the file: the model's own, as PEFT 0.22 leaves it
    torch.testing.assert_close(fresh.classifier.weight, ours.classifier.weight, rtol=0, atol=0)
