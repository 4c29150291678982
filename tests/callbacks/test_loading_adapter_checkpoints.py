"""Lightning's own ways to load a checkpoint, given an adapter-only one (issue 22, points 7 and 8).

``trainer.validate(ckpt_path=...)`` with the PEFT callback, ``load_from_checkpoint`` of a ``PEFTMixin`` module (the
task modules are ones) and ``validate`` without the callback load the adapter; resuming ``fit`` without the callback
says what is missing instead of torch's list of every missing base weight.
"""

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft import LoRA, PEFTMixin
from lightning_peft.cli import main
from lightning_peft.methods.lora import LoRALinear
from tests.callbacks.helpers import TinyLM, token_data


class MixinLM(PEFTMixin, TinyLM):
    """Declares no adapter itself: a PEFT callback adds it (as with the task modules)."""


class MixinLMWithLoRA(PEFTMixin, TinyLM):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.apply_peft(LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))


def _trainer(tmp_path, callbacks, **kw):
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=callbacks, **kw,
    )


def _train(tmp_path, module, callbacks=()):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, [*callbacks, ckpt], max_steps=4).fit(module)
    return tmp_path / "ckpt" / "last.ckpt"


def _logits(module):
    with torch.no_grad():
        return module.eval()(token_data(4))


def _no_key_warnings(record):
    return [str(w.message)[:120] for w in record if "keys" in str(w.message)]


