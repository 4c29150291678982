import pytest
import torch

from lightning_peft.callbacks.selective import Selective
from lightning_peft.core import count_parameters
from lightning_peft.methods.selective import apply_selective, head_names, select_parameters
from tests.methods.sst2_helpers import minilm_classifier, sst2_batch, tiny_decoder, train_losses


def _blocks_of(names, prefix):
    return sorted({int(n[len(prefix):].split(".")[0]) for n in names if n.startswith(prefix)})


def test_default_trains_the_top_two_blocks_and_the_head(minilm_path):
    model = minilm_classifier(minilm_path)
    cb = Selective()
    cb.inject(model)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert _blocks_of(trained, "bert.encoder.layer.") == [4, 5]
    assert {"classifier.weight", "classifier.bias"} <= set(trained)
    assert all(n.startswith(("bert.encoder.layer.4.", "bert.encoder.layer.5.", "classifier.")) for n in trained)
    counts = count_parameters(model)
    assert counts.added == 0 and counts.changed == counts.trainable == sum(model.get_parameter(n).numel() for n in trained)


@pytest.mark.parametrize("family, prefix", [("llama", "model.layers."), ("gpt2", "transformer.h."), ("qwen2", "model.layers.")])
def test_default_on_decoders_and_tied_heads(family, prefix):
    model = tiny_decoder(family)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    Selective().inject(model)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)  # nothing added
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert _blocks_of(trained, prefix) == [0, 1]  # the tiny models have 2 blocks
    # GPT-2's lm_head is the (tied) input embedding matrix: not a task head
    assert ("lm_head.weight" in trained) == (family != "gpt2") and head_names(model) == ([] if family == "gpt2" else ["lm_head"])
    model(ids, labels=ids).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trained


def test_pattern_forms(minilm_path):
    model = minilm_classifier(minilm_path)
    sel = lambda *p: select_parameters(model, list(p))  # noqa: E731
    assert _blocks_of(sel("bottom:2"), "bert.encoder.layer.") == [0, 1]
    assert _blocks_of(sel("blocks:1-3"), "bert.encoder.layer.") == [1, 2, 3]
    assert _blocks_of(sel("blocks:5"), "bert.encoder.layer.") == [5]
    norms = sel("type:LayerNorm")
    assert len(norms) == 2 * 13 and all(n.endswith(("LayerNorm.weight", "LayerNorm.bias")) for n in norms)
    assert sel("LayerNorm") == norms  # by module name too
    assert sel("param:.*attention\\.self\\.query\\.weight") == [f"bert.encoder.layer.{i}.attention.self.query.weight" for i in range(6)]
    assert sel("classifier", "pooler.dense") == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias", "classifier.weight"]
    assert sel("bias") == [n for n, _ in sorted(model.named_parameters()) if n.endswith("bias")]


def test_patterns_that_match_nothing_are_all_named_and_model_unchanged(minilm_path):
    model = minilm_classifier(minilm_path)
    with pytest.raises(ValueError, match=r"(?s)2 pattern\(s\) matched nothing in BertForSequenceClassification.*'top:9': out of range, the model has 6 blocks.*'type:RMSNorm': no module class matches; classes with parameters: \[.*'LayerNorm'"):
        Selective(train=["top:9", "head", "type:RMSNorm"]).inject(model)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=r"'q_proj': no module or parameter has that name.*'query'"):
        apply_selective(model, ["q_proj"])
    with pytest.raises(ValueError, match=r"(?s)unfreeze_schedule\[1\].*'blocks:7': out of range"):
        Selective(train=["head"], unfreeze_schedule={1: ["blocks:7"]}).inject(model)
    with pytest.raises(ValueError, match=r"'head': no task head found"):
        apply_selective(tiny_decoder("gpt2"), ["head"])


@pytest.mark.parametrize("kwargs, err, match", [
    ({"train": []}, ValueError, r"train=\[\] selects nothing"),
    ({"train": "top:2"}, TypeError, r"train must be a list of patterns, got str"),
    ({"train": ["top:0"]}, ValueError, r"'top:0' \(K must be a positive integer"),
    ({"train": ["blocks:3-1"]}, ValueError, r"'blocks:3-1' \(expected 'blocks:I-J' with I <= J"),
    ({"train": ["type:("]}, ValueError, r"'type:\(' \(not a valid regular expression"),
    ({"unfreeze_schedule": {-1: ["head"]}}, ValueError, r"keys are epochs \(integers >= 0\), got -1"),
    ({"unfreeze_lr_factor": 0}, ValueError, r"unfreeze_lr_factor must be > 0, got 0"),
])
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        Selective(**kwargs)


def test_learning_on_sst2_with_minilm(minilm_path, shared_data):
    torch.manual_seed(0)
    model = minilm_classifier(minilm_path)
    batch = sst2_batch(minilm_path, shared_data)
    Selective(train=["top:1"]).inject(model)  # the last block only: the random head stays frozen
    losses = train_losses(model, batch, steps=20, lr=1e-3)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
