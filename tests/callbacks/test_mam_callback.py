import lightning as L
import pytest
import torch

from lightning_peft import count_parameters
from lightning_peft.callbacks.mam_adapter import MAMAdapter
from lightning_peft.callbacks.parallel_adapter import ParallelAdapter
from lightning_peft.callbacks.prefix_tuning import PrefixTuning
from tests.callbacks.helpers import TinyLM, TinyLMConfigureModel
from tests.callbacks.method_checks import check_checkpoint_and_resume, check_fit, trainer


def _is_adapter(name):
    return ".prefix_tuning.prefix_" in name or name.split(".")[-1].startswith("parallel_")


def _small():
    return MAMAdapter(num_virtual_tokens=4, prefix_hidden_size=16, bottleneck_size=8)


@pytest.mark.parametrize("module_cls", [TinyLM, TinyLMConfigureModel])
def test_fit_trains_the_prefix_and_the_ffn_adapters_only(tmp_path, module_cls):
    module, cb = check_fit(tmp_path, _small, _is_adapter, module_cls=module_cls)
    assert cb.injected == ["model.prefix_tuning", "model.model.layers.0.mlp", "model.model.layers.1.mlp"]


def test_checkpoint_holds_the_adapter_and_resume_is_exact(tmp_path):
    ckpt = check_checkpoint_and_resume(tmp_path, _small, _is_adapter)
    (record,) = ckpt["lightning_peft"]["methods"]
    assert record["method"] == "mam_adapter" and record["num_virtual_tokens"] == 4 and record["scaling"] == 4.0


def test_trainer_with_the_two_part_callbacks_trains_the_same_parameters(tmp_path):
    def fit(callbacks):
        L.seed_everything(0)
        module = TinyLM()
        trainer(tmp_path, callbacks, max_steps=6).fit(module)
        return module

    ours = fit([_small()])
    by_hand = fit([PrefixTuning(num_virtual_tokens=4, encoder_hidden_size=16), ParallelAdapter(bottleneck_size=8, scaling=4.0)])
    a, b = ours.state_dict(), by_hand.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert count_parameters(ours) == count_parameters(by_hand)
