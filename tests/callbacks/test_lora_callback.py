import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft import LoRA, PEFTMixin, count_parameters, load_adapter_checkpoint
from lightning_peft.core import peft_state
from lightning_peft.methods.lora import LoRALinear
from tests.callbacks.helpers import TinyLM, TinyLMConfigureModel, full_loss, tensor_bytes, token_data

REPO = Path(__file__).resolve().parents[2]


def trainer(tmp_path, callbacks, **kw):
    kw.setdefault("max_steps", 12)
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=callbacks, enable_checkpointing=kw.pop("enable_checkpointing", False), **kw,
    )


@pytest.mark.parametrize("module_cls", [TinyLM, TinyLMConfigureModel])
@pytest.mark.parametrize("opt", ["all", "trainable"])
def test_fit_trains_adapters_and_leaves_base_frozen(tmp_path, module_cls, opt):
    L.seed_everything(0)
    module = module_cls(opt=opt)
    if module.model is None:
        module.configure_model()
    base = {k: v.clone() for k, v in module.state_dict().items()}
    loss0 = full_loss(module)
    if module_cls is TinyLMConfigureModel:
        module = module_cls(opt=opt)  # the Trainer builds it
    cb = LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    trainer(tmp_path, [cb]).fit(module)
    assert len(cb.injected) == 4 and all(isinstance(module.model.get_submodule(n[len("model."):]), LoRALinear) for n in cb.injected)
    after = module.state_dict()
    for k, v in base.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)  # base untouched
    assert all(p.requires_grad == ("lora_" in n) for n, p in module.named_parameters())
    assert full_loss(module) < loss0 - 0.3
    assert len(module.trainer.optimizers[0].param_groups[0]["params"]) == (
        len(list(module.parameters())) if opt == "all" else 8
    )


@pytest.mark.parametrize("weights_only", [False, True])
def test_checkpoints_hold_the_adapter_only(tmp_path, weights_only):
    L.seed_everything(0)
    module = TinyLM()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_weights_only=weights_only, save_last=True)
    cb = LoRA(r=4, alpha=8, target_modules="all-linear")
    trainer(tmp_path, [cb, ckpt_cb], max_steps=4, enable_checkpointing=True).fit(module)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    adapter = count_parameters(module).adapter_bytes
    opt_state = 0 if weights_only else tensor_bytes(module.trainer.optimizers[0].state_dict()["state"])
    assert tensor_bytes(ckpt) <= 1.05 * (adapter + opt_state), (tensor_bytes(ckpt), adapter, opt_state)
    assert ckpt["lightning_peft"]["methods"][0]["r"] == 4
    assert tensor_bytes(ckpt["state_dict"]) == adapter


def _lora_weights(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "lora_" in k}


def test_resume_is_exact(tmp_path):
    def run(max_epochs, ckpt_path=None, **kw):
        L.seed_everything(0)
        module = TinyLM()
        cbs = [LoRA(r=4, alpha=8, target_modules="all-linear"), ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1)]
        t = trainer(tmp_path, cbs, max_epochs=max_epochs, max_steps=-1, enable_checkpointing=True)
        t.fit(module, ckpt_path=ckpt_path)
        return module

    straight = run(max_epochs=3)
    run(max_epochs=1)  # 4 steps, checkpoint at the end of epoch 0
    resumed = run(max_epochs=3, ckpt_path=tmp_path / "ck" / "epoch=0-step=4.ckpt")
    a, b = _lora_weights(straight), _lora_weights(resumed)
    assert a.keys() == b.keys() and len(a) == 28
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    assert resumed.trainer.global_step == 12

    # a fresh module (base from its own source) + the checkpoint = the trained model
    fresh = TinyLM()
    load_adapter_checkpoint(fresh, tmp_path / "ck" / "epoch=2-step=12.ckpt")
    ids = token_data(4)
    straight.eval(), fresh.eval()
    torch.testing.assert_close(fresh(ids), straight(ids), rtol=0, atol=0)


