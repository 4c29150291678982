import json

import pytest
import torch
from torch import nn

from lightning_peft.callbacks.ia3 import IA3
from lightning_peft.core import count_parameters, disable_adapters, merge_adapters, unmerge_adapters
from lightning_peft.methods.ia3 import IA3Linear, default_ia3_targets, from_peft, inject_ia3, to_peft
from tests.methods.sst2_helpers import DECODERS, minilm_classifier, sst2_batch, tiny_decoder, train_losses


def _randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ia3_l"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("feedforward", [False, True])
def test_forward_matches_the_formula(feedforward):
    torch.manual_seed(0)
    base = nn.Linear(6, 4).double()
    layer = IA3Linear(base, feedforward=feedforward).double()
    _randomize(layer)
    x = torch.randn(5, 6, dtype=torch.float64)
    l = layer.ia3_l
    ref = base(x * l) if feedforward else base(x) * l
    torch.testing.assert_close(layer(x), ref)
    assert l.shape == ((6,) if feedforward else (4,))


@pytest.mark.parametrize("feedforward", [False, True])
def test_conv1d_matches_linear(feedforward):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(4, 6)  # in 6, out 4; weight (6, 4)
    lin = nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    a, b = IA3Linear(conv, feedforward), IA3Linear(lin, feedforward)
    _randomize(a), _randomize(b)
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(a(x), b(x))
    a.merge(), b.merge()
    torch.testing.assert_close(a(x), b(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("conv", [False, True])
def test_merge_unmerge_exact_and_idempotent(feedforward, conv):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(4, 6) if conv else nn.Linear(6, 4)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = IA3Linear(base, feedforward)
    _randomize(layer)
    x = torch.randn(3, 6)
    y = layer(x)
    layer.merge()
    layer.merge()
    assert layer.merged and not torch.allclose(base.weight, w0)
    torch.testing.assert_close(layer(x), y, atol=1e-6, rtol=1e-5)
    with disable_adapters(layer):  # the base alone, even while merged
        torch.testing.assert_close(layer(x), (x @ w0 if conv else x @ w0.T) + b0, atol=1e-6, rtol=1e-5)
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(base.weight.detach(), w0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(base.bias.detach(), b0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer(x), y, atol=1e-6, rtol=1e-6)


def test_merge_refuses_zero_or_nan_and_leaves_weight_unchanged():
    layer = IA3Linear(nn.Linear(4, 4))
    w0 = layer.weight.detach().clone()
    for bad in (0.0, float("nan")):
        with torch.no_grad():
            layer.ia3_l[1] = bad
        with pytest.raises(ValueError, match=r"NaN/inf.*a scale is 0.*left unchanged"):
            layer.merge()
        assert not layer.merged
        torch.testing.assert_close(layer.weight.detach(), w0)


@pytest.mark.parametrize("family", DECODERS)
def test_defaults_identity_at_init_and_grads_only_on_vectors(family):
    model = tiny_decoder(family)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    IA3().inject(model)
    assert any(isinstance(m, IA3Linear) for m in model.modules())
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    model(ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(n.endswith("ia3_l") for n in with_grad)
    counts = count_parameters(model)
    assert counts.trainable == counts.added > 0 and counts.changed == 0


def _names(model, cls):
    return sorted(n.replace("base_model.model.", "") for n, m in model.named_modules() if type(m) is cls)


def _copy_into_peft(ours, theirs):
    params = dict(ours.named_parameters())
    n = 0
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".ia3_l.default" in name:
                key = name.replace("base_model.model.", "").replace(".ia3_l.default", ".ia3_l")
                p.copy_(params[key].view(p.shape))
                n += 1
    return n


@pytest.mark.parametrize("family", DECODERS)
def test_equivalent_to_hf_peft_defaults_on_decoders(family):
    peft = pytest.importorskip("peft")
    from peft.tuners.ia3.layer import Linear as PeftIA3

    ours = tiny_decoder(family)
    IA3().inject(ours)
    _randomize(ours)
    theirs = peft.get_peft_model(tiny_decoder(family), peft.IA3Config(task_type="CAUSAL_LM"))
    assert _names(ours, IA3Linear) == _names(theirs, PeftIA3)
    ff_ours = sorted(n for n, m in ours.named_modules() if isinstance(m, IA3Linear) and m.feedforward)
    ff_theirs = sorted(n.replace("base_model.model.", "") for n, m in theirs.named_modules() if type(m) is PeftIA3 and m.is_feedforward)
    assert ff_ours == ff_theirs and ff_ours
    assert _copy_into_peft(ours, theirs) == len(_names(ours, IA3Linear))
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)


def test_equivalent_to_hf_peft_defaults_on_minilm(minilm_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModel

    ours = AutoModel.from_pretrained(minilm_path).eval()
    names = inject_ia3(ours)
    assert len(names) == 24  # key, value, attention.output.dense, output.dense in 6 layers (PEFT's suffix rule)
    _randomize(ours)
    theirs = peft.get_peft_model(AutoModel.from_pretrained(minilm_path).eval(), peft.IA3Config())
    assert _copy_into_peft(ours, theirs) == 24
    ids = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(input_ids=ids).last_hidden_state, theirs(input_ids=ids).last_hidden_state, atol=1e-5, rtol=0)


def test_merge_and_disable_on_a_model():
    model = tiny_decoder("llama")
    ids = torch.randint(0, 128, (2, 10))
    base_logits = model(ids).logits
    IA3().inject(model)
    _randomize(model)
    adapted = model(ids).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    merge_adapters(model)
    torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-5)
    with disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, base_logits, atol=1e-5, rtol=1e-5)
    unmerge_adapters(model)
    torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-5)
    with disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, base_logits, atol=1e-5, rtol=1e-5)


