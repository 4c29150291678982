"""A Trainer call that fails before training starts leaves the user's model as it was (issue 22, point 5).

The model's module types, ``state_dict``, ``requires_grad`` flags, lightning-peft record and the instance attributes
the callbacks set are compared before and after the failed call; then the same call is retried and must work.
"""

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft import IA3, LoRA, save_adapter
from lightning_peft.methods.ia3 import IA3Linear
from lightning_peft.methods.lora import LoRALinear
from tests.callbacks.helpers import TinyLM, TinyLMConfigureModel

_ATTRS = ("_strict_loading", "on_save_checkpoint", "on_load_checkpoint", "configure_model")


def _trainer(tmp_path, callbacks, **kw):
    kw.setdefault("max_steps", 4)
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=callbacks, enable_checkpointing=kw.pop("enable_checkpointing", False), **kw,
    )


def _state(module):
    return (
        [(n, type(m)) for n, m in module.named_modules()],
        {k: v.clone() for k, v in module.state_dict().items()},
        {n: p.requires_grad for n, p in module.named_parameters()},
        copy.deepcopy(module.__dict__.get("_lightning_peft")),
        {a: module.__dict__.get(a) for a in _ATTRS},
    )


def _assert_unchanged(module, before):
    types, tensors, flags, record, attrs = _state(module)
    assert types == before[0], "module types changed"
    assert tensors.keys() == before[1].keys() and all(torch.equal(tensors[k], before[1][k]) for k in tensors)
    assert flags == before[2], "requires_grad flags changed"
    assert record == before[3], "the lightning-peft record changed"
    assert attrs == before[4], "instance attributes set by the callbacks were left behind"


def _built(module_cls):
    module = module_cls()
    if module.model is None:
        module.configure_model()  # built by hand, so the state before the call includes the model (idempotent hook)
    return module


@pytest.mark.parametrize("module_cls", [TinyLM, TinyLMConfigureModel])
def test_a_fit_failing_in_the_second_callback_takes_the_first_ones_adapter_out_and_a_retry_works(tmp_path, module_cls):
    module = _built(module_cls)
    before = _state(module)
    lora = LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"'o_prj'"):
        _trainer(tmp_path, [lora, IA3(target_modules=["o_prj"], feedforward_modules=[])]).fit(module)
    _assert_unchanged(module, before)
    assert lora.injected == []

    # the same LoRA callback, the IA3 typo fixed: both adapters go in and train
    _trainer(tmp_path, [lora, IA3(target_modules=["o_proj"], feedforward_modules=[])]).fit(module)
    attn = module.model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, LoRALinear) and isinstance(attn.o_proj, IA3Linear)
    assert attn.q_proj.lora_b["default"].abs().sum() > 0  # trained
    assert "configure_model" not in module.__dict__  # no wrapper left on the instance


class _BadOptimizer(TinyLM):
    def configure_optimizers(self):
        raise RuntimeError("no optimizer today")


def test_a_fit_failing_in_configure_optimizers_takes_the_adapters_out(tmp_path):
    module = _BadOptimizer()
    before = _state(module)
    with pytest.raises(RuntimeError, match="no optimizer today"):
        _trainer(tmp_path, [LoRA(r=4, target_modules=["q_proj"]), IA3(target_modules=["o_proj"], feedforward_modules=[])]).fit(module)
    _assert_unchanged(module, before)


def test_a_fit_failing_in_the_checkpoint_restore_takes_the_adapters_out_and_a_retry_resumes(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, [LoRA(r=4, target_modules=["q_proj"]), ckpt], enable_checkpointing=True).fit(TinyLM())
    module = TinyLM()
    before = _state(module)
    with pytest.raises(ValueError, match=r"does not match this model's adapters"):
        _trainer(tmp_path, [LoRA(r=8, target_modules=["q_proj"])], max_steps=6).fit(module, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    _assert_unchanged(module, before)
    trainer = _trainer(tmp_path, [LoRA(r=4, target_modules=["q_proj"])], max_steps=6)
    trainer.fit(module, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert trainer.global_step == 6


class _FailsAtStep3(TinyLM):
    def training_step(self, batch, batch_idx):
        if self.global_step == 3:
            raise RuntimeError("step 3 went wrong")
        return super().training_step(batch, batch_idx)


def test_an_error_during_training_keeps_the_trained_adapter(tmp_path):
    module = _FailsAtStep3()
    with pytest.raises(RuntimeError, match="step 3 went wrong"):
        _trainer(tmp_path, [LoRA(r=4, target_modules=["q_proj"])], max_steps=8).fit(module)
    layer = module.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.lora_b["default"].abs().sum() > 0  # three steps of training kept
    save_adapter(module, tmp_path / "adapter")  # and it can still be written
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