def _ckpt(tmp_path, **lora):
    L.seed_everything(0)
    t = trainer(tmp_path, [LoRA(**lora)], max_steps=2)
    t.fit(TinyLM())
    path = tmp_path / "a.ckpt"
    t.save_checkpoint(path)
    return path


@pytest.mark.parametrize(
    "resume_with, match",
    [
        ({"r": 8, "target_modules": ["q_proj"]}, r"lora_a\.default: checkpoint shape \[4, 32\], model shape \[8, 32\]"),
        ({"r": 4, "alpha": 16.0, "target_modules": ["q_proj"]}, r"lora setting alpha: checkpoint 8.0, now 16.0"),
        ({"r": 4, "target_modules": ["q_proj", "k_proj"]}, r"missing model\.model\.layers\.0\.self_attn\.k_proj\.lora_a\.default \(expected shape \[4, 32\]\)"),
    ],
)
def test_resume_with_other_settings_names_keys_and_shapes(tmp_path, resume_with, match):
    path = _ckpt(tmp_path, r=4, alpha=8, target_modules=["q_proj"])
    resume_with.setdefault("alpha", 8)
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, [LoRA(**resume_with)], max_steps=4).fit(TinyLM(), ckpt_path=path)


def test_resume_fewer_targets_names_unexpected_keys(tmp_path):
    path = _ckpt(tmp_path, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"unexpected model\.model\.layers\.0\.self_attn\.v_proj\.lora_a\.default"):
        trainer(tmp_path, [LoRA(r=4, alpha=8, target_modules=["q_proj"])], max_steps=4).fit(TinyLM(), ckpt_path=path)


def _snapshot(module):
    return [(n, type(m)) for n, m in module.named_modules()], {n: p.requires_grad for n, p in module.named_parameters()}


def test_two_lora_callbacks_are_refused_and_module_unchanged(tmp_path):
    module = TinyLM()
    before = _snapshot(module)
    with pytest.raises(ValueError, match="Two LoRA callbacks are attached"):
        trainer(tmp_path, [LoRA(target_modules=["q_proj"]), LoRA(target_modules=["v_proj"])]).fit(module)
    assert _snapshot(module) == before


def test_lora_callbacks_with_their_own_adapter_names_add_one_adapter_each(tmp_path):
    from lightning_peft import adapter_names

    module = TinyLM()
    trainer(tmp_path, [LoRA(target_modules=["q_proj"], adapter_name="a"), LoRA(target_modules=["q_proj"], adapter_name="b")], max_steps=2).fit(module)
    assert adapter_names(module) == ["a", "b"]
    assert [m.get("adapter_name") for m in peft_state(module)["methods"]] == ["a", "b"]
    other = TinyLM()
    before = _snapshot(other)
    with pytest.raises(ValueError, match=r"Two LoRA callbacks are attached to this Trainer, both for the adapter named 'a'.*give each its own adapter_name"):
        trainer(tmp_path, [LoRA(target_modules=["q_proj"], adapter_name="a"), LoRA(target_modules=["v_proj"], adapter_name="a")]).fit(other)
    assert _snapshot(other) == before


def test_callback_on_an_already_wrapped_model_is_refused(tmp_path):
    module = TinyLM()
    LoRA(target_modules=["q_proj"]).inject(module)
    before = _snapshot(module)
    with pytest.raises(ValueError, match="already carry a LoRA adapter named 'default'"):
        trainer(tmp_path, [LoRA(target_modules=["q_proj"])]).fit(module)
    assert _snapshot(module) == before


def test_bad_target_leaves_module_unchanged(tmp_path):
    module = TinyLM()
    before = _snapshot(module)
    with pytest.raises(ValueError, match=r"matched no module of TinyLM\. Candidate module names: \[.*q_proj"):
        trainer(tmp_path, [LoRA(target_modules=["query"])]).fit(module)
    assert _snapshot(module) == before


