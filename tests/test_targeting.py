import functools

import pytest
import torch
from torch import nn

from lightning_peft.targeting import find_targets
from tests.conftest import tiny_llama


def test_exact_suffix_regex_and_exclude():
    model = tiny_llama()
    assert find_targets(model, ["model.layers.0.self_attn.q_proj"]) == ["model.layers.0.self_attn.q_proj"]
    assert find_targets(model, ["q_proj"]) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert find_targets(model, ["self_attn.q_proj"]) == find_targets(model, ["q_proj"])
    assert find_targets(model, r".*layers\.1\.self_attn\.(q|k)_proj") == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    # a regex must match the whole name
    with pytest.raises(ValueError, match="matched no module"):
        find_targets(model, r"q_proj")
    assert find_targets(model, ["q_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]) == ["model.layers.1.self_attn.q_proj"]
    # a suffix must end at a dot: "proj" is not a suffix of "q_proj"
    with pytest.raises(ValueError, match="matched no module"):
        find_targets(model, ["proj"])


def test_all_linear_excludes_output_heads():
    model = tiny_llama()
    names = find_targets(model, "all-linear")
    assert "lm_head" not in names and len(names) == 2 * 7
    from transformers import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50))
    names = find_targets(bert, "all-linear")
    assert "classifier" not in names and "bert.pooler.dense" in names and len(names) == 7


def test_all_linear_inside_a_wrapper_module():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = tiny_llama()

    assert "model.lm_head" not in find_targets(Wrapper(), "all-linear")


def test_gpt2_conv1d_is_linear():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=32))
    names = find_targets(gpt2, "all-linear")
    assert "transformer.h.0.attn.c_attn" in names and "lm_head" not in names


def test_bad_regex_and_empty_list():
    model = tiny_llama()
    with pytest.raises(ValueError, match="not a valid regular expression"):
        find_targets(model, "q_proj(")
    with pytest.raises(ValueError, match="target_modules is empty"):
        find_targets(model, [])


def test_candidates_are_capped_at_20():
    model = nn.ModuleDict({f"layer_{i}": nn.Linear(2, 2) for i in range(30)})
    with pytest.raises(ValueError, match=r"Candidate module names: \[(layer_\d+, ){19}layer_\d+, \.\.\.\]"):
        find_targets(model, ["nope"])


# -- linear subclasses with their own forward ---------------------------------------------------------
class _Scaled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class _Renamed(nn.Linear):  # a subclass that keeps nn.Linear.forward
    pass


class _Block(nn.Module):
    def __init__(self, proj_cls=_Scaled):
        super().__init__()
        self.up = nn.Linear(4, 8)
        self.proj = proj_cls(8, 4)

    def forward(self, x):
        return self.proj(torch.relu(self.up(x)))


def _inject(method, model, targets, **kw):
    if method == "lora":
        from lightning_peft.methods.lora import inject_lora

        return inject_lora(model, targets, **kw)
    if method == "ia3":
        from lightning_peft.methods.ia3 import inject_ia3

        return inject_ia3(model, targets, **kw)
    from lightning_peft.methods.adalora import inject_adalora

    return inject_adalora(model, targets, **kw)


_METHODS = {"lora": "LoRA", "ia3": r"\(IA\)³", "adalora": "AdaLoRA"}


