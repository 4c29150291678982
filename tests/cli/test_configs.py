"""Configs that work from anywhere (#26): shipped configs by name, input paths read from the config's folder.

The console-script tests run ``lightning-peft`` in a subprocess from an empty folder, as a user would after
``pip install``; the rest call the functions, or ``main`` with ``--print_config``, in-process.
"""

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch import Callback

from lightning_peft.cli import SHIPPED_CONFIGS, main, resolve_config_arg, resolve_config_paths, shipped_configs
from tests.conftest import REPO, require_shared_data

PACKAGE_DATA = REPO / "lightning_peft" / "data"
_CONFIGS = shipped_configs()
_CAUSAL_LM = [n for n in _CONFIGS if yaml.safe_load((SHIPPED_CONFIGS / f"{n}.yaml").read_text())["data"]["class_path"].endswith("InstructionData")]


def _print_config(args: list[str]) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exc:
        main([*args, "--print_config"])
    assert exc.value.code in (0, None)
    return yaml.safe_load(buf.getvalue())


def _console_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    script = shutil.which("lightning-peft") or str(Path(sys.executable).parent / "lightning-peft")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing found through the repository
    run = subprocess.run([script, *args, "--trainer.enable_progress_bar=false"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


# -- --config NAME -------------------------------------------------------------------------------------------------
def test_a_bare_name_is_the_shipped_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = str(SHIPPED_CONFIGS / "quickstart.yaml")
    assert resolve_config_arg("quickstart") == shipped
    assert resolve_config_arg("quickstart.yaml") == shipped
    # a path, inline YAML, or a file of that name in the working directory: as given
    assert resolve_config_arg("sub/quickstart.yaml") == "sub/quickstart.yaml"
    assert resolve_config_arg("{trainer: {max_steps: 1}}") == "{trainer: {max_steps: 1}}"
    (tmp_path / "quickstart.yaml").write_text("seed_everything: 1\n")
    assert resolve_config_arg("quickstart.yaml") == "quickstart.yaml"


def test_an_unknown_name_is_refused_with_the_shipped_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"--config 'quikstart': .*no shipped config.*lora_causal_lm, .*quickstart, "):
        resolve_config_arg("quikstart")
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config=quikstart"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "'quikstart'" in err and all(name in err for name in _CONFIGS)


def test_configs_lists_every_shipped_config(capsys):
    main(["configs"])
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in _CONFIGS) and "LoRA on all-MiniLM-L6-v2 for SST-2 sentiment" in out
    with pytest.raises(SystemExit) as exc:
        main(["configs", "quickstart"])
    assert exc.value.code == 2


# -- the path rule -------------------------------------------------------------------------------------------------
def test_relative_inputs_that_exist_beside_the_config_become_absolute(tmp_path):
    (tmp_path / "cfg" / "data").mkdir(parents=True)
    (tmp_path / "cfg" / "data" / "train.tsv").write_text("sentence\tlabel\n")
    (tmp_path / "cfg" / "model").mkdir()
    (tmp_path / "shared.tsv").write_text("sentence\tlabel\n")
    (tmp_path / "cfg" / "outputs").mkdir()
    given = {
        "train_file": "data/train.tsv", "val_file": "../shared.tsv", "model_name_or_path": "model",
        "tokenizer_name_or_path": "all-MiniLM-L6-v2",  # an alias: no such file, kept
        "test_file": "data/missing.tsv",               # not beside the config: kept, read from the working directory
        "predict_file": str(tmp_path / "shared.tsv"),  # absolute: kept
        "save_dir": "outputs",                          # an output, even though it exists there: kept
        "max_length": 64,
    }
    got = resolve_config_paths(given, tmp_path / "cfg")
    real = Path(os.path.realpath(tmp_path))
    assert got == {**given, "train_file": str(real / "cfg" / "data" / "train.tsv"), "val_file": str(real / "shared.tsv"),
                   "model_name_or_path": str(real / "cfg" / "model")}
    assert given["train_file"] == "data/train.tsv"  # not changed in place