def test_trainable_modules_train_and_are_saved(tmp_path):
    module = TinyLM()
    head0 = module.model.lm_head.weight.detach().clone()
    cb = LoRA(r=2, target_modules=["q_proj"], trainable_modules=["lm_head"])
    t = trainer(tmp_path, [cb], max_steps=3)
    t.fit(module)
    assert not torch.equal(module.model.lm_head.weight, head0)
    t.save_checkpoint(tmp_path / "x.ckpt")
    keys = set(torch.load(tmp_path / "x.ckpt", weights_only=False)["state_dict"])
    assert "model.lm_head.weight" in keys and all("lora_" in k or k == "model.lm_head.weight" for k in keys)
    counts = count_parameters(module)
    assert counts.changed == module.model.lm_head.weight.numel()
    assert counts.trainable == counts.added + counts.changed


def test_validate_after_fit_reuses_the_adapters(tmp_path):
    module = TinyLM()
    cb = LoRA(r=2, target_modules=["q_proj"])
    t = trainer(tmp_path, [cb], max_steps=2)
    t.fit(module)
    t.validate(module, verbose=False)
    assert sum(isinstance(m, LoRALinear) for m in module.modules()) == 2


def test_reusing_a_callback_on_another_module_is_refused(tmp_path):
    cb = LoRA(r=2, target_modules=["q_proj"])
    trainer(tmp_path, [cb], max_steps=1).fit(TinyLM())
    other = TinyLM()
    before = _snapshot(other)
    with pytest.raises(RuntimeError, match="already injected adapters into another model.*one callback per model"):
        trainer(tmp_path, [cb], max_steps=1).fit(other)
    assert _snapshot(other) == before


class MixinLM(PEFTMixin, TinyLM):
    def __init__(self, r: int = 4):
        super().__init__()
        self.apply_peft(LoRA(r=r, alpha=8, target_modules="all-linear"))


def test_mixin_trains_checkpoints_adapter_only_and_resumes(tmp_path):
    L.seed_everything(0)
    module = MixinLM()
    loss0 = full_loss(module)
    t = trainer(tmp_path, [], max_steps=8)
    t.fit(module)
    assert full_loss(module) < loss0 - 0.3
    t.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    fresh = MixinLM()
    trainer(tmp_path, [], max_steps=9).fit(fresh, ckpt_path=tmp_path / "m.ckpt")
    with pytest.raises(ValueError, match=r"checkpoint shape \[4, 32\], model shape \[2, 32\]"):
        trainer(tmp_path, [], max_steps=9).fit(MixinLM(r=2), ckpt_path=tmp_path / "m.ckpt")
    with pytest.raises(TypeError, match="takes lightning-peft methods"):
        module.apply_peft(torch.nn.Linear(2, 2))


def test_save_dir_writes_a_peft_adapter_that_hf_peft_loads(tmp_path):
    peft = pytest.importorskip("peft")
    module = TinyLM()
    trainer(tmp_path, [LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"], save_dir=str(tmp_path / "adapter"))], max_steps=3).fit(module)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    from tests.conftest import tiny_llama

    theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "adapter").eval()
    ids = token_data(2)
    module.eval()
    torch.testing.assert_close(theirs(ids).logits, module(ids), atol=1e-5, rtol=0)


@pytest.mark.timeout(300)
def test_ddp_on_cpu_two_processes(tmp_path):
    """Trainer(strategy="ddp", accelerator="cpu", devices=2): training works, checkpoints stay adapter-only."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "scripts" / "ddp_lora.py"), str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert "DDP_OK" in proc.stdout
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == set(ckpt["state_dict"])
    for k, v in rank0.items():  # both processes hold the same adapter, equal to the checkpoint's
        torch.testing.assert_close(rank1[k], v, rtol=0, atol=0)
        torch.testing.assert_close(ckpt["state_dict"][k], v, rtol=0, atol=0)
