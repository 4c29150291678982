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
