import pytest

from lightning_peft import count_parameters
from lightning_peft.callbacks.bitfit import BitFit
from tests.callbacks.helpers import TinyLM
from tests.callbacks.method_checks import TinyGPT2LM, check_checkpoint_and_resume, check_fit, trainer


def test_fit_trains_the_biases_only(tmp_path):
    module, cb = check_fit(tmp_path, BitFit, lambda n: n.endswith("bias"), module_cls=TinyGPT2LM, lr=5e-2, min_drop=0.05)
    counts = count_parameters(module)
    assert counts.added == 0 and counts.changed == counts.trainable > 0


def test_checkpoint_holds_the_biases_and_resume_is_exact(tmp_path):
    ckpt = check_checkpoint_and_resume(tmp_path, BitFit, lambda k: k.endswith("bias"), module_cls=TinyGPT2LM)
    assert ckpt["lightning_peft"]["trainable"] == sorted(ckpt["state_dict"])


def test_llama_module_is_refused_with_advice(tmp_path):
    with pytest.raises(ValueError, match=r"no bias parameter in TinyLM.*IA3\(\) or LoRA\(\)"):
        trainer(tmp_path, [BitFit()], max_steps=1).fit(TinyLM())
