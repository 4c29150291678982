import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft import count_parameters
from lightning_peft.callbacks.selective import Selective
from tests.callbacks.helpers import TinyLM, TinyLMConfigureModel
from tests.callbacks.method_checks import check_checkpoint_and_resume, check_fit, trainer

TOP = ("model.model.layers.1.", "model.lm_head.")


@pytest.mark.parametrize("module_cls", [TinyLM, TinyLMConfigureModel])
def test_fit_trains_the_selected_parameters_only(tmp_path, module_cls):
    module, _ = check_fit(tmp_path, lambda: Selective(train=["top:1", "head"]), lambda n: n.startswith(TOP), module_cls=module_cls)
    counts = count_parameters(module)
    assert counts.added == 0 and counts.changed == counts.trainable


def test_checkpoint_holds_the_trained_parameters_and_resume_is_exact(tmp_path):
    ckpt = check_checkpoint_and_resume(tmp_path, lambda: Selective(train=["top:1", "head"]), lambda k: k.startswith(TOP))
    assert ckpt["lightning_peft"]["methods"][0]["train"] == ["top:1", "head"]


class ScheduledLM(TinyLM):
    """Optimizer over the trainable parameters with a per-step LambdaLR."""

    def configure_optimizers(self):
        opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.1 * step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _schedule():
    return Selective(train=["top:1", "head"], unfreeze_schedule={1: ["blocks:0"]}, unfreeze_lr_factor=0.5)


def test_gradual_unfreezing_adds_a_param_group_that_follows_the_schedule(tmp_path):
    L.seed_everything(0)
    module = ScheduledLM(opt="trainable")
    emb0 = module.model.model.embed_tokens.weight.detach().clone()
    block0 = {n: p.detach().clone() for n, p in module.named_parameters() if n.startswith("model.model.layers.0.")}
    cb = _schedule()
    t = trainer(tmp_path, [cb], max_epochs=2, max_steps=-1)
    seen = []

    class Probe(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append(len(trainer.optimizers[0].param_groups))

    t.callbacks.append(Probe())
    t.fit(module)
    assert seen == [1, 2] and cb.applied_epochs == [1]
    opt = t.optimizers[0]
    new_group = {id(p) for p in opt.param_groups[1]["params"]}
    assert new_group == {id(module.get_parameter(n)) for n in block0}
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * opt.param_groups[0]["lr"])  # both follow the LambdaLR
    assert opt.param_groups[0]["lr"] < module.lr * 0.6  # the schedule did decay
    for n, v in block0.items():
        assert not torch.equal(module.get_parameter(n), v), n
    torch.testing.assert_close(module.model.model.embed_tokens.weight, emb0, rtol=0, atol=0)


def test_resume_after_unfreezing_restores_the_groups_exactly(tmp_path):
    def run(max_epochs, ckpt_path=None):
        L.seed_everything(0)
        module = ScheduledLM(opt="trainable")
        cbs = [_schedule(), ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1)]
        t = trainer(tmp_path, cbs, max_epochs=max_epochs, max_steps=-1, enable_checkpointing=True)
        t.fit(module, ckpt_path=ckpt_path)
        return module, t

    straight, _ = run(3)
    run(2)  # unfreezes at epoch 1; checkpoint at the end of epoch 1 has 2 param groups
    ckpt = torch.load(tmp_path / "ck" / "epoch=1-step=8.ckpt", weights_only=False)
    assert len(ckpt["optimizer_states"][0]["param_groups"]) == 2
    assert any(k.startswith("model.model.layers.0.") for k in ckpt["state_dict"])
    assert not any("embed_tokens" in k for k in ckpt["state_dict"])
    resumed, t = run(3, ckpt_path=tmp_path / "ck" / "epoch=1-step=8.ckpt")
    assert len(t.optimizers[0].param_groups) == 2
    for n, p in straight.named_parameters():
        torch.testing.assert_close(resumed.get_parameter(n), p, rtol=0, atol=0)


def test_frozen_parameters_already_in_the_optimizer_warn(tmp_path):
    module = TinyLM(opt="all")
    with pytest.warns(UserWarning, match=r"already in the optimizer.*they train in their existing group"):
        trainer(tmp_path, [_schedule()], max_epochs=2, max_steps=-1).fit(module)
