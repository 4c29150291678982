"""The sharded-strategy checks of tests/test_sharded.py on 2 GPUs: Lightning's own FSDP / DeepSpeed classes (no
CPU overrides), NCCL, bf16-mixed precision. Skipped without 2 CUDA devices (CI has none); a GPU session runs them."""

import os
import subprocess
import sys

import pytest
import torch

from tests.cli.test_cli import REPO
from tests.test_sharded import N_ADAPTER, SCRIPT, _max_diff

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL, 2 processes)")


def _run(out, strategy, ckpt, phase):
    env = {**os.environ, "LP_SHARDED_ACCELERATOR": "cuda"}
    proc = subprocess.run([sys.executable, str(SCRIPT), strategy, ckpt, phase, str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out / f"{strategy}_{ckpt}_{phase}.pt")


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("strategy, ckpt", [("fsdp2", "file"), ("fsdp2", "dist"), ("ds2", "file"), ("ds3", "file"), ("fsdp1", "file"), ("fsdp1", "dist")])
def test_gpu_sharded_training_matches_one_gpu_and_resumes(strategy, ckpt, tmp_path):
    if strategy.startswith("ds"):
        pytest.importorskip("deepspeed")
    single = _run(tmp_path, "single", "file", "full")
    full = _run(tmp_path, strategy, ckpt, "full")
    assert full["error"] is None, full["error"]
    assert len(full["adapter"]) == N_ADAPTER
    assert _max_diff(full["adapter"], single["adapter"]) < 2e-2  # bf16-mixed: reduction order moves the last bits
    resumed = _run(tmp_path, strategy, ckpt, "resume")
    assert resumed["error"] is None, resumed["error"]
    assert _max_diff(resumed["adapter"], full["adapter"]) < 1e-6