@pytest.mark.parametrize("method", sorted(_METHODS))
@pytest.mark.parametrize("targets", [["proj"], "all-linear"])
def test_linear_subclass_with_own_forward_is_refused_and_model_unchanged(method, targets):
    torch.manual_seed(0)
    model = _Block()
    types = {n: type(m) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fix = r"add them to exclude_modules \(e\.g\. exclude_modules=\['proj'\]\)" if targets == "all-linear" else r"leave them out of target_modules .* exclude_modules"
    with pytest.raises(TypeError, match=rf"The {_METHODS[method]} cannot wrap 1 matched linear layer\(s\) whose class overrides forward: 'proj' \(tests\.test_targeting\._Scaled\)\..*{fix}.*not override forward"):
        _inject(method, model, targets)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert model.state_dict().keys() == state.keys() and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # the suggested fix works: the subclass is left alone, its forward kept
    x = torch.randn(3, 4)
    before = model(x)
    fixed = _inject(method, model, targets, exclude_modules=["proj"]) if targets == "all-linear" else _inject(method, model, ["up"])
    assert fixed == ["up"]
    assert type(model.proj) is _Scaled
    torch.testing.assert_close(model(x), before)


def test_own_forward_check_rules():
    from transformers.pytorch_utils import Conv1D

    from lightning_peft.targeting import overrides_linear_forward

    class ScaledConv1D(Conv1D):
        def forward(self, x):
            return 2 * super().forward(x)

    assert not overrides_linear_forward(nn.Linear(2, 2)) and not overrides_linear_forward(Conv1D(2, 2))
    assert not overrides_linear_forward(_Renamed(2, 2))
    assert not overrides_linear_forward(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2))
    assert not overrides_linear_forward(nn.LayerNorm(2))  # not a linear type: the method's supported types decide
    assert overrides_linear_forward(_Scaled(2, 2)) and overrides_linear_forward(ScaledConv1D(2, 2))
    # a method that calls the module itself (Houlsby on explicit targets: supported=(nn.Module,)) keeps its forward
    assert find_targets(_Block(), ["proj"], supported=(nn.Module,)) == ["proj"]
    assert find_targets(_Block(), "all-linear", recomputes_linear=False) == ["up", "proj"]
    with pytest.raises(TypeError, match="overrides forward"):
        find_targets(_Block(), "all-linear")


@pytest.mark.parametrize("method", sorted(_METHODS))
@pytest.mark.parametrize("proj_cls", [_Renamed, nn.modules.linear.NonDynamicallyQuantizableLinear])
def test_linear_subclass_keeping_linear_forward_is_wrapped(method, proj_cls):
    torch.manual_seed(0)
    model = _Block(proj_cls)
    x = torch.randn(3, 4)
    before = model(x)
    assert _inject(method, model, ["proj"]) == ["proj"]
    assert type(model.proj) is not proj_cls
    torch.testing.assert_close(model(x), before)


def test_falcon_linear_is_wrapped():
    from transformers import FalconConfig, FalconForCausalLM

    from lightning_peft.methods.ia3 import inject_ia3

    model = FalconForCausalLM(FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)).eval()
    assert type(model.transformer.h[0].mlp.dense_4h_to_h).__name__ == "FalconLinear"  # overrides forward: x @ W.T, then + b
    assert len(find_targets(model, "all-linear")) == 4
    ids = torch.randint(0, 64, (2, 5))
    before = model(ids).logits
    assert len(inject_ia3(model, "all-linear")) == 4
    torch.testing.assert_close(model(ids).logits, before)


def test_quantized_linears_are_wrapped():
    pytest.importorskip("bitsandbytes")
    from lightning_peft.methods.lora import LoRALinear, inject_lora
    from lightning_peft.quant import QuantLinear, quantize_weight

    torch.manual_seed(0)
    model = _Block(nn.Linear)
    model.proj = QuantLinear(quantize_weight(torch.randn(4, 64), "nf4"))
    model.up = nn.Linear(4, 64)
    x = torch.randn(3, 4)
    before = model(x)
    assert inject_lora(model, "all-linear") == ["up", "proj"]
    assert isinstance(model.proj, LoRALinear)
    torch.testing.assert_close(model(x), before)
    # bitsandbytes' own layers override forward; accepted once their weight is quantized
    import bitsandbytes as bnb

    layer4, layer8 = bnb.nn.Linear4bit(64, 4, compute_dtype=torch.float32), bnb.nn.Linear8bitLt(64, 4, has_fp16_weights=False)
    layer4.weight, layer8.weight = quantize_weight(torch.randn(4, 64), "nf4"), quantize_weight(torch.randn(4, 64), "int8")
    assert find_targets(nn.ModuleDict({"a": layer4, "b": layer8}), "all-linear") == ["a", "b"]


# -- regular expressions match whole names, as in Hugging Face PEFT (re.fullmatch) -----------------------
#: specs on tiny_llama's names (model.layers.<i>.self_attn.q_proj, ...): whole-name regexes, and regexes that match
#: only a prefix, a suffix or the inside of names (PEFT selects nothing with those), then lists of names / suffixes
_SPECS = [
    r".*\.(q|v)_proj",
    r"model\.layers\.\d+\.mlp\.down_proj|.*o_proj",
    r"model\.layers\.0\.self_attn\.(q|k)",  # a prefix of layer 0's q_proj and k_proj
    r"model\.layers\.1\.mlp\.",  # a prefix of layer 1's MLP projections
    r"(q|v)_proj",  # a suffix only
    r"layers\.1\..*_proj",  # inside only
    ["q_proj", "mlp.up_proj"],
    ["proj"],  # not a dotted suffix
    ["layers.0.self_attn.v_proj", "o"],
]


