import pytest
import torch

from lightning_peft import count_parameters
from lightning_peft.callbacks.ia3 import IA3
from lightning_peft.methods.ia3 import IA3Linear
from tests.callbacks.helpers import TinyLM, TinyLMConfigureModel, token_data
from tests.callbacks.method_checks import check_checkpoint_and_resume, check_fit, trainer


@pytest.mark.parametrize("module_cls", [TinyLM, TinyLMConfigureModel])
def test_fit_trains_the_vectors_only(tmp_path, module_cls):
    module, cb = check_fit(tmp_path, IA3, lambda n: n.endswith("ia3_l"), module_cls=module_cls, lr=5e-2)
    assert len(cb.injected) == 6  # k_proj, v_proj, down_proj x 2 layers
    assert sum(isinstance(m, IA3Linear) for m in module.modules()) == 6


def test_checkpoint_holds_the_vectors_and_resume_is_exact(tmp_path):
    ckpt = check_checkpoint_and_resume(tmp_path, IA3, lambda k: k.endswith("ia3_l"))
    assert ckpt["lightning_peft"]["methods"][0]["method"] == "ia3"


def test_resume_with_other_targets_names_the_keys(tmp_path):
    t = trainer(tmp_path, [IA3()], max_steps=2)
    t.fit(TinyLM())
    t.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match=r"missing model\.model\.layers\.0\.self_attn\.q_proj\.ia3_l"):
        trainer(tmp_path, [IA3(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])], max_steps=4).fit(
            TinyLM(), ckpt_path=tmp_path / "a.ckpt"
        )


def test_save_dir_with_trained_head_loads_in_hf_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from tests.conftest import tiny_llama

    module = TinyLM(lr=5e-2)
    cb = IA3(trainable_modules=["lm_head"], save_dir=str(tmp_path / "adapter"))
    trainer(tmp_path, [cb], max_steps=3).fit(module)
    counts = count_parameters(module)
    assert counts.changed == module.model.lm_head.weight.numel() and counts.added == sum(m.ia3_l.numel() for m in module.modules() if isinstance(m, IA3Linear))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "adapter").eval()
    ids = token_data(2)
    module.eval()
    torch.testing.assert_close(theirs(ids).logits, module(ids), atol=1e-5, rtol=0)