def test_validate_with_the_callback_loads_an_adapter_only_checkpoint(tmp_path):
    trained = TinyLM()
    ckpt = _train(tmp_path, trained, [LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"])])
    fresh = TinyLM()
    (result,) = _trainer(tmp_path, [LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"])]).validate(fresh, ckpt_path=ckpt)
    (expected,) = _trainer(tmp_path, []).validate(trained)
    assert result["val_loss"] == pytest.approx(expected["val_loss"], abs=1e-6)
    torch.testing.assert_close(_logits(fresh), _logits(trained), rtol=0, atol=0)


def test_load_from_checkpoint_of_a_mixin_module_injects_the_recorded_adapter_and_loads_it(tmp_path):
    trained = MixinLM()
    ckpt = _train(tmp_path, trained, [LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"])])
    assert trained.model.model.layers[0].self_attn.q_proj.lora_b["default"].abs().sum() > 0
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loaded = MixinLM.load_from_checkpoint(ckpt)
    assert isinstance(loaded.model.model.layers[0].self_attn.v_proj, LoRALinear)
    torch.testing.assert_close(_logits(loaded), _logits(trained), rtol=0, atol=0)
    assert not _no_key_warnings(record)  # no list of "missing" base weights


def test_load_from_checkpoint_of_a_module_that_applies_peft_itself_lists_no_missing_base_weights(tmp_path):
    trained = MixinLMWithLoRA()
    ckpt = _train(tmp_path, trained)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loaded = MixinLMWithLoRA.load_from_checkpoint(ckpt)
    torch.testing.assert_close(_logits(loaded), _logits(trained), rtol=0, atol=0)
    assert not _no_key_warnings(record)


def test_a_mixin_module_still_reports_a_missing_adapter_parameter(tmp_path):
    module = MixinLMWithLoRA()
    adapter = {k: v for k, v in module.state_dict().items() if "lora_" in k}
    adapter.pop(next(iter(adapter)))
    with pytest.raises(RuntimeError, match=r"missing adapter parameter\(s\) \['model\.model\.layers\.0"):
        module.load_state_dict(adapter)
    full = module.state_dict()
    full.pop("model.model.norm.weight")  # a base weight missing from a dict that holds base weights: reported as ever
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"model\.model\.norm\.weight\""):
        module.load_state_dict(full)


def test_validate_without_the_callback_on_a_mixin_module_uses_the_recorded_adapter(tmp_path):
    trained = MixinLM()
    ckpt = _train(tmp_path, trained, [LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"])])
    fresh = MixinLM()
    _trainer(tmp_path, []).validate(fresh, ckpt_path=ckpt)
    torch.testing.assert_close(_logits(fresh), _logits(trained), rtol=0, atol=0)


def test_resuming_fit_without_the_callback_names_what_is_missing_and_leaves_the_model_alone(tmp_path):
    ckpt = _train(tmp_path, MixinLM(), [LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"])])
    fresh = MixinLM()
    before = [(n, type(m)) for n, m in fresh.named_modules()]
    with pytest.raises(RuntimeError, match=r"holds only a lightning-peft adapter \(lora\).*resume with the same PEFT callback"):
        _trainer(tmp_path, [], max_steps=6).fit(fresh, ckpt_path=ckpt)
    assert [(n, type(m)) for n, m in fresh.named_modules()] == before


def test_the_cli_names_the_missing_callback_for_a_plain_module(tmp_path):
    ckpt = _train(tmp_path, TinyLM(), [LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"])])
    with pytest.raises(ValueError, match=r"holds only a lightning-peft adapter \(lora\), and this run has no PEFT callback"):
        main([
            "fit", "--model=tests.callbacks.helpers.TinyLM", "--data=lightning.pytorch.demos.boring_classes.BoringDataModule",
            f"--ckpt_path={ckpt}", "--trainer.max_steps=6",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
        ])


def test_a_full_checkpoint_of_a_mixin_module_without_adapters_keeps_every_weight(tmp_path):
    trained = MixinLM()  # trained in full: no PEFT callback
    ckpt = _train(tmp_path, trained)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert state.keys() == trained.state_dict().keys()
    torch.testing.assert_close(_logits(MixinLM.load_from_checkpoint(ckpt)), _logits(trained), rtol=0, atol=0)


def test_load_from_checkpoint_refuses_a_tampered_adapter_and_leaves_no_adapter_in(tmp_path):
    ckpt = _train(tmp_path, MixinLM(), [LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"])])
    checkpoint = torch.load(ckpt, weights_only=True)
    key = next(k for k in checkpoint["state_dict"] if "lora_b" in k)
    checkpoint["state_dict"][key] = torch.full_like(checkpoint["state_dict"][key], float("nan"))
    torch.save(checkpoint, tmp_path / "tampered.ckpt")
    with pytest.raises(ValueError, match=rf"{key}: holds NaN or infinite values"):
        MixinLM.load_from_checkpoint(tmp_path / "tampered.ckpt")
    module = MixinLM()  # on_load_checkpoint itself: all or nothing
    with pytest.raises(ValueError, match="holds NaN"):
        module.on_load_checkpoint(checkpoint)
    assert not any(isinstance(m, LoRALinear) for m in module.modules()) and not (module.__dict__.get("_lightning_peft") or {}).get("methods")
    assert all(p.requires_grad for p in module.parameters())  # nothing frozen either


def test_an_ia3_adapter_loaded_from_a_peft_directory_is_recorded_so_its_checkpoints_load_back(tmp_path):
    """load_adapter records the callback settings that re-create the loaded layers (LoRA did; (IA)³ did not, so a
    checkpoint of a loaded (IA)³ adapter could not be loaded back: 'unexpected ia3_l' keys)."""
    from lightning_peft import IA3, load_adapter, load_adapter_checkpoint, save_adapter

    src = IA3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]).inject(MixinLM())
    with torch.no_grad():
        for n, p in src.named_parameters():
            if "ia3_l" in n:
                p.uniform_(0.5, 1.5)
    save_adapter(src, tmp_path / "ia3")
    module = load_adapter(MixinLM(), tmp_path / "ia3", is_trainable=True)
    ckpt = _train(tmp_path, module)  # no callback: the mixin keeps checkpoints adapter-only, with the record
    fresh = load_adapter_checkpoint(MixinLM(), ckpt)
    torch.testing.assert_close(_logits(fresh), _logits(module), rtol=0, atol=0)
    ff = [n for n, m in fresh.named_modules() if getattr(m, "feedforward", False)]
    assert ff and all(n.endswith("down_proj") for n in ff)


def _loaded_and_trained(tmp_path, callback):
    from lightning_peft import load_adapter, save_adapter

    src = callback.inject(MixinLM())
    with torch.no_grad():
        for p in src.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save_adapter(src, tmp_path / "adapter")
    module = load_adapter(MixinLM(), tmp_path / "adapter", is_trainable=True)
    return module, _train(tmp_path, module)  # no callback: the mixin keeps checkpoints adapter-only, with the record


@pytest.mark.parametrize("method", ["prompt_tuning", "llama_adapter"])
def test_soft_prompt_adapters_loaded_from_a_peft_directory_are_recorded_so_their_checkpoints_load_back(tmp_path, method):
    from lightning_peft import LlamaAdapter, PromptTuning, load_adapter_checkpoint

    callback = PromptTuning(num_virtual_tokens=4) if method == "prompt_tuning" else LlamaAdapter(adapter_len=3, adapter_layers=1)
    module, ckpt = _loaded_and_trained(tmp_path, callback)
    assert [m["method"] for m in torch.load(ckpt, weights_only=True)["lightning_peft"]["methods"]] == [method]
    fresh = load_adapter_checkpoint(MixinLM(), ckpt)
    torch.testing.assert_close(_logits(fresh), _logits(module), rtol=0, atol=0)


def test_an_adapter_loaded_folded_from_a_peft_directory_says_to_load_the_directory_first(tmp_path):
    """P-tuning loads folded (no encoder), which the PTuning callback does not make: the checkpoint cannot re-create
    it, and the error gives the way that works, which the test then takes."""
    from lightning_peft import PTuning, load_adapter, load_adapter_checkpoint

    module, ckpt = _loaded_and_trained(tmp_path, PTuning(num_virtual_tokens=4))
    fresh = MixinLM()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=r"unexpected model\.p_tuning\.ptuning_prompt(.|\n)*load that directory into the model first \(load_adapter\)"):
        load_adapter_checkpoint(fresh, ckpt)
    assert fresh.state_dict().keys() == before.keys()
    fresh = load_adapter_checkpoint(load_adapter(MixinLM(), tmp_path / "adapter"), ckpt)
    torch.testing.assert_close(_logits(fresh), _logits(module), rtol=0, atol=0)
