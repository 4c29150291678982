"""A method that is not in the package: a per-output-feature scale on linear layers, ``y = s * (W x) + b``, defined in
this file only (a layer on :class:`LinearAdapter`, a callback on :class:`PEFTCallback`; registering is defining the
class). With no edit to any package file it goes through the callback, a LightningCLI run, adapter-only
checkpoints and exact resume, ``load_adapter_checkpoint``, typed counts, merge/unload, and a 4-bit base
(issue 23: the proof that a new method costs one file).
"""

from typing import Optional, Union

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import PEFTCallback, count_parameters, load_adapter_checkpoint, merge_adapters, unload
from lightning_peft.methods._linear import LinearAdapter
from lightning_peft.targeting import find_targets, linear_types
from tests.callbacks.helpers import TinyLM, token_data


# -- the method: one layer, one callback -------------------------------------------------------------------
class RowScaleLinear(LinearAdapter):
    """``y = s * (x W^T) + b`` with one learned scale per output feature (``rowscale_s``, initialised to ``init``)."""

    adapter_prefix = "rowscale_"

    def __init__(self, base: nn.Module, init: float = 1.0) -> None:
        super().__init__(base)
        self.rowscale_s = nn.Parameter(torch.full((self.out_features,), init, dtype=self.adapter_dtype, device=self.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # the scale is in the weight; disabled: take it back out
            return self._unmerged_forward(x) if self.disabled else self.base_forward(x)
        out = self.base_forward(x)
        if self.disabled:
            return out
        bias = self.bias.to(out.dtype) if self.bias is not None else 0.0
        return (out - bias) * self.rowscale_s.to(out.dtype) + bias

    def _unmerged_forward(self, x):  # merged but disabled: the base alone
        out = self.base_forward(x)
        bias = self.bias.to(out.dtype) if self.bias is not None else 0.0
        return (out - bias) / self.rowscale_s.to(out.dtype) + bias

    def _scale(self) -> torch.Tensor:
        s = self.rowscale_s.detach().float()
        return s.view(1, -1) if self.fan_in_fan_out else s.view(-1, 1)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            merged = self.dense_weight() * self._scale()
            self._check_finite(merged, "this row scale")
            self._write_weight(merged, "the row-scale merge")
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._write_weight(self.dense_weight() / self._scale(), "the row-scale unmerge")
            self.merged = False


class RowScale(PEFTCallback):
    """Learn one scale per output feature of the target linear layers."""

    method_name = "rowscale_test"

    def __init__(
        self,
        init: float = 1.0,
        target_modules: Union[str, list[str]] = "all-linear",
        exclude_modules: Optional[Union[str, list[str]]] = None,
        trainable_modules: Optional[list[str]] = None,
        save_dir: Optional[str] = None,
    ) -> None:
        super().__init__(target_modules, exclude_modules, trainable_modules, save_dir)
        self.init = init

    def _inject(self, module: nn.Module) -> list[str]:
        names = find_targets(module, self.target_modules, self.exclude_modules, supported=linear_types(), method="RowScale")
        new = {n: RowScaleLinear(module.get_submodule(n), self.init) for n in names}
        for name, layer in new.items():
            module.set_submodule(name, layer)
        return names


class TinyData(L.LightningDataModule):
    """TinyLM's data as a DataModule, for the CLI."""

    def train_dataloader(self):
        return DataLoader(TensorDataset(token_data(16)), batch_size=4, shuffle=False)


# -- the generic features ------------------------------------------------------------------------------------
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _trainer(tmp_path, callbacks, **kw):
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=callbacks, **kw,
    )


def _logits(module):
    with torch.no_grad():
        return module.eval()(token_data(4)).float()


def _scales(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if "rowscale_" in n}


def test_the_callback_trains_it_and_counts_are_typed(tmp_path):
    module = TinyLM(lr=5e-2)
    cb = RowScale(init=1.0, target_modules=TARGETS)
    before = _logits(module)
    _trainer(tmp_path, [cb], max_steps=8, enable_checkpointing=False).fit(module)
    layers = [m for m in module.modules() if isinstance(m, RowScaleLinear)]
    assert len(layers) == 6 and all(not torch.equal(m.rowscale_s, torch.ones_like(m.rowscale_s)) for m in layers)
    assert not torch.equal(_logits(module), before)
    counts = count_parameters(module)
    assert counts.added == counts.trainable == sum(m.out_features for m in layers) and counts.changed == 0
    assert all(p.requires_grad == ("rowscale_" in n) for n, p in module.named_parameters())


def test_checkpoints_hold_it_resume_exactly_and_load_adapter_checkpoint_reinjects_it(tmp_path):
    L.seed_everything(0)
    whole = TinyLM(lr=5e-2)
    _trainer(tmp_path / "whole", [RowScale(target_modules=TARGETS)], max_steps=8, enable_checkpointing=False).fit(whole)

    L.seed_everything(0)
    first = TinyLM(lr=5e-2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4, save_last=True)
    _trainer(tmp_path / "a", [RowScale(target_modules=TARGETS), ckpt], max_steps=4).fit(first)
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert saved["state_dict"] and all("rowscale_" in k for k in saved["state_dict"])  # adapter only
    assert saved["lightning_peft"]["methods"][0]["method"] == "rowscale_test"

    resumed = TinyLM(lr=5e-2)
    _trainer(tmp_path / "b", [RowScale(target_modules=TARGETS)], max_steps=8, enable_checkpointing=False).fit(
        resumed, ckpt_path=tmp_path / "ck" / "last.ckpt")
    a, b = _scales(whole), _scales(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise, optimizer state included

    fresh = load_adapter_checkpoint(TinyLM(), tmp_path / "ck" / "last.ckpt")  # re-injected from the record
    torch.testing.assert_close(_logits(fresh), _logits(first), rtol=0, atol=0)


def test_merge_and_unload_keep_the_outputs():
    module = RowScale(target_modules=TARGETS).inject(TinyLM())
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "rowscale_" in n:
                p.uniform_(0.5, 1.5)
    expected = _logits(module)
    merge_adapters(module)
    torch.testing.assert_close(_logits(module), expected, atol=1e-5, rtol=1e-5)
    plain = unload(module, merge=True)
    assert not any(isinstance(m, RowScaleLinear) for m in plain.modules())
    torch.testing.assert_close(_logits(plain), expected, atol=1e-5, rtol=1e-5)


def test_it_trains_on_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from lightning_peft import QLoRAPrecision
    from lightning_peft.quant import is_quantized

    module = TinyLM(lr=5e-2)
    trainer = _trainer(tmp_path, [RowScale(target_modules=TARGETS)], plugins=[QLoRAPrecision("nf4")], max_steps=4,
                       enable_checkpointing=False)
    trainer.fit(module)
    layers = [m for m in module.modules() if isinstance(m, RowScaleLinear)]
    assert all(is_quantized(m.weight) and m.rowscale_s.dtype == torch.float32 for m in layers)
    assert any(not torch.equal(m.rowscale_s, torch.ones_like(m.rowscale_s)) for m in layers)


def test_a_lightning_cli_run_takes_it_from_the_command_line(tmp_path):
    from lightning_peft.cli import main

    main([
        "fit", "--model=tests.callbacks.helpers.TinyLM", "--data=tests.test_new_method.TinyData",
        "--trainer.callbacks+=tests.test_new_method.RowScale", "--trainer.callbacks.init_args.init=0.5",
        "--trainer.callbacks.init_args.target_modules=[q_proj, v_proj]", "--trainer.max_steps=2", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", f"--trainer.callbacks.init_args.dirpath={tmp_path / 'ck'}",
    ])
    saved = torch.load(next((tmp_path / "ck").glob("*.ckpt")), weights_only=True)
    (record,) = saved["lightning_peft"]["methods"]
    assert record["method"] == "rowscale_test" and record["init"] == 0.5 and record["target_modules"] == ["q_proj", "v_proj"]
    with pytest.raises(SystemExit):  # typed from the annotation, strictly: a string is not a float
        main(["fit", "--model=tests.callbacks.helpers.TinyLM", "--data=tests.test_new_method.TinyData",
              "--trainer.callbacks+=tests.test_new_method.RowScale", "--trainer.callbacks.init_args.init=big",
              "--trainer.max_steps=1"])


def test_save_dir_for_a_method_without_a_file_format_fails_before_training(tmp_path):
    module = TinyLM()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = _trainer(tmp_path, [RowScale(target_modules=TARGETS, save_dir=str(tmp_path / "adapter"))], max_steps=4,
                       enable_checkpointing=False)
    with pytest.raises(NotImplementedError, match=r"RowScale\(save_dir=.*\) cannot write this adapter: No Hugging Face PEFT "
                                                  r"format for .*\['RowScaleLinear'\].*Training was not started"):
        trainer.fit(module)
    assert trainer.global_step == 0 and not (tmp_path / "adapter").exists()
    after = module.state_dict()
    assert after.keys() == before.keys() and not any(isinstance(m, RowScaleLinear) for m in module.modules())  # rolled back
