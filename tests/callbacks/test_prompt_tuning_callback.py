import pytest

from lightning_peft import count_parameters
from lightning_peft.callbacks.prompt_tuning import PromptTuning
from tests.callbacks.helpers import TinyLM, TinyLMConfigureModel
from tests.callbacks.method_checks import TinyGPT2LM, check_checkpoint_and_resume, check_fit


@pytest.mark.parametrize("module_cls", [TinyLM, TinyLMConfigureModel, TinyGPT2LM])
def test_fit_with_no_arguments_trains_the_prompt_only(tmp_path, module_cls):
    module, cb = check_fit(tmp_path, PromptTuning, lambda n: "prompt_embeddings" in n, module_cls=module_cls, lr=5e-2)
    assert cb.injected == ["model.prompt_tuning"]
    assert count_parameters(module).added == 20 * 32


def test_checkpoint_holds_the_prompt_and_resume_is_exact(tmp_path):
    ckpt = check_checkpoint_and_resume(tmp_path, lambda: PromptTuning(num_virtual_tokens=8), lambda k: k == "model.prompt_tuning.prompt_embeddings")
    assert ckpt["lightning_peft"]["methods"][0] == {
        "method": "prompt_tuning", "num_virtual_tokens": 8, "init": "vocab", "init_text": None, "tokenizer": None, "trainable_modules": [],
    }


def test_text_init_takes_the_tokenizer_of_the_module():
    class Tok:
        def __call__(self, text):
            return {"input_ids": [3, 4]}

    module = TinyLM()
    module.tokenizer = Tok()
    PromptTuning(num_virtual_tokens=3, init="text", init_text="hi").inject(module)
    table = module.model.get_input_embeddings().weight
    assert (module.model.prompt_tuning.prompt_embeddings == table[[3, 4, 3]]).all()
    with pytest.raises(ValueError, match="init='text' needs the model's tokenizer"):
        PromptTuning(num_virtual_tokens=3, init="text", init_text="hi").inject(TinyLM())


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_virtual_tokens must be an integer >= 1, got 0"):
        PromptTuning(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="init_text='x' is only used with init='text'"):
        PromptTuning(init_text="x")
