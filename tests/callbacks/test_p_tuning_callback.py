import pytest

from lightning_peft import count_parameters
from lightning_peft.callbacks.p_tuning import PTuning
from tests.callbacks.helpers import TinyLM, TinyLMConfigureModel
from tests.callbacks.method_checks import TinyGPT2LM, check_checkpoint_and_resume, check_fit


@pytest.mark.parametrize("module_cls", [TinyLM, TinyLMConfigureModel, TinyGPT2LM])
def test_fit_with_no_arguments_trains_the_encoder_only(tmp_path, module_cls):
    module, cb = check_fit(tmp_path, PTuning, lambda n: ".p_tuning.ptuning_" in n, module_cls=module_cls, lr=1e-2)
    assert cb.injected == ["model.p_tuning"]
    assert count_parameters(module).added == sum(p.numel() for p in module.model.p_tuning.parameters())


def test_checkpoint_holds_the_encoder_and_resume_is_exact(tmp_path):
    ckpt = check_checkpoint_and_resume(tmp_path, lambda: PTuning(num_virtual_tokens=6, encoder="lstm", encoder_hidden_size=8), lambda k: ".p_tuning.ptuning_" in k)
    assert ckpt["lightning_peft"]["methods"][0] == {"method": "p_tuning", "num_virtual_tokens": 6, "encoder": "lstm", "encoder_hidden_size": 8, "trainable_modules": []}


def test_bad_arguments():
    with pytest.raises(ValueError, match="encoder_hidden_size must be a positive integer or None"):
        PTuning(encoder_hidden_size=0)
