import contextlib
import io
import os
from pathlib import Path

import pytest
import yaml

from lightning_peft.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def _print_config(args):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exc:
        main(args + ["--print_config"])
    assert exc.value.code in (0, None)
    return buf.getvalue()


def test_print_config_round_trips(tmp_path, minilm_path):
    first = _print_config(["fit", "--config", "configs/quickstart.yaml", "--trainer.callbacks.init_args.r=4"])
    cfg = yaml.safe_load(first)
    assert cfg["trainer"]["callbacks"][0]["class_path"] == "lightning_peft.LoRA"
    assert cfg["trainer"]["callbacks"][0]["init_args"]["r"] == 4
    (tmp_path / "printed.yaml").write_text(first)
    assert _print_config(["fit", "--config", str(tmp_path / "printed.yaml")]) == first


def test_unknown_callback_argument_names_the_key(minilm_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/quickstart.yaml", "--trainer.callbacks.init_args.rank=4"])
    assert "rank" in capsys.readouterr().err


def test_causal_lm_config_runs_end_to_end_on_alpaca(tmp_path, shared_data, minilm_path):
    alpaca = shared_data / "instructions" / "alpaca_data_1k_sample.json"
    main([
        "fit", "--config", "configs/lora_causal_lm.yaml", f"--data.init_args.train_file={alpaca}",
        "--trainer.max_steps=3", "--data.init_args.max_rows=40", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.callbacks.init_args.save_dir={tmp_path / 'adapter'}", "--trainer.enable_progress_bar=false",
    ])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not any("alpaca" in p.name for p in (REPO / "lightning_peft").rglob("*"))  # the package ships no Alpaca data