def test_dot_dot_is_followed_through_a_symlinked_config_folder(tmp_path):
    """As the file system does: the repository's configs -> lightning_peft/configs reaches lightning_peft/data."""
    (tmp_path / "pkg" / "configs").mkdir(parents=True)
    (tmp_path / "pkg" / "data").mkdir()
    (tmp_path / "pkg" / "data" / "train.tsv").write_text("x\n")
    (tmp_path / "configs").symlink_to(tmp_path / "pkg" / "configs")
    (tmp_path / "pkg" / "data" / "link.jsonl").symlink_to(tmp_path / "pkg" / "data" / "train.tsv")
    got = resolve_config_paths({"train_file": "../data/train.tsv", "val_file": "../data/link.jsonl"}, tmp_path / "configs")
    real = Path(os.path.realpath(tmp_path))
    assert got["train_file"] == str(real / "pkg" / "data" / "train.tsv")
    assert got["val_file"] == str(real / "pkg" / "data" / "link.jsonl")  # a symlinked file keeps its name


def test_the_repository_configs_symlink_reaches_the_package_data(monkeypatch):
    monkeypatch.chdir(REPO)
    data = _print_config(["fit", "--config", "configs/quickstart.yaml"])["data"]["init_args"]
    assert data["train_file"] == os.path.realpath(PACKAGE_DATA / "sst2_train_sample.tsv")
    assert data["val_file"] == os.path.realpath(PACKAGE_DATA / "sst2_dev.tsv")


def test_a_user_config_reads_its_inputs_from_its_own_folder(tmp_path, monkeypatch, minilm_path):
    """From another folder; a second --config with its own folder; command-line values stay working-directory paths."""
    for folder in ("cfg/data", "more", "work"):
        (tmp_path / folder).mkdir(parents=True)
    for file in ("cfg/data/train.tsv", "cfg/data/val.tsv", "more/test.tsv", "cfg/local.tsv", "work/local.tsv"):
        (tmp_path / file).write_text("sentence\tlabel\n")
    (tmp_path / "cfg" / "my.yaml").write_text(yaml.safe_dump({
        "model": {"class_path": "lightning_peft.tasks.SequenceClassifier", "init_args": {"model_name_or_path": "all-MiniLM-L6-v2"}},
        "data": {"class_path": "lightning_peft.tasks.TextClassificationData",
                 "init_args": {"train_file": "data/train.tsv", "val_file": "data/val.tsv", "max_length": 32}},
    }))
    (tmp_path / "more" / "test.yaml").write_text(yaml.safe_dump({"data": {"init_args": {"test_file": "test.tsv"}}}))
    monkeypatch.chdir(tmp_path / "work")
    data = _print_config([
        "fit", "--config", "../cfg/my.yaml", "--config", str(tmp_path / "more" / "test.yaml"),
        "--data.init_args.predict_file=local.tsv",  # exists here and beside my.yaml: the command line means here
    ])["data"]["init_args"]
    real = Path(os.path.realpath(tmp_path))
    assert data["train_file"] == str(real / "cfg" / "data" / "train.tsv")
    assert data["val_file"] == str(real / "cfg" / "data" / "val.tsv")
    assert data["test_file"] == str(real / "more" / "test.tsv")
    assert data["predict_file"] == "local.tsv" and data["max_length"] == 32


# -- the console script, from an empty folder ----------------------------------------------------------------------
def test_quickstart_by_name_runs_from_an_empty_folder(tmp_path, minilm_path):
    _console_script(["fit", "--config", "quickstart", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
                     "--data.init_args.max_train_rows=32"], cwd=tmp_path)
    # outputs go to the working directory; the saved config names the inputs it used, absolute
    assert (tmp_path / "outputs" / "quickstart" / "adapter" / "adapter_model.safetensors").is_file()
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["init_args"]
    assert data["train_file"] == str(SHIPPED_CONFIGS.parent / "data" / "sst2_train_sample.tsv")
    assert data["val_file"] == str(SHIPPED_CONFIGS.parent / "data" / "sst2_dev.tsv")


