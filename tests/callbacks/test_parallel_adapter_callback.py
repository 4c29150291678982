import pytest

from lightning_peft.callbacks.parallel_adapter import ParallelAdapter
from tests.callbacks.helpers import TinyLM, TinyLMConfigureModel
from tests.callbacks.method_checks import check_checkpoint_and_resume, check_fit


def _is_adapter(name):
    return name.split(".")[-1].startswith("parallel_")


@pytest.mark.parametrize("module_cls", [TinyLM, TinyLMConfigureModel])
def test_fit_trains_the_adapters_only(tmp_path, module_cls):
    _, cb = check_fit(tmp_path, lambda: ParallelAdapter(bottleneck_size=8, sites=["attention", "ffn"]), _is_adapter, module_cls=module_cls)
    assert sorted(n.rsplit(".", 1)[-1] for n in cb.injected) == ["mlp", "mlp", "self_attn", "self_attn"]


def test_checkpoint_holds_the_adapters_and_resume_is_exact(tmp_path):
    ckpt = check_checkpoint_and_resume(tmp_path, lambda: ParallelAdapter(bottleneck_size=8), _is_adapter)
    assert ckpt["lightning_peft"]["methods"][0]["scaling"] == 4.0