def _write_peft_dir(path, config, tensors):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_to_peft_loads_in_hf_peft(tmp_path, family):
    peft = pytest.importorskip("peft")
    ours = tiny_decoder(family)
    IA3().inject(ours)
    _randomize(ours)
    config, tensors = to_peft(ours)
    assert config["peft_type"] == "IA3" and all(k.startswith("base_model.model.") and k.endswith(".ia3_l") for k in tensors)
    _write_peft_dir(tmp_path, config, tensors)
    theirs = peft.PeftModel.from_pretrained(tiny_decoder(family), tmp_path).eval()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_from_peft_loads_what_hf_peft_saved(tmp_path, family):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    theirs = peft.get_peft_model(tiny_decoder(family), peft.IA3Config(task_type="CAUSAL_LM"))
    _randomize(theirs)
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    ours = tiny_decoder(family)
    names = from_peft(ours, config, load_file(str(tmp_path / "adapter_model.safetensors")))
    assert len(names) == len(_names(theirs, peft.tuners.ia3.layer.Linear))
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    theirs.eval()
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)


def test_from_peft_with_modules_to_save_on_minilm(tmp_path, minilm_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    theirs = peft.get_peft_model(minilm_classifier(minilm_path, seed=1), peft.IA3Config(task_type="SEQ_CLS"))
    _randomize(theirs)
    theirs.save_pretrained(tmp_path)
    ours = minilm_classifier(minilm_path, seed=2)  # another random head: it must come from the file
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    from_peft(ours, config, load_file(str(tmp_path / "adapter_model.safetensors")))
    ids = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    theirs.eval()
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_from_peft_refuses_tensors_of_another_model_and_leaves_it_unchanged():
    src = tiny_decoder("llama")
    IA3().inject(src)
    config, tensors = to_peft(src)
    other = tiny_decoder("llama")
    tensors = dict(tensors)
    tensors.pop(next(iter(tensors)))
    with pytest.raises(ValueError, match=r"do not fit LlamaForCausalLM: missing \['model\.layers\.0\..*ia3_l'"):
        from_peft(other, config, tensors)
    assert not any(isinstance(m, IA3Linear) for m in other.modules())
    with pytest.raises(ValueError, match="peft_type='LORA'"):
        from_peft(other, {**config, "peft_type": "LORA"}, tensors)


def test_learning_on_sst2_with_minilm(minilm_path, shared_data):
    torch.manual_seed(0)
    model = minilm_classifier(minilm_path)
    batch = sst2_batch(minilm_path, shared_data)
    IA3().inject(model)  # the vectors only: the random classifier head stays frozen
    assert all(n.endswith("ia3_l") for n, p in model.named_parameters() if p.requires_grad)
    losses = train_losses(model, batch, steps=20, lr=5e-2)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses


def test_no_known_family_names_what_it_looked_for():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"no default targets for Sequential.*looked for the model types \[.*'bert'.*modules named \[.*attention\.self\.key"):
        IA3().inject(model)
    assert not any(isinstance(m, IA3Linear) for m in model.modules())
    tgt, ff = default_ia3_targets(tiny_decoder("llama"))
    assert tgt == ["k_proj", "v_proj", "down_proj"] and ff == ["down_proj"]


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"feedforward_modules": ["down_proj"]}, ValueError, r"feedforward_modules=\['down_proj'\] was given without target_modules"),
        ({"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}, ValueError, r"feedforward_modules \['down_proj'\] are not in target_modules"),
        ({"target_modules": 3}, TypeError, "target_modules must be a string or a list"),
        ({"feedforward_modules": 3, "target_modules": ["x"]}, TypeError, "feedforward_modules must be a string or a list"),
    ],
)
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        IA3(**kwargs)


def test_explicit_target_that_matches_nothing_lists_candidates():
    model = tiny_decoder("llama")
    with pytest.raises(ValueError, match=r"matched no module.*Candidate module names: \[.*k_proj"):
        IA3(target_modules=["key"]).inject(model)
    with pytest.raises(TypeError, match="unsupported type"):
        IA3(target_modules=["self_attn"]).inject(tiny_decoder("llama"))


