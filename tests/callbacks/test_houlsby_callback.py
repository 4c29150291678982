import pytest

from lightning_peft.callbacks.houlsby import Houlsby
from lightning_peft.methods.houlsby import HoulsbyAdapter
from tests.callbacks.helpers import TinyLM, TinyLMConfigureModel
from tests.callbacks.method_checks import check_checkpoint_and_resume, check_fit, trainer


def _is_adapter(name):
    return name.split(".")[-1].startswith("houlsby_")


@pytest.mark.parametrize("module_cls", [TinyLM, TinyLMConfigureModel])
def test_fit_trains_the_adapters_only(tmp_path, module_cls):
    module, cb = check_fit(tmp_path, lambda: Houlsby(bottleneck_size=8), _is_adapter, module_cls=module_cls)
    assert len(cb.injected) == 4 and all(n.endswith(("self_attn.o_proj", "mlp.down_proj")) for n in cb.injected)
    assert sum(isinstance(m, HoulsbyAdapter) for m in module.modules()) == 4


def test_checkpoint_holds_the_adapters_and_resume_is_exact(tmp_path):
    ckpt = check_checkpoint_and_resume(tmp_path, lambda: Houlsby(bottleneck_size=8), _is_adapter)
    assert ckpt["lightning_peft"]["methods"][0]["bottleneck_size"] == 8


def test_resume_with_another_bottleneck_names_the_shapes(tmp_path):
    t = trainer(tmp_path, [Houlsby(bottleneck_size=8)], max_steps=2)
    t.fit(TinyLM())
    t.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match=r"houlsby_down: checkpoint shape \[8, 32\], model shape \[4, 32\]"):
        trainer(tmp_path, [Houlsby(bottleneck_size=4)], max_steps=4).fit(TinyLM(), ckpt_path=tmp_path / "a.ckpt")