def test_an_absolute_config_path_runs_the_causal_lm_and_its_run_exports_from_elsewhere(tmp_path, shared_data, minilm_path, monkeypatch):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    elsewhere.mkdir()
    _console_script([
        "fit", "--config", str(SHIPPED_CONFIGS / "lora_causal_lm.yaml"),
        f"--data.init_args.train_file={shared_data / 'instructions' / 'alpaca_data_1k_sample.json'}", "--data.init_args.max_rows=16",
        "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.enable_checkpointing=true",
    ], cwd=run)
    assert (run / "outputs" / "lora_causal_lm" / "adapter" / "adapter_model.safetensors").is_file()
    model = yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]
    assert model["model_name_or_path"] == str(SHIPPED_CONFIGS / "tiny_llama")
    # the saved config.yaml is enough to rebuild the model from any folder
    monkeypatch.chdir(elsewhere)
    (ckpt,) = run.glob("checkpoints/*.ckpt")
    main(["export", "--ckpt_path", str(ckpt), "--out", "adapter"])
    assert (elsewhere / "adapter" / "adapter_model.safetensors").is_file()


# -- what every shipped config does within its length --------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in _CONFIGS if n not in _CAUSAL_LM])
def test_an_epoch_long_config_validates_at_its_end(name):
    """The SST-2 configs train one epoch: validation runs at its end, on the dev file the config names."""
    cfg = yaml.safe_load((SHIPPED_CONFIGS / f"{name}.yaml").read_text())
    trainer = cfg["trainer"]
    assert trainer.get("max_steps", -1) == -1 and trainer.get("max_epochs", 0) >= 1, trainer
    assert trainer.get("limit_val_batches", 1) != 0 and trainer.get("check_val_every_n_epoch", 1) <= trainer["max_epochs"]
    data = resolve_config_paths(cfg["data"]["init_args"], SHIPPED_CONFIGS)
    if cfg["data"]["class_path"].endswith("MultiTaskData"):  # a dev file per task, under data_dir (../shared/data beside a clone)
        require_shared_data()  # GLUE is not shipped: skipped without ../shared/data, a failure in CI
        vals = {task: Path(data["data_dir"]) / (settings.get("val_file") or "") for task, settings in data["tasks"].items()}
        assert all(v.is_file() for v in vals.values()), f"{name}: not every task has a dev file: {vals}"
        return
    val = data.get("val_file")
    assert val and Path(val).is_file(), f"{name}: val_file {val!r} is not a shipped file"


class _Schedule(Exception):
    """Raised at the start of training with the schedule Lightning computed for the run."""


class _ReadSchedule(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        raise _Schedule(trainer.num_training_batches, trainer.val_check_batch, trainer.accumulate_grad_batches, trainer.max_steps,
                        sum(trainer.num_val_batches))


@pytest.mark.parametrize("name", _CAUSAL_LM)
def test_a_step_bounded_config_validates_within_its_steps(name, tmp_path, shared_data, minilm_path, monkeypatch):
    """The causal-LM configs stop at max_steps, maybe before their epoch ends: on the data they ship (else the Alpaca
    sample), with their max_rows, batch size and val_check_interval, Lightning's own schedule puts a validation within
    max_steps.
    (The schedule is read when training starts; configs/lora_causal_lm.yaml also runs in full in test_cli.py.)"""
    if name == "qlora":
        pytest.importorskip("bitsandbytes")
    from lightning.pytorch import LightningDataModule, LightningModule

    from lightning_peft.cli import PEFTCLI

    monkeypatch.chdir(tmp_path)
    args = ["--config", name, "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0"]
    data = yaml.safe_load((SHIPPED_CONFIGS / f"{name}.yaml").read_text())["data"]["init_args"]
    if not Path(resolve_config_paths(data, SHIPPED_CONFIGS)["train_file"]).is_file():  # a placeholder: path/to/alpaca_data.json
        args.append(f"--data.init_args.train_file={shared_data / 'instructions' / 'alpaca_data_1k_sample.json'}")
    cli = PEFTCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False, args=args)
    cli.trainer.callbacks.append(_ReadSchedule())
    with pytest.raises(_Schedule) as schedule:
        cli.trainer.fit(cli.model, cli.datamodule)
    batches, val_every, accumulate, max_steps, val_batches = schedule.value.args
    first_validation = min(val_every, batches)  # at val_check_interval, or at the end of the epoch
    assert val_batches > 0 and max_steps > 0
    assert -(-first_validation // accumulate) <= max_steps, (
        f"{name}: first validation after {first_validation} of {batches} batches, max_steps={max_steps}"
    )
