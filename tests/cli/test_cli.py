import contextlib
import io
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


def test_alpaca_prompt_tokens_are_masked_from_the_loss(shared_data, minilm_path):
    """The data the causal-LM config trains on: labels are -100 on every prompt token and on padding."""
    import json

    import torch
    from transformers import AutoTokenizer

    from lightning_peft.tasks import InstructionData, alpaca_prompt

    alpaca = shared_data / "instructions" / "alpaca_data_1k_sample.json"
    dm = InstructionData(train_file=str(alpaca), max_rows=16, val_fraction=0.0, batch_size=16, max_length=512, tokenizer_name_or_path=str(minilm_path))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    tok = AutoTokenizer.from_pretrained(str(minilm_path))
    prompts = {}
    for e in json.loads(alpaca.read_text()):
        p = tok(alpaca_prompt(e["instruction"], e.get("input", "")), add_special_tokens=False)["input_ids"]
        prompts[tuple(p)] = len(p)
    checked = 0
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n = int(mask.sum())
        plen = next(k for p, k in prompts.items() if tuple(ids[:k].tolist()) == p)
        assert (labels[:plen] == -100).all() and (labels[n:] == -100).all()
        assert torch.equal(labels[plen:n], ids[plen:n])
        checked += 1
    assert checked == 16


@pytest.mark.parametrize(("config", "cls", "key", "value"), [
    ("configs/mam_adapter.yaml", "MAMAdapter", "num_virtual_tokens", 30),
    ("configs/unipelt.yaml", "UniPELT", "lora_target_modules", ["query", "value"]),
])
def test_hybrid_configs_parse(config, cls, key, value):
    cfg = yaml.safe_load(_print_config(["fit", "--config", config]))
    (callback,) = cfg["trainer"]["callbacks"]
    assert callback["class_path"].endswith(cls) and callback["init_args"][key] == value


_CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", _CONFIGS)
def test_every_shipped_config_fits_one_step(name, tmp_path, shared_data, minilm_path):
    """Each config in configs/ trains one step and validates with the installed transformers (four of them refused
    every model when transformers 5.24 renamed the cache argument). Causal-LM configs get the Alpaca sample."""
    cfg = yaml.safe_load((REPO / "configs" / name).read_text())
    args = ["fit", "--config", f"configs/{name}", "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false"]
    if cfg["data"]["class_path"].endswith("InstructionData"):
        args += [f"--data.init_args.train_file={shared_data / 'instructions' / 'alpaca_data_1k_sample.json'}", "--data.init_args.max_rows=16"]
    callbacks = [c for c in cfg["trainer"].get("callbacks", []) if "save_dir" in (c.get("init_args") or {})]
    if callbacks:
        args.append(f"--trainer.callbacks.init_args.save_dir={tmp_path / 'adapter'}")
    if name == "adalora.yaml":  # a budget schedule needs steps between its warm-up and final phases
        args += ["--trainer.fast_dev_run=4", "--trainer.callbacks.init_args.tinit=1", "--trainer.callbacks.init_args.tfinal=1"]
    main(args)
    if callbacks:
        # one adapter at the save_dir's root; several named adapters in a folder each (peft's layout)
        named = [c["init_args"]["adapter_name"] for c in cfg["trainer"]["callbacks"] if "adapter_name" in (c.get("init_args") or {})]
        found = sorted(p.parent.relative_to(tmp_path / "adapter").as_posix() for p in (tmp_path / "adapter").rglob("adapter_config.json"))
        assert found == (sorted(named) if len(named) > 1 else ["."]) or any((tmp_path / "adapter").rglob("*.ckpt")), list((tmp_path / "adapter").rglob("*"))


def test_help_names_every_sub_command_and_each_bench_its_own_prog(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert all(cmd in out for cmd in ("fit", "validate", "test", "predict", "export", "bench"))
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and all(name in out for name in ("speed", "quality", "saved-bytes", "precision", "inference"))
    with pytest.raises(SystemExit) as exc:
        main(["bench"])
    assert exc.value.code == 2 and "benchmarks:" in capsys.readouterr().err
    for name in ("speed", "quality", "saved-bytes", "precision", "inference"):
        with pytest.raises(SystemExit):
            main(["bench", name, "--help"])
        assert capsys.readouterr().out.startswith(f"usage: lightning-peft bench {name} "), name


@pytest.mark.parametrize("name", _CONFIGS)
def test_every_shipped_config_keeps_what_it_trains(name):
    """A config writes its adapter: a PEFT-format save_dir, or (for the methods without that format) checkpoints."""
    cfg = yaml.safe_load((REPO / "configs" / name).read_text())
    trainer = cfg["trainer"]
    saves = any("save_dir" in (c.get("init_args") or {}) for c in trainer.get("callbacks", []))
    assert saves or trainer.get("enable_checkpointing") is True, f"{name} trains an adapter and writes nothing"


def test_the_causal_lm_config_validates_and_logs_within_its_steps(tmp_path, shared_data):
    """configs/lora_causal_lm.yaml as shipped (20 steps of a 24-batch epoch) validates and logs before it stops."""
    import csv

    main([
        "fit", "--config", "configs/lora_causal_lm.yaml", f"--data.init_args.train_file={shared_data / 'instructions' / 'alpaca_data_1k_sample.json'}",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false", f"--trainer.callbacks.init_args.save_dir={tmp_path / 'adapter'}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.init_args.save_dir={tmp_path}",
    ])
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    assert any(r["val_loss"] for r in rows) and sum(bool(r["train_loss"]) for r in rows) >= 2
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_a_module_in_the_working_directory_is_importable_by_the_console_script(tmp_path):
    """`lightning-peft fit --model mymodule.MyLit` from the folder holding mymodule.py, without PYTHONPATH=."""
    import os
    import shutil
    import subprocess
    import sys

    (tmp_path / "my_lit_module.py").write_text(
        "import lightning as L\nimport torch\n\n\nclass MyLit(L.LightningModule):\n"
        "    def __init__(self, width: int = 3):\n        super().__init__()\n        self.layer = torch.nn.Linear(width, 1)\n"
    )
    script = shutil.which("lightning-peft") or str(Path(sys.executable).parent / "lightning-peft")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([script, "fit", "--model", "my_lit_module.MyLit", "--model.width", "5", "--print_config"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "class_path: my_lit_module.MyLit" in run.stdout and "width: 5" in run.stdout


def test_a_distributed_run_closes_its_process_group(tmp_path, minilm_path):
    """After `fit` under DDP the CLI closes the process group Lightning opened (a gloo group alive at interpreter
    exit can abort a finished run with SIGABRT). One process (DDP, devices=1) so it runs in-process."""
    import torch.distributed as dist

    main(["fit", "--config", "configs/quickstart.yaml", "--trainer.fast_dev_run=1", "--trainer.strategy=ddp",
          "--trainer.devices=1", "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}",
          f"--trainer.callbacks.init_args.save_dir={tmp_path / 'adapter'}", "--trainer.enable_progress_bar=false"])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not dist.is_initialized()
