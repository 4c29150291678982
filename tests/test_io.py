"""Adapter files in Hugging Face PEFT's format, both ways, with the real ``peft`` package as the oracle; safe loading."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_peft import IA3, AdapterFileError, LlamaAdapter, LoRA, load_adapter, save_adapter
from lightning_peft.core import adapter_param_names
from lightning_peft.methods.lora import LoRALinear
from tests.conftest import tiny_llama

peft = pytest.importorskip("peft")


def _randomize(model, seed=3, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _ids(vocab=128, shape=(2, 10)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))


def _snapshot(model):
    return [(n, type(m).__name__) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    (mods_a, sd_a), (mods_b, sd_b) = a, b
    return mods_a == mods_b and sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


LORA_SETTINGS = [
    pytest.param(dict(r=4, alpha=8, target_modules="all-linear"), id="all-linear"),
    pytest.param(dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True), id="rslora"),
    pytest.param(
        dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"down_proj": 3.0}),
        id="rank-alpha-patterns",
    ),
]


@pytest.mark.parametrize("settings", LORA_SETTINGS)
def test_saved_here_loads_in_peft_with_the_same_logits(tmp_path, settings):
    ours = tiny_llama()
    LoRA(**settings).inject(ours)
    _randomize(ours)
    save_adapter(ours, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    n_lora = sum(1 for n, _ in theirs.named_parameters() if ".lora_A." in n)
    assert n_lora == sum(isinstance(m, LoRALinear) for m in ours.modules())
    torch.testing.assert_close(theirs(_ids()).logits, ours(_ids()).logits, atol=1e-5, rtol=0)
    if "rank_pattern" in settings:
        assert config["rank_pattern"] and config["alpha_pattern"]
        q1 = theirs.base_model.model.model.layers[1].self_attn.q_proj
        assert q1.r["default"] == 6 and ours.model.layers[1].self_attn.q_proj.r == 6


@pytest.mark.parametrize("settings", LORA_SETTINGS)
def test_saved_by_peft_loads_here_with_the_same_logits(tmp_path, settings):
    settings = dict(settings)
    cfg = peft.LoraConfig(
        r=settings.pop("r"), lora_alpha=settings.pop("alpha"), target_modules=settings.pop("target_modules"),
        use_rslora=settings.pop("use_rslora", False), rank_pattern=settings.pop("rank_pattern", {}), alpha_pattern=settings.pop("alpha_pattern", {}),
    )
    theirs = peft.get_peft_model(tiny_llama(), cfg).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(tmp_path / "p")
    ours = load_adapter(tiny_llama(), tmp_path / "p")
    torch.testing.assert_close(ours(_ids()).logits, theirs(_ids()).logits, atol=1e-5, rtol=0)
    # loaded for inference: frozen unless asked
    assert not any(p.requires_grad for p in ours.parameters())
    trainable = load_adapter(tiny_llama(), tmp_path / "p", is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == set(adapter_param_names(trainable))


def test_sequence_classifier_with_trained_head_round_trips_both_ways(tmp_path, minilm_path):
    from transformers import AutoModelForSequenceClassification

    def fresh():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()

    ids = torch.randint(1000, 5000, (3, 12), generator=torch.Generator().manual_seed(0))
    # ours -> peft
    ours = fresh()
    LoRA(r=4, alpha=8, target_modules=["query", "value"], trainable_modules=["classifier"]).inject(ours)
    _randomize(ours)
    with torch.no_grad():
        ours.classifier.weight.add_(1.0)
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(fresh(), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5, rtol=0)
    # peft -> ours
    theirs = peft.get_peft_model(fresh(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])).eval()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(0.05)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = load_adapter(fresh(), tmp_path / "theirs")
    torch.testing.assert_close(loaded(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_load_into_a_lightning_module_then_train_and_checkpoint(tmp_path):
    import lightning as L

    from tests.callbacks.helpers import TinyLM

    src = tiny_llama()
    LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]).inject(src)
    _randomize(src)
    save_adapter(src, tmp_path / "a")
    module = TinyLM()
    load_adapter(module, tmp_path / "a", is_trainable=True)
    torch.testing.assert_close(module(_ids()), src(_ids()).logits, atol=1e-6, rtol=0)
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False, default_root_dir=tmp_path).fit(module)
    assert not torch.allclose(module(_ids()), src(_ids()).logits, atol=1e-6)  # it trained
    save_adapter(module, tmp_path / "b")  # and exports again from the LightningModule
    assert set(load_file(tmp_path / "b" / "adapter_model.safetensors")) == set(load_file(tmp_path / "a" / "adapter_model.safetensors"))


# -- bad files: each gives a clear error and leaves the model unchanged -------------------------------
@pytest.fixture
def adapter_dir(tmp_path):
    model = tiny_llama()
    LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]).inject(model)
    _randomize(model)
    return save_adapter(model, tmp_path / "good")


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "edit, message",
    [
        (dict(peft_type="VERA"), r"peft_type 'VERA' is not supported by lightning-peft; supported: \[.*'LORA'"),
        (dict(peft_type=...), r"has no 'peft_type' field"),
        (dict(r=...), r"the LORA config is missing the required field 'r'"),
        (dict(r="4"), r"field 'r' must be int, found str '4'"),
        (dict(target_modules=7), r"field 'target_modules' must be str or list, found int 7"),
        (dict(use_dora=True), r"missing base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_magnitude_vector .*expected shape \[32\]"),
        (dict(r=8), r"module model\.layers\.0\.self_attn\.q_proj \(lora_A\): expected shape \[8, 32\], found \[4, 32\]"),
        (dict(target_modules=["q_proj"]), r"unexpected tensor base_model\.model\.model\.layers\.0\.self_attn\.v_proj\.lora_A\.weight"),
    ],
)
def test_bad_config_is_a_clear_error_and_leaves_the_model_unchanged(adapter_dir, edit, message):
    _edit_config(adapter_dir, **edit)
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises((AdapterFileError, NotImplementedError), match=message):
        load_adapter(model, adapter_dir, check_integrity=False)  # the config was edited on purpose: reach the checks behind
    assert _same(_snapshot(model), before)
    if any(m in message for m in ("lora_magnitude_vector", "expected shape", "unexpected tensor")):  # a valid config, edited
        with pytest.raises(AdapterFileError, match="is not the config that was saved with"):
            load_adapter(model, adapter_dir)
        assert _same(_snapshot(model), before)


def test_invalid_json_is_a_clear_error(adapter_dir):
    (adapter_dir / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json is not valid JSON"):
        load_adapter(tiny_llama(), adapter_dir)


def test_truncated_safetensors_is_refused_and_nothing_is_loaded(adapter_dir):
    path = adapter_dir / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(AdapterFileError, match=r"not a valid safetensors file \(truncated or corrupted\?\).*Nothing was loaded"):
        load_adapter(model, adapter_dir)
    assert _same(_snapshot(model), before)


def test_pickled_bin_is_refused_unless_opted_in(adapter_dir):
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    (adapter_dir / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter_dir / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match=r"adapter_model\.bin, a pickle file.*refused by default.*allow_pickle=True"):
        load_adapter(tiny_llama(), adapter_dir)
    model = load_adapter(tiny_llama(), adapter_dir, allow_pickle=True)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.lora_a["default"], tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])


def test_other_base_model_is_refused_unless_overridden(adapter_dir):
    n_saved, n_here = (sum(p.numel() for p in tiny_llama(vocab_size=v).parameters()) for v in (128, 160))
    with pytest.raises(AdapterFileError, match=rf"(?s)trained on a different base model:\n  parameter names or shapes differ elsewhere \({n_saved:,} parameters in the adapter's base, {n_here:,} here\).*check_base=False"):
        load_adapter(tiny_llama(vocab_size=160), adapter_dir)
    load_adapter(tiny_llama(vocab_size=160), adapter_dir, check_base=False)  # same adapted shapes: loads when asked
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128))
    with pytest.raises(AdapterFileError, match=r"architecture: adapter made for LlamaForCausalLM, this model is GPT2LMHeadModel"):
        load_adapter(gpt2, adapter_dir)


def test_module_shape_difference_names_the_module(adapter_dir):
    other = tiny_llama(hidden=48)
    with pytest.raises(AdapterFileError, match=r"module model\.layers\.0\.self_attn\.q_proj: weight \[32, 32\] in the adapter's base, \[48, 48\] here"):
        load_adapter(other, adapter_dir)


def test_unknown_tensor_prefix_is_refused(adapter_dir):
    path = adapter_dir / "adapter_model.safetensors"
    save_file({"lora_A.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(AdapterFileError, match=r"tensor 'lora_A\.weight' does not start with 'base_model\.model\.'"):
        load_adapter(tiny_llama(), adapter_dir)


def test_ia3_round_trips_through_save_and_load_adapter(tmp_path):
    from lightning_peft.callbacks.ia3 import IA3

    ours = tiny_llama()
    IA3().inject(ours)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "ia3_" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["peft_type"] == "IA3"
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(_ids()).logits, ours(_ids()).logits, atol=1e-5, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = load_adapter(tiny_llama(), tmp_path / "theirs")
    torch.testing.assert_close(loaded(_ids()).logits, theirs(_ids()).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("make", "holds"),
    [
        (IA3, r"\(IA\)3 layers hold one adapter each"),
        (lambda: LlamaAdapter(adapter_len=2), "LLaMA-Adapter layers hold one adaption prompt each"),
    ],
)
def test_one_adapter_formats_refuse_other_names(tmp_path, make, holds):
    model = make().inject(tiny_llama(seed=0))
    save_adapter(model, tmp_path / "a")
    fresh = tiny_llama(seed=0)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(NotImplementedError, match=holds + r": load it as 'default', not 'other'"):
        load_adapter(fresh, tmp_path / "a", adapter_name="other")
    assert fresh.state_dict().keys() == before.keys()  # nothing was injected
