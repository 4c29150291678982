"""LoRA+ through the LoRA callback (``loraplus_lr_ratio``): the groups at fit start, schedulers, exact resume, the CLI."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_peft import LoRA
from lightning_peft.methods.lora import LoRALinear
from lightning_peft.methods.loraplus import RATIO_KEY
from tests.callbacks.helpers import TinyLM
from tests.callbacks.method_checks import trainer


def _b_ids(module) -> set[int]:
    return {id(p) for m in module.modules() if isinstance(m, LoRALinear) for p in m.lora_b.values()}


class ScheduledLM(TinyLM):
    """AdamW over the trainable parameters with a per-step scheduler (``sched``: LambdaLR or LinearLR)."""

    def __init__(self, sched: str = "LambdaLR", **kw) -> None:
        super().__init__(opt="trainable", **kw)
        self.sched = sched

    def configure_optimizers(self):
        opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)
        if self.sched == "LambdaLR":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.1 * step))
        else:
            sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=10)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class LRProbe(L.Callback):
    """The learning rate of every group before each step, and each step's loss."""

    def __init__(self) -> None:
        self.lrs, self.losses = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


@pytest.mark.parametrize("sched", ["LambdaLR", "LinearLR"])
def test_fit_trains_b_at_ratio_times_the_lr_through_the_schedule(tmp_path, sched):
    L.seed_everything(0)
    module, probe = ScheduledLM(sched), LRProbe()
    trainer(tmp_path, [LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"], loraplus_lr_ratio=16), probe], max_steps=8).fit(module)
    opt = module.trainer.optimizers[0]
    assert len(opt.param_groups) == 2
    rest, b = opt.param_groups
    assert {id(p) for p in b["params"]} == _b_ids(module) and len(b["params"]) == 4  # the tiny Llama has no trainable 1-D parameter
    assert not _b_ids(module) & {id(p) for p in rest["params"]} and len(rest["params"]) == 4
    assert b[RATIO_KEY] == 16.0 and b["initial_lr"] == pytest.approx(16 * module.lr) and b["weight_decay"] == rest["weight_decay"]
    assert len(probe.lrs) == 8 and len({lrs[0] for lrs in probe.lrs}) == 8  # the schedule moves the learning rate every step
    for lr_rest, lr_b in probe.lrs:
        assert lr_b == pytest.approx(16 * lr_rest)
    assert module.trainer.lr_scheduler_configs[0].scheduler.get_last_lr() == pytest.approx([g["lr"] for g in opt.param_groups])


def test_without_the_ratio_there_is_one_group(tmp_path):
    module = ScheduledLM()
    trainer(tmp_path, [LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"])], max_steps=1).fit(module)
    assert len(module.trainer.optimizers[0].param_groups) == 1


def _run(tmp_path, max_epochs, ratio=16.0, ckpt_path=None):
    L.seed_everything(0)
    module, probe = ScheduledLM(), LRProbe()
    cbs = [LoRA(r=4, alpha=8, target_modules="all-linear", loraplus_lr_ratio=ratio), ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1), probe]
    trainer(tmp_path, cbs, max_epochs=max_epochs, max_steps=-1, enable_checkpointing=True).fit(module, ckpt_path=ckpt_path)
    return module, probe


def test_resume_is_exact(tmp_path):
    straight, straight_probe = _run(tmp_path, 3)
    _run(tmp_path, 1)  # 4 steps: a checkpoint at the end of epoch 0
    ckpt = torch.load(tmp_path / "ck" / "epoch=0-step=4.ckpt", weights_only=False)
    assert [g.get(RATIO_KEY) for g in ckpt["optimizer_states"][0]["param_groups"]] == [None, 16.0]
    assert "loraplus_lr_ratio" not in ckpt["lightning_peft"]["methods"][0]  # an optimizer setting, not the adapter's
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("LoRA")]
    assert state["loraplus_lr_ratio"] == 16.0
    resumed, resumed_probe = _run(tmp_path, 3, ckpt_path=tmp_path / "ck" / "epoch=0-step=4.ckpt")
    assert len(resumed_probe.losses) == 8 and resumed_probe.losses == straight_probe.losses[4:]
    assert resumed_probe.lrs == straight_probe.lrs[4:]
    for n, p in straight.named_parameters():
        torch.testing.assert_close(resumed.get_parameter(n), p, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("saved", "now", "match"),
    [
        (16.0, 4.0, r"the checkpoint was trained with loraplus_lr_ratio=16\.0, and this callback has loraplus_lr_ratio=4\.0.* Resume with loraplus_lr_ratio=16\.0"),
        (16.0, None, r"trained with loraplus_lr_ratio=16\.0, and this callback has loraplus_lr_ratio=None"),
        (None, 16.0, r"the checkpoint was trained without LoRA\+, and this callback has loraplus_lr_ratio=16\.0.* Resume with loraplus_lr_ratio=None"),
    ],
)
def test_resume_with_another_ratio_is_refused(tmp_path, saved, now, match):
    L.seed_everything(0)
    t = trainer(tmp_path, [LoRA(r=4, alpha=8, target_modules=["q_proj"], loraplus_lr_ratio=saved)], max_steps=2)
    t.fit(ScheduledLM())
    t.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, [LoRA(r=4, alpha=8, target_modules=["q_proj"], loraplus_lr_ratio=now)], max_steps=4).fit(ScheduledLM(), ckpt_path=tmp_path / "a.ckpt")
    # validating does not involve the optimizer: any ratio is fine there
    trainer(tmp_path, [LoRA(r=4, alpha=8, target_modules=["q_proj"], loraplus_lr_ratio=now)]).validate(ScheduledLM(), ckpt_path=tmp_path / "a.ckpt")


class DeepSpeedStandInStrategy(SingleDeviceStrategy):
    """Named like Lightning's DeepSpeedStrategy (the callback goes by the name; DeepSpeed itself is not needed)."""


def test_deepspeed_is_refused_with_the_fix_before_anything_is_injected(tmp_path):
    module = ScheduledLM()
    strategy = DeepSpeedStandInStrategy(device=torch.device("cpu"))
    cb = LoRA(r=4, target_modules=["q_proj"], loraplus_lr_ratio=16)
    with pytest.raises(RuntimeError, match=r"does not support the DeepSpeed strategy.*loraplus_param_groups\(self, lr=\.\.\., loraplus_lr_ratio=16\.0\)"):
        trainer(tmp_path, [cb], strategy=strategy, max_steps=1).fit(module)
    assert not cb.injected and not any(isinstance(m, LoRALinear) for m in module.modules())


def test_b_left_out_of_the_optimizer_is_refused(tmp_path):
    class NoB(TinyLM):
        def configure_optimizers(self):
            return torch.optim.AdamW([p for n, p in self.named_parameters() if p.requires_grad and "lora_b" not in n], lr=self.lr)

    with pytest.raises(ValueError, match=r"4 trainable LoRA B matrices are not in the optimizer"):
        trainer(tmp_path, [LoRA(r=4, target_modules=["q_proj", "v_proj"], loraplus_lr_ratio=16)], max_steps=1).fit(NoB())


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (True, TypeError, r"LoRA: loraplus_lr_ratio must be a number, got True \(bool\)"),
        ("16", TypeError, r"LoRA: loraplus_lr_ratio must be a number, got '16' \(str\)"),
        (math.inf, ValueError, r"LoRA: loraplus_lr_ratio must be a finite number > 0, got inf\. .*e\.g\. 16"),
        (0.0, ValueError, r"LoRA: loraplus_lr_ratio must be a finite number > 0, got 0\.0"),
    ],
)
def test_the_ratio_is_checked_strictly(value, error, match):
    with pytest.raises(error, match=match):
        LoRA(loraplus_lr_ratio=value)


