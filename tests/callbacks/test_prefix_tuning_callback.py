import pytest

from lightning_peft import count_parameters
from lightning_peft.callbacks.prefix_tuning import PrefixTuning
from tests.callbacks.helpers import TinyLM, TinyLMConfigureModel
from tests.callbacks.method_checks import TinyGPT2LM, check_checkpoint_and_resume, check_fit


@pytest.mark.parametrize("module_cls", [TinyLM, TinyLMConfigureModel, TinyGPT2LM])
def test_fit_with_no_arguments_trains_the_prefixes_only(tmp_path, module_cls):
    module, cb = check_fit(tmp_path, PrefixTuning, lambda n: ".prefix_tuning.prefix_" in n, module_cls=module_cls, lr=1e-2)
    assert cb.injected == ["model.prefix_tuning"]
    assert count_parameters(module).added == sum(p.numel() for p in module.model.prefix_tuning.parameters())


def test_checkpoint_holds_the_prefix_parameters_and_resume_is_exact(tmp_path):
    ckpt = check_checkpoint_and_resume(tmp_path, lambda: PrefixTuning(num_virtual_tokens=6, encoder_hidden_size=16), lambda k: ".prefix_tuning.prefix_" in k)
    assert ckpt["lightning_peft"]["methods"][0] == {"method": "prefix_tuning", "num_virtual_tokens": 6, "encoder_hidden_size": 16, "trainable_modules": []}


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_virtual_tokens must be an integer >= 1, got 0"):
        PrefixTuning(num_virtual_tokens=0)