def _peft_targets(model, spec) -> list[str]:
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(target_modules=spec)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and check_target_module_exists(config, n)]


@pytest.mark.parametrize("spec", _SPECS, ids=str)
def test_target_modules_select_what_peft_selects(spec):
    pytest.importorskip("peft")
    model = tiny_llama()
    try:
        ours = find_targets(model, spec, each_entry=False)
    except ValueError as err:
        assert "matched no module" in str(err)
        ours = []
    assert ours == _peft_targets(model, spec)


def test_regex_matching_only_part_of_names_selects_nothing():
    model = tiny_llama()
    for regex in (r"model\.layers\.0\.self_attn\.(q|k)", r"(q|v)_proj", r"layers\.1\..*_proj", r"model\.layers\.1\.mlp\."):
        with pytest.raises(ValueError, match="matched no module"):
            find_targets(model, regex)
    assert find_targets(model, r"model\.layers\.0\.self_attn\.(q|k)_proj") == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]


@pytest.mark.parametrize("exclude", [*_SPECS, r"model\.layers\.0\.self_attn"], ids=str)
def test_exclude_modules_remove_what_peft_removes(exclude):
    peft = pytest.importorskip("peft")
    ours = find_targets(tiny_llama(), "all-linear", exclude_modules=exclude, each_entry=False)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules="all-linear", exclude_modules=exclude))
    wrapped = [n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert ours == wrapped


def test_exclude_regex_matching_only_part_of_names_excludes_nothing():
    model = tiny_llama()
    everything = find_targets(model, "all-linear")
    for regex in (r"model\.layers\.0\.self_attn", r"(q|k)_proj", r"layers\.1\..*"):
        assert find_targets(model, "all-linear", exclude_modules=regex) == everything
    assert find_targets(model, "all-linear", exclude_modules=r"model\.layers\.0\.self_attn\..*") == [n for n in everything if ".0.self_attn." not in n]


@pytest.mark.parametrize("method", ["lora", "ia3", "adalora", "houlsby", "bitfit"])
def test_each_method_matches_a_regex_whole(method):
    """A method's regex argument selects whole names: a regex matching only a prefix of names selects nothing."""
    from transformers import BertConfig, BertModel

    from lightning_peft.methods.bitfit import find_biases
    from lightning_peft.methods.houlsby import inject_houlsby

    def bert():
        torch.manual_seed(0)
        return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=50))

    whole, prefix = r"encoder\.layer\.0\.attention\.self\.(query|value)", r"encoder\.layer\.0\.attention\.self\.(q|v)"
    names = [f"encoder.layer.0.attention.self.{n}" for n in ("query", "value")]
    if method == "bitfit":
        select = find_biases
        names = [f"{n}.bias" for n in names]
    elif method == "houlsby":
        select = inject_houlsby
    else:
        select = functools.partial(_inject, method)
    assert select(bert(), whole) == names
    with pytest.raises(ValueError, match="matched no module"):
        select(bert(), prefix)


@pytest.mark.parametrize("feedforward", [r".*\.mlp\.down_proj", r"model\.layers\.0\.mlp\.down_proj", r".*\.mlp\.down", r"down_proj"], ids=str)
def test_ia3_feedforward_regex_matches_whole_names_as_peft(feedforward):
    peft = pytest.importorskip("peft")
    from lightning_peft.methods.ia3 import IA3Linear, inject_ia3

    targets = r".*\.(k_proj|down_proj)"
    ours = tiny_llama()
    inject_ia3(ours, targets, feedforward)
    theirs = peft.get_peft_model(tiny_llama(), peft.IA3Config(target_modules=targets, feedforward_modules=feedforward))
    got = {n: m.feedforward for n, m in ours.named_modules() if isinstance(m, IA3Linear)}
    want = {n.removeprefix("base_model.model."): m.is_feedforward for n, m in theirs.named_modules() if isinstance(m, peft.tuners.ia3.IA3Layer)}
    assert got == want and len(got) == 4