def test_the_ratio_is_in_the_state_not_in_the_adapter_record():
    cb = LoRA(loraplus_lr_ratio=16)
    assert cb.loraplus_lr_ratio == 16.0 and isinstance(cb.loraplus_lr_ratio, float)
    assert cb.state_dict()["loraplus_lr_ratio"] == 16.0 and "loraplus_lr_ratio" not in cb.config()
    assert cb.config() == LoRA().config()  # the same adapter as plain LoRA


def test_cli_optimizer_and_scheduler_get_the_ratio(tmp_path, minilm_path, monkeypatch):
    """``lightning-peft fit`` with the quickstart config, LightningCLI's --optimizer / --lr_scheduler, and the ratio."""
    from lightning.pytorch import LightningDataModule, LightningModule

    import lightning_peft.tasks  # noqa: F401  (the CLI's short class names)
    from lightning_peft.cli import PEFTCLI
    from tests.cli.test_cli import REPO

    monkeypatch.chdir(REPO)
    cli = PEFTCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, args=[
        "fit", "--config", "configs/quickstart.yaml", "--trainer.callbacks.init_args.loraplus_lr_ratio=8",
        f"--trainer.callbacks.init_args.save_dir={tmp_path / 'adapter'}", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.fast_dev_run=2", "--trainer.enable_progress_bar=false",
        "--optimizer=torch.optim.SGD", "--optimizer.lr=0.05", "--optimizer.momentum=0.9",
        "--lr_scheduler=torch.optim.lr_scheduler.ExponentialLR", "--lr_scheduler.gamma=0.5",
    ])
    opt = cli.trainer.optimizers[0]
    assert type(opt) is torch.optim.SGD and len(opt.param_groups) == 2
    rest, b = opt.param_groups
    assert {id(p) for p in b["params"]} == _b_ids(cli.model) | {id(cli.model.model.classifier.bias)}
    assert b["lr"] == pytest.approx(8 * rest["lr"]) and b["momentum"] == rest["momentum"] == 0.9
    assert cli.trainer.lr_scheduler_configs[0].scheduler.base_lrs == pytest.approx([0.05, 0.4])
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
