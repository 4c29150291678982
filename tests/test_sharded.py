"""LoRA under Lightning's ModelParallelStrategy (FSDP2, ``fully_shard``) on 2 CPU processes
(``tests/scripts/sharded_equivalence.py``): the trained adapter equals one process fed the same global batches,
checkpoints hold the adapter only (one file, or a distributed checkpoint directory), a resumed run equals the
uninterrupted one, and the ``save_dir`` export is the full adapter, which ``peft`` loads to equal logits.

Each of these failed before lightning-peft adapted the strategy: the callback added LoRA after ``fully_shard``
(mixed Tensor/DTensor error), resume reported every adapter key missing (one file) or required every base key
(distributed), and the export on rank 0 failed on DTensor parameters.
"""

import subprocess
import sys

import pytest
import torch

from tests.cli.test_cli import REPO

SCRIPT = REPO / "tests" / "scripts" / "sharded_equivalence.py"
N_ADAPTER = 28  # LoRA on the 14 linear layers of the tiny Llama: lora_a and lora_b each


def _run(out, strategy, ckpt, phase):
    proc = subprocess.run([sys.executable, str(SCRIPT), strategy, ckpt, phase, str(out)], cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = torch.load(out / f"{strategy}_{ckpt}_{phase}.pt")
    return result


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return _run(out, "single", "file", "full")


def _start():
    """The fixed start every run sets (the script's ``fixed_start``), to show the runs trained."""
    from tests.scripts.sharded_equivalence import Net, fixed_start
    from lightning_peft import LoRA

    net = Net()
    LoRA(r=4, alpha=8, target_modules="all-linear").inject(net)
    fixed_start(net)
    return {k: v.detach().clone() for k, v in net.named_parameters() if v.requires_grad}


def _check_export(directory, adapter):
    """The export is the full adapter: lightning-peft loads it to the trained tensors, peft to the same logits."""
    from peft import PeftModel

    import lightning_peft as lp
    from tests.callbacks.helpers import token_data
    from tests.conftest import tiny_llama

    ours = lp.load_adapter(tiny_llama(seed=0), directory)
    loaded = {f"model.{k}": v for k, v in ours.named_parameters() if "lora_" in k}
    assert _max_diff(loaded, adapter) == 0.0
    theirs = PeftModel.from_pretrained(tiny_llama(seed=0), str(directory))
    ids = token_data(2)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("ckpt", ["file", "dist"])
def test_fsdp2_trains_like_one_process_keeps_adapter_only_checkpoints_resumes_exactly_and_exports(ckpt, single, tmp_path):
    full = _run(tmp_path, "fsdp2", ckpt, "full")
    assert full["error"] is None, full["error"]
    assert len(full["adapter"]) == N_ADAPTER
    start = _start()
    assert _max_diff(full["adapter"], start) > 1e-2  # it trained
    assert _max_diff(full["adapter"], single["adapter"]) < 1e-5  # float reduction order only (SGD; measured 1.8e-6)

    # the checkpoint holds the adapter only
    (path,) = [p for p in (tmp_path / f"fsdp2_{ckpt}_ckpt").iterdir() if p.name.startswith("epoch=0")]
    if ckpt == "file":
        saved = torch.load(path, weights_only=True)
        keys = set(saved["state_dict"])
        assert sum(v.numel() * v.element_size() for v in saved["state_dict"].values()) == 4 * sum(v.numel() for v in start.values())
    else:
        from torch.distributed.checkpoint import FileSystemReader

        meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        keys = {k[len("state_dict."):] for k in meta if k.startswith("state_dict.")}
        saved = torch.load(path / "meta.pt", weights_only=True)
    assert keys == set(start), sorted(keys ^ set(start))[:5]
    assert saved["lightning_peft"]["methods"][0]["method"] == "lora"

    resumed = _run(tmp_path, "fsdp2", ckpt, "resume")
    assert resumed["error"] is None, resumed["error"]
    assert resumed["losses"] == full["losses"][len(full["losses"]) // 2:]  # epoch 1, step for step
    assert _max_diff(resumed["adapter"], full["adapter"]) == 0.0

    _check_export(tmp_path / f"fsdp2_{ckpt}_full_export", full["adapter"])
    _check_export(tmp_path / f"fsdp2_{ckpt}_resume_export", resumed["adapter"])


@pytest.mark.timeout(600)
def test_fsdp2_with_apply_peft_before_fully_shard_resumes_exactly(single, tmp_path):
    full = _run(tmp_path, "fsdp2_mixin", "dist", "full")
    assert full["error"] is None, full["error"]
    assert _max_diff(full["adapter"], single["adapter"]) < 1e-5
    resumed = _run(tmp_path, "fsdp2_mixin", "dist", "resume")
    assert resumed["error"] is None, resumed["error"]
    assert _max_diff(resumed["adapter"], full["adapter"]) == 0.0


@pytest.mark.timeout(300)
def test_a_model_sharded_in_configure_model_before_the_callback_could_adapt_it_is_refused_with_the_fix(tmp_path):
    result = _run(tmp_path, "fsdp2_late", "file", "full")
    assert result["error"] is not None
    assert "configure_model sharded the model (dtensor) before LoRA could add adapters" in result["error"]
    assert "build the model in __init__" in result["error"] and "apply_peft" in result["error"]
