"""The transformers API lightning-peft relies on, checked in one place.

When transformers moves one of these, this file fails first with a message that names the API and where the
project uses it, instead of dozens of unrelated failures across the suite.
"""

import inspect

import pytest
import torch

from lightning_peft.compat import CACHE_ARG_NAMES, cache_arg, get_cache, output_cache, set_cache


def _moved(what: str, used_by: str) -> str:
    import transformers

    return (
        f"transformers {transformers.__version__} moved {what}, which lightning-peft uses in {used_by}. Update "
        "lightning_peft/compat.py (or the code named) before anything else: the failures elsewhere follow from this."
    )


def test_decoder_forwards_take_the_cache_under_a_known_name():
    from transformers import GPT2Model, LlamaModel, OPTModel, Qwen2Model
    from transformers.models.llama.modeling_llama import LlamaAttention

    for cls in (LlamaModel, GPT2Model, Qwen2Model, OPTModel, LlamaAttention):
        assert cache_arg(cls.forward) in CACHE_ARG_NAMES, _moved(
            f"the key/value cache argument of {cls.__name__}.forward (looked for {CACHE_ARG_NAMES}; it takes "
            f"{list(inspect.signature(cls.forward).parameters)})",
            "lightning_peft/methods/_prompt.py (prompt tuning, P-tuning, prefix tuning, P-tuning v2, UniPELT, MAM)",
        )


def test_the_cache_classes_the_soft_prompts_fill():
    from tests.conftest import tiny_llama

    try:
        from transformers import DynamicCache

        model = tiny_llama()
        cache = DynamicCache(config=model.config)
        k = torch.zeros(1, 2, 3, 8)
        cache.update(k, k, 0)
        assert cache.get_seq_length() == 3 and cache.layers[0].keys.shape == k.shape
    except (ImportError, TypeError, AttributeError, AssertionError) as err:
        pytest.fail(_moved(f"DynamicCache(config=...), .update, .get_seq_length or .layers[i].keys ({err!r})", "lightning_peft/methods/_prompt.py (_filled_cache, gated prefixes)"))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert output_cache(out) is not None, _moved("the cache field of the model outputs", "lightning_peft/compat.py output_cache")


def test_model_classes_and_layers_the_project_imports():
    try:
        from transformers import PreTrainedModel  # noqa: F401
        from transformers.pytorch_utils import Conv1D
    except ImportError as err:
        pytest.fail(_moved(f"PreTrainedModel or transformers.pytorch_utils.Conv1D ({err})", "lightning_peft/targeting.py, io.py, methods/_prompt.py"))
    layer = Conv1D(4, 3)  # GPT-2's linear: weight stored (in, out)
    assert tuple(layer.weight.shape) == (3, 4), _moved("Conv1D's weight layout (in, out)", "LoRA / (IA)3 / AdaLoRA fan_in_fan_out")


def test_cache_helpers_read_either_name_and_write_the_models_own():
    def new(input_ids=None, cache=None, **kwargs): ...

    def old(input_ids=None, past_key_values=None, **kwargs): ...

    def none(input_ids=None, **kwargs): ...

    assert (cache_arg(new), cache_arg(old), cache_arg(none)) == ("cache", "past_key_values", None)
    assert cache_arg(["hidden_states", "past_key_values"]) == "past_key_values"
    marker = object()
    assert get_cache({"past_key_values": marker}) is marker and get_cache({"cache": marker}) is marker and get_cache({}) is None
    kwargs = {"past_key_values": "stale", "input_ids": 1}
    set_cache(kwargs, marker, "cache")
    assert kwargs == {"cache": marker, "input_ids": 1}

    class Old:
        past_key_values = marker

    class New:
        cache = marker

    assert output_cache(Old()) is marker and output_cache(New()) is marker