# -- the defaults are PEFT's table, looked up by PEFT's key -----------------------------------------
_DEC = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
_ENC = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
_GPT = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
# model_type -> (config class, model class, config kwargs, PEFT task_type); tiny random models, built offline
_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _DEC, "CAUSAL_LM"),
    "mistral": ("MistralConfig", "MistralForCausalLM", _DEC, "CAUSAL_LM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_DEC, num_local_experts=2, num_experts_per_tok=1), "CAUSAL_LM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _DEC, "CAUSAL_LM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_DEC, head_dim=8), "CAUSAL_LM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_DEC, head_dim=8), "CAUSAL_LM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_DEC, head_dim=8), "CAUSAL_LM"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_DEC, head_dim=8), "CAUSAL_LM"),
    "phi": ("PhiConfig", "PhiForCausalLM", _ENC, "CAUSAL_LM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", _GPT, "CAUSAL_LM"),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", _GPT, "CAUSAL_LM"),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(_GPT, rotary_dim=4), "CAUSAL_LM"),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", dict(hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], vocab_size=128, max_position_embeddings=64), "CAUSAL_LM"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", _ENC, "CAUSAL_LM"),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=128), "CAUSAL_LM"),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=128), "CAUSAL_LM"),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, word_embed_proj_dim=32), "CAUSAL_LM"),
    "bert": ("BertConfig", "BertModel", _ENC, "FEATURE_EXTRACTION"),
    "roberta": ("RobertaConfig", "RobertaModel", _ENC, "FEATURE_EXTRACTION"),
    "deberta": ("DebertaConfig", "DebertaModel", _ENC, "FEATURE_EXTRACTION"),
    "deberta-v2": ("DebertaV2Config", "DebertaV2Model", _ENC, "FEATURE_EXTRACTION"),
    "bart": ("BartConfig", "BartForConditionalGeneration", dict(d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=1, decoder_layers=1,
                                                                encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=128), None),  # no task: peft < 0.21.2 cannot wrap seq2seq models of transformers 5.23; same targets
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=4, vocab_size=128), None),  # no task: peft < 0.21.2 cannot wrap seq2seq models of transformers 5.23; same targets
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", dict(d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=4, vocab_size=128), None),  # no task: peft < 0.21.2 cannot wrap seq2seq models of transformers 5.23; same targets
}


def _build(model_type):
    import transformers

    config_cls, model_cls, kwargs, _ = _ARCHS[model_type]
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()


def _peft_sets(model):
    from peft.tuners.ia3.layer import Linear as PeftIA3

    layers = [(n.replace("base_model.model.", ""), m) for n, m in model.named_modules() if type(m) is PeftIA3]
    return sorted(n for n, _ in layers), sorted(n for n, m in layers if m.is_feedforward)


def _our_sets(model):
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Linear)]
    return sorted(n for n, _ in layers), sorted(n for n, m in layers if m.feedforward)


def test_defaults_table_is_peft_table():
    constants = pytest.importorskip("peft.utils.constants")
    targets, ff = constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING, constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
    from lightning_peft.methods.ia3 import IA3_DEFAULTS

    assert sorted(IA3_DEFAULTS) == sorted(targets)
    for model_type, (ours_t, ours_ff) in IA3_DEFAULTS.items():
        assert (ours_t, ours_ff) == (list(targets[model_type]), list(ff[model_type])), model_type


@pytest.mark.parametrize("model_type", sorted(_ARCHS))
def test_defaults_adapt_what_peft_defaults_adapt(model_type):
    peft = pytest.importorskip("peft")
    from lightning_peft.methods.ia3 import _model_type

    ours = _build(model_type)
    assert _model_type(ours) == ours.config.model_type == model_type  # the key PEFT looks up
    IA3().inject(ours)
    theirs = peft.get_peft_model(_build(model_type), peft.IA3Config(task_type=_ARCHS[model_type][3]))
    names, ff = _our_sets(ours)
    assert names and (names, ff) == _peft_sets(theirs)


def test_defaults_refuse_model_types_peft_has_no_entry_for():
    peft = pytest.importorskip("peft")
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Phi3Config, Phi3ForCausalLM

    phi3 = lambda: Phi3ForCausalLM(Phi3Config(**_DEC, pad_token_id=0, bos_token_id=0, eos_token_id=0))  # noqa: E731
    text = dict(_DEC, head_dim=8)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8)
    # multimodal Gemma 3: PEFT reads the outer "gemma3", not the nested "gemma3_text" (k_proj/v_proj also sit in the vision tower)
    gemma3 = lambda: Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))  # noqa: E731
    for build, model_type, hint in ((phi3, "phi3", ""), (gemma3, "gemma3", r".*language model \(model_type='gemma3_text'\)")):
        with pytest.raises(ValueError, match="Please specify `target_modules`"):
            peft.get_peft_model(build(), peft.IA3Config(task_type="CAUSAL_LM"))
        model = build()
        before = {n: type(m) for n, m in model.named_modules()}
        with pytest.raises(ValueError, match=rf"no default targets for \w+ \(model_type='{model_type}'\).*no entry for it{hint}"):
            IA3().inject(model)
        assert {n: type(m) for n, m in model.named_modules()} == before
