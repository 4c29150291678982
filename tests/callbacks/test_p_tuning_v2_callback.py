import pytest

from lightning_peft import count_parameters
from lightning_peft.callbacks.p_tuning_v2 import PTuningV2
from tests.callbacks.helpers import TinyLM, TinyLMConfigureModel
from tests.callbacks.method_checks import TinyGPT2LM, check_checkpoint_and_resume, check_fit


@pytest.mark.parametrize("module_cls", [TinyLM, TinyLMConfigureModel, TinyGPT2LM])
def test_fit_with_no_arguments_trains_the_deep_prompts_only(tmp_path, module_cls):
    module, cb = check_fit(tmp_path, PTuningV2, lambda n: n.endswith("p_tuning_v2.prefix_kv"), module_cls=module_cls, lr=5e-2)
    assert cb.injected == ["model.p_tuning_v2"]
    assert count_parameters(module).added == module.model.p_tuning_v2.prefix_kv.numel()


def test_checkpoint_holds_the_prompts_and_resume_is_exact(tmp_path):
    ckpt = check_checkpoint_and_resume(tmp_path, lambda: PTuningV2(num_virtual_tokens=5), lambda k: k == "model.p_tuning_v2.prefix_kv")
    assert ckpt["lightning_peft"]["methods"][0] == {"method": "p_tuning_v2", "num_virtual_tokens": 5, "trainable_modules": []}


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_virtual_tokens must be an integer >= 1, got 1.5"):
        PTuningV2(num_virtual_tokens=1.5)
