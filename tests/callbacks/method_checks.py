"""Shared checks for the method callbacks: fit on a tiny Llama, adapter-only checkpoints, exact resume."""

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft import count_parameters, load_adapter_checkpoint
from tests.callbacks.helpers import TinyLM, full_loss, token_data


def trainer(tmp_path, callbacks, **kw):
    kw.setdefault("max_steps", 12)
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=callbacks, enable_checkpointing=kw.pop("enable_checkpointing", False), **kw,
    )


def check_fit(tmp_path, make_callback, is_trained, module_cls=TinyLM, min_drop=0.1, **module_kw):
    """Fit changes exactly the parameters ``is_trained(name)`` selects, and the loss goes down."""
    L.seed_everything(0)
    module = module_cls(**module_kw)
    if module.model is None:
        module.configure_model()
    base = {k: v.clone() for k, v in module.state_dict().items()}
    loss0 = full_loss(module)
    if module_cls is not TinyLM:
        module = module_cls(**module_kw)
    cb = make_callback()
    trainer(tmp_path, [cb]).fit(module)
    after = module.state_dict()
    for k, v in base.items():
        if not is_trained(k):
            torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    trained = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trained and all(is_trained(n) for n in trained), trained
    assert full_loss(module) < loss0 - min_drop, (full_loss(module), loss0)
    return module, cb


def check_checkpoint_and_resume(tmp_path, make_callback, is_saved, steps_per_epoch=4, module_cls=TinyLM, **module_kw):
    """Checkpoints hold only what ``is_saved`` selects; resuming is exact; a fresh module + the checkpoint
    equals the trained module."""

    def run(max_epochs, ckpt_path=None):
        L.seed_everything(0)
        module = module_cls(**module_kw)
        cbs = [make_callback(), ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1)]
        trainer(tmp_path, cbs, max_epochs=max_epochs, max_steps=-1, enable_checkpointing=True).fit(module, ckpt_path=ckpt_path)
        return module

    straight = run(max_epochs=3)
    run(max_epochs=1)
    resumed = run(max_epochs=3, ckpt_path=tmp_path / "ck" / f"epoch=0-step={steps_per_epoch}.ckpt")
    last = tmp_path / "ck" / f"epoch=2-step={3 * steps_per_epoch}.ckpt"
    ckpt = torch.load(last, weights_only=False)
    keys = set(ckpt["state_dict"])
    assert keys and all(is_saved(k) for k in keys), sorted(keys)[:10]
    counts = count_parameters(straight)
    saved_bytes = sum(v.numel() * v.element_size() for v in ckpt["state_dict"].values())
    assert saved_bytes == counts.adapter_bytes
    a = {k: v for k, v in straight.state_dict().items() if k in keys}
    b = {k: v for k, v in resumed.state_dict().items() if k in keys}
    for k in keys:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    fresh = module_cls(**module_kw)
    load_adapter_checkpoint(fresh, last)
    ids = token_data(4)
    straight.eval(), fresh.eval()
    torch.testing.assert_close(fresh(ids), straight(ids), rtol=0, atol=0)
    return ckpt


class TinyGPT2LM(TinyLM):
    """TinyLM on a tiny GPT-2 (which has biases, unlike Llama)."""

    def build(self):
        from tests.methods.sst2_helpers import tiny_decoder

        return tiny_decoder("gpt2").train()
