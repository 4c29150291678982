"""DDP on 2 CPU processes gives what one process gives with the same global batches (``tests/scripts/ddp_equivalence.py``).

The script sets aside two Lightning behaviours that would make the runs differ for reasons unrelated to adapters: DDP's
training DistributedSampler always shuffles, and DDP re-seeds each process before ``setup`` (see its docstring).
"""

import subprocess
import sys

import pytest
import torch

from tests.cli.test_cli import REPO

SCRIPT = REPO / "tests" / "scripts" / "ddp_equivalence.py"


def _run(method, devices, out):
    proc = subprocess.run([sys.executable, str(SCRIPT), method, str(devices), str(out)], cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _max_diff(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
    return max((a[k] - b[k]).abs().max().item() for k in a if a[k].numel())


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["lora", "qlora", "adalora", "prompt_tuning", "prefix_tuning"])
def test_ddp_equals_one_process_with_the_same_global_batch(method, tmp_path):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    _run(method, 1, tmp_path)
    _run(method, 2, tmp_path)
    single, rank0, rank1 = (torch.load(tmp_path / name) for name in ("1_rank0.pt", "2_rank0.pt", "2_rank1.pt"))
    assert single["adapter"], "no adapter tensors were saved"
    assert _max_diff(rank0["adapter"], rank1["adapter"]) == 0.0  # every rank holds the same adapter
    # the runs trained: the adapter moved from its fixed start (comparing final values alone could not fail, since
    # the start values are 0.05 * N(0, 1) draws whose maximum exceeds any small threshold)
    same_shape = [k for k, v in single["adapter"].items() if v.numel() and k in single["start"] and single["start"][k].shape == v.shape]
    assert same_shape  # (AdaLoRA prunes ranks: tensors whose shape changed are left out of this check)
    moved = max((single["adapter"][k] - single["start"][k]).abs().max().item() for k in same_shape)
    assert moved > 1e-3, moved
    assert _max_diff(single["adapter"], rank0["adapter"]) < 1e-4  # float reduction order only
    if method == "adalora":  # scores come from the all-reduced gradients: the same masks everywhere, at every step
        assert len(single["masks"]) == 8
        for a, b, c in zip(single["masks"], rank0["masks"], rank1["masks"]):
            assert all(torch.equal(a[n], b[n]) and torch.equal(a[n], c[n]) for n in a)
        assert single["final_ranks"] == rank0["final_ranks"] == rank1["final_ranks"]
        assert len(set(single["final_ranks"].values())) > 1  # the budget really moved between layers
