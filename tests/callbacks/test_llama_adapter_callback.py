import json

import pytest
import torch

from lightning_peft import LlamaAdapter, count_parameters, disable_adapters
from lightning_peft.methods.llama_adapter import LlamaAdapterAttention
from tests.callbacks.helpers import TinyLM, TinyLMConfigureModel, token_data
from tests.callbacks.method_checks import TinyGPT2LM, check_checkpoint_and_resume, check_fit, trainer
from tests.conftest import REPO, tiny_llama


def _is_adapter(name: str) -> bool:
    return name.endswith(("adaption_prompt", "adaption_gate"))


@pytest.mark.parametrize("module_cls", [TinyLM, TinyLMConfigureModel])
def test_fit_with_no_arguments_trains_prompts_and_gates_only(tmp_path, module_cls):
    module, cb = check_fit(tmp_path, LlamaAdapter, _is_adapter, module_cls=module_cls, lr=5e-2)
    assert cb.injected == ["model.model.layers.0.self_attn", "model.model.layers.1.self_attn"]
    layers = [m for m in module.modules() if isinstance(m, LlamaAdapterAttention)]
    assert len(layers) == 2 and all(m.adapter_len == 10 for m in layers)
    assert all(m.adaption_gate.item() != 0 for m in layers)  # the gates opened during training
    counts = count_parameters(module)
    assert counts.trainable == counts.added == 2 * (10 * 32 + 1) and counts.changed == 0
    ids = token_data(2)
    module.eval()
    with disable_adapters(module):
        torch.testing.assert_close(module(ids), tiny_llama(seed=0)(input_ids=ids).logits, rtol=0, atol=0)


def test_checkpoint_holds_prompts_and_gates_and_resume_is_exact(tmp_path):
    ckpt = check_checkpoint_and_resume(tmp_path, lambda: LlamaAdapter(adapter_len=4, adapter_layers=1), _is_adapter)
    assert sorted(ckpt["state_dict"]) == ["model.model.layers.1.self_attn.adaption_gate", "model.model.layers.1.self_attn.adaption_prompt"]
    assert ckpt["lightning_peft"]["methods"][0] == {"method": "llama_adapter", "adapter_len": 4, "adapter_layers": 1, "trainable_modules": []}


def test_resume_with_other_settings_names_the_keys(tmp_path):
    t = trainer(tmp_path, [LlamaAdapter(adapter_len=4)], max_steps=2)
    t.fit(TinyLM())
    t.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match=r"model\.model\.layers\.0\.self_attn\.adaption_prompt: checkpoint shape \[1, 4, 32\], model shape \[1, 6, 32\]"):
        trainer(tmp_path, [LlamaAdapter(adapter_len=6)], max_steps=4).fit(TinyLM(), ckpt_path=tmp_path / "a.ckpt")


def test_save_dir_loads_in_hf_peft_with_equal_logits(tmp_path):
    peft = pytest.importorskip("peft")
    module = TinyLM(lr=5e-2)
    trainer(tmp_path, [LlamaAdapter(adapter_len=5, save_dir=str(tmp_path / "adapter"))], max_steps=4).fit(module)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "adapter").eval()
    ids = token_data(2)
    module.eval()
    torch.testing.assert_close(theirs(ids).logits, module(ids), atol=1e-5, rtol=0)


def test_gpt2_module_is_refused_at_setup(tmp_path):
    with pytest.raises(ValueError, match=r"LLaMA-Adapter does not support TinyGPT2LM: .*q_proj/k_proj/v_proj/o_proj"):
        trainer(tmp_path, [LlamaAdapter()], max_steps=1).fit(TinyGPT2LM())


def test_config_runs_from_the_cli_on_alpaca(tmp_path, shared_data, minilm_path, monkeypatch):
    from lightning_peft.cli import main

    monkeypatch.chdir(REPO)
    alpaca = shared_data / "instructions" / "alpaca_data_1k_sample.json"
    main([
        "fit", "--config", "configs/llama_adapter.yaml", f"--data.init_args.train_file={alpaca}",
        "--trainer.max_steps=3", "--data.init_args.max_rows=40", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.callbacks.init_args.save_dir={tmp_path / 'adapter'}", "--trainer.enable_progress_bar=false",
    ])
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["adapter_len"], config["adapter_layers"]) == ("ADAPTION_PROMPT", 10, 2)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
