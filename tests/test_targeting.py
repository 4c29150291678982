import pytest
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
