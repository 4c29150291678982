"""LoRA, (IA)³, prompt tuning and AdaLoRA under Lightning's ModelParallelStrategy (FSDP2, ``fully_shard``),
DeepSpeedStrategy (ZeRO-2, ZeRO-3), FSDPStrategy (FSDP1, decoder layers wrapped) and
DDPStrategy on 2 CPU processes (``tests/scripts/sharded_equivalence.py``; DeepSpeed
and FSDP1 through test-only subclasses that step around their CUDA-only code, ``tests/scripts/cpu_strategies.py``): the trained adapter equals one process fed the same global batches,
checkpoints hold the adapter only (one file, or a distributed checkpoint directory), a resumed run equals the
uninterrupted one, and the ``save_dir`` export is the full adapter, which ``peft`` loads to equal logits.

Each of these failed before lightning-peft adapted the strategy: the callback added LoRA after ``fully_shard``
(mixed Tensor/DTensor error), resume reported every adapter key missing (one file) or required every base key
(distributed), and the export on rank 0 failed on DTensor parameters; DeepSpeed saved the whole model (ZeRO-2) or
the base's fragments (ZeRO-3), resume reported every adapter key missing, and ZeRO-3's export wrote (0,)-shaped
tensors; FSDP1 checkpoints held no adapter key (its names carry ``_fsdp_wrapped_module``, state dicts do not) and
the export wrote wrapper names with flattened shard shapes.
"""

import subprocess
import sys

import pytest
import torch

from tests.cli.test_cli import REPO

SCRIPT = REPO / "tests" / "scripts" / "sharded_equivalence.py"
N_ADAPTER = 28  # LoRA on the 14 linear layers of the tiny Llama: lora_a and lora_b each


def _run(out, strategy, ckpt, phase, method="lora"):
    args = [sys.executable, str(SCRIPT), strategy, ckpt, phase, str(out)] + ([] if method == "lora" else [method])
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out / f"{strategy}_{ckpt}{'' if method == 'lora' else '_' + method}_{phase}.pt")


def _max_diff(a, b):
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)
    return max(((a[k] - b[k]).abs().max().item() if a[k].numel() else 0.0) for k in a)


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


def _check_export(directory, adapter, peft_logits=True):
    """The export is the full adapter: lightning-peft loads it to the trained tensors, peft to the same logits."""
    from peft import PeftModel

    import lightning_peft as lp
    from tests.callbacks.helpers import token_data
    from tests.conftest import tiny_llama

    ours = lp.load_adapter(tiny_llama(seed=0), directory)
    loaded = {f"model.{k}": v for k, v in lp.adapter_state_dict(ours).items()}
    assert _max_diff(loaded, adapter) == 0.0
    if not peft_logits:
        return
    theirs = PeftModel.from_pretrained(tiny_llama(seed=0), str(directory))
    ids = token_data(2)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # (peft's prompt tuning extends the mask)
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, ours(**batch).logits, rtol=1e-5, atol=1e-5)


def _checkpoint_keys_and_numel(path, strategy):
    """The parameter names a checkpoint holds, the numel of what it holds for them, and its lightning-peft record."""
    if strategy.startswith("ds"):  # <dir>/checkpoint/: rank 0's model states; every rank's fp32 optimizer partition
        states = sorted(path.glob("checkpoint/*model_states.pt"))
        first = torch.load(states[0], weights_only=True)
        assert first["frozen_param_fragments"] is None and first["frozen_param_shapes"] is None  # no base (ZeRO-3 writes it there)
        numel = 0
        for f in sorted(path.glob("checkpoint/*optim_states.pt")):
            osd = torch.load(f, weights_only=False)["optimizer_state_dict"]  # (the test's own file: DeepSpeed types)
            flat = osd["single_partition_of_fp32_groups"] if "single_partition_of_fp32_groups" in osd else osd["fp32_flat_groups"]
            numel += sum(t.numel() for t in flat)
        return set(first["module"]), numel, first["lightning_peft"]
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return set(saved["state_dict"]), sum(v.numel() for v in saved["state_dict"].values()), saved["lightning_peft"]
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = "model." if strategy == "fsdp1" else "state_dict."  # where Lightning's FSDP1 / FSDP2 put the model
    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    tensors = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}
    numel = sum(torch.Size(v.size).numel() for v in tensors.values())
    return set(tensors), numel, torch.load(path / "meta.pt", weights_only=True)["lightning_peft"]


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "strategy, ckpt",
    [("fsdp2", "file"), ("fsdp2", "dist"), ("ds2", "file"), ("ds3", "file"), ("fsdp1", "file"), ("fsdp1", "dist"), ("ddp", "file")],
    ids=["fsdp2-one-file", "fsdp2-distributed", "deepspeed-zero2", "deepspeed-zero3", "fsdp1-full", "fsdp1-sharded", "ddp"],
)
def test_trains_like_one_process_keeps_adapter_only_checkpoints_resumes_exactly_and_exports(strategy, ckpt, single, tmp_path):
    if strategy.startswith("ds"):
        pytest.importorskip("deepspeed")
    full = _run(tmp_path, strategy, ckpt, "full")
    assert full["error"] is None, full["error"]
    assert len(full["adapter"]) == N_ADAPTER
    start = _start()
    assert _max_diff(full["adapter"], start) > 1e-2  # it trained
    assert _max_diff(full["adapter"], single["adapter"]) < 1e-5  # float reduction order only (SGD; measured <= 1.8e-6)

    # the checkpoint holds the adapter only (and its optimizer state): no base parameter, no base bytes
    (path,) = [p for p in (tmp_path / f"{strategy}_{ckpt}_ckpt").iterdir() if p.name.startswith("epoch=0")]
    keys, numel, record = _checkpoint_keys_and_numel(path, strategy)
    assert keys == set(start), sorted(keys ^ set(start))[:5]
    assert numel == sum(v.numel() for v in start.values())  # (ZeRO-3 keeps them in the optimizer partitions)
    assert record["methods"][0]["method"] == "lora"

    resumed = _run(tmp_path, strategy, ckpt, "resume")
    assert resumed["error"] is None, resumed["error"]
    assert resumed["losses"] == full["losses"][len(full["losses"]) // 2:]  # epoch 1, step for step
    assert _max_diff(resumed["adapter"], full["adapter"]) == 0.0

    _check_export(tmp_path / f"{strategy}_{ckpt}_full_export", full["adapter"])
    _check_export(tmp_path / f"{strategy}_{ckpt}_resume_export", resumed["adapter"])

    # the last checkpoint, read in one process (what `lightning-peft export` does), holds the trained adapter
    import lightning_peft as lp
    from tests.scripts.sharded_equivalence import Net

    (last,) = [p for p in (tmp_path / f"{strategy}_{ckpt}_ckpt").iterdir() if p.name.startswith("epoch=1") and "-v" not in p.name]
    if strategy == "ds3":
        with pytest.raises(ValueError, match="ZeRO-3 checkpoint: the adapter lives in the optimizer partitions.*save_dir="):
            lp.load_adapter_checkpoint(Net(), last)
    else:
        net = lp.load_adapter_checkpoint(Net(), last)
        assert _max_diff({k: v.detach() for k, v in net.named_parameters() if k in full["adapter"]}, full["adapter"]) == 0.0


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


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """One-process runs by method, made once per module."""
    runs = {}

    def get(method):
        if method not in runs:
            runs[method] = _run(tmp_path_factory.mktemp(f"single_{method}"), "single", "file", "full", method)
        return runs[method]

    return get


@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy, ckpt", [("fsdp2", "dist"), ("ds2", "file"), ("ds3", "file"), ("fsdp1", "file"), ("ddp", "file")],
                         ids=["fsdp2", "deepspeed-zero2", "deepspeed-zero3", "fsdp1", "ddp"])
@pytest.mark.parametrize("method", ["ia3", "prompt_tuning"])
def test_other_methods_train_like_one_process_keep_adapter_only_checkpoints_and_resume_exactly(method, strategy, ckpt, single_runs, tmp_path):
    """(IA)³ and prompt tuning under FSDP2, ZeRO-2, ZeRO-3 and FSDP1: the same guarantees as LoRA's (one process,
    adapter-only checkpoints, exact resume, a full export that peft loads to equal logits). AdaLoRA: the next test.
    Prompt tuning under FSDP2 failed when saving (KeyError 0 in torch's optimizer state dict): the root unit, whose
    prompt is read by a hook outside its own forward, stayed unsharded after backward until the save resharded it."""
    if strategy.startswith("ds"):
        pytest.importorskip("deepspeed")
    single = single_runs(method)
    full = _run(tmp_path, strategy, ckpt, "full", method)
    assert full["error"] is None, full["error"]
    assert full["adapter"] and _max_diff(full["adapter"], single["adapter"]) < 1e-5  # measured <= 1.1e-6
    (path,) = [p for p in (tmp_path / f"{strategy}_{ckpt}_{method}_ckpt").iterdir() if p.name.startswith("epoch=0")]
    keys, numel, record = _checkpoint_keys_and_numel(path, strategy)
    assert keys == set(full["adapter"]), sorted(keys ^ set(full["adapter"]))[:5]
    assert numel == sum(v.numel() for v in full["adapter"].values())
    assert record["methods"][0]["method"] == method
    resumed = _run(tmp_path, strategy, ckpt, "resume", method)
    assert resumed["error"] is None, resumed["error"]
    assert resumed["losses"] == full["losses"][len(full["losses"]) // 2:]
    assert _max_diff(resumed["adapter"], full["adapter"]) == 0.0
    _check_export(tmp_path / f"{strategy}_{ckpt}_{method}_full_export", full["adapter"])


def _allocated(adapter, export):
    """The trained AdaLoRA tensors cut to the triplets the export's ``rank_pattern`` allocates (what one process
    prunes to at the end of fit; under sharding the layers keep init_r rows, the masked ones zero)."""
    import json

    pattern = json.loads((export / "adapter_config.json").read_text())["rank_pattern"]
    out = {}
    for k, v in adapter.items():
        path, leaf = k[len("model."):].rsplit(".", 1)
        keep = torch.tensor(pattern[f"{path}.lora_E"])
        if (v.shape[1] if leaf == "adalora_b" else v.shape[0]) == int(keep.sum()) != keep.numel():
            out[k] = v  # pruned already (one process, DDP)
        else:
            out[k] = v[:, keep] if leaf == "adalora_b" else v[keep]
    return out


@pytest.fixture(scope="module")
def single_adalora(tmp_path_factory):
    out = tmp_path_factory.mktemp("single_adalora")
    return _run(out, "single", "file", "full", "adalora")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy, ckpt", [("fsdp2", "dist"), ("ds2", "file"), ("ds3", "file"), ("fsdp1", "file"), ("ddp", "file")],
                         ids=["fsdp2", "deepspeed-zero2", "deepspeed-zero3", "fsdp1", "ddp"])
def test_adalora_allocates_like_one_process_keeps_adapter_only_checkpoints_resumes_exactly_and_exports(strategy, ckpt, single_adalora, tmp_path):
    """AdaLoRA under FSDP2, DeepSpeed and FSDP1: the allocator reads whole gradients and parameters gathered from the
    shards (``lightning_peft.distributed.ShardedTensors``; FSDP1: ``FSDP1Tensors``, unit by unit), so every rank
    computes the same masks as one process; masking writes the module's parameter and the optimizer's fp32 copy (else
    DeepSpeed's next step restored the masked entries), and FSDP1 writes the regularizer's gradients back to the shards. Resume was inexact before: these strategies restore callbacks after ``on_fit_start``, where the
    allocator state used to be loaded, so a resumed run started from fresh scores and masks."""
    if strategy.startswith("ds"):
        pytest.importorskip("deepspeed")
    full = _run(tmp_path, strategy, ckpt, "full", "adalora")
    assert full["error"] is None, full["error"]
    export = tmp_path / f"{strategy}_{ckpt}_adalora_full_export"
    allocated = _allocated(full["adapter"], export)
    # the same allocation as one process (equal shapes after cutting), the same values
    assert {k: v.shape for k, v in allocated.items()} == {k: v.shape for k, v in single_adalora["adapter"].items()}
    assert _max_diff(allocated, single_adalora["adapter"]) < 1e-5
    assert sum(v.shape[0] for k, v in allocated.items() if k.endswith("adalora_e")) == 2 * 14  # target_r=2 on 14 layers

    (path,) = [p for p in (tmp_path / f"{strategy}_{ckpt}_adalora_ckpt").iterdir() if p.name.startswith("epoch=0")]
    keys, numel, record = _checkpoint_keys_and_numel(path, strategy)
    assert keys == set(full["adapter"]), sorted(keys ^ set(full["adapter"]))[:5]
    from tests.scripts.sharded_equivalence import Net, method

    unpruned = Net()
    method("adalora").inject(unpruned)  # the epoch-0 checkpoint precedes pruning: init_r rows everywhere
    assert numel == sum(p.numel() for p in unpruned.parameters() if p.requires_grad) == 4152
    assert record["methods"][0]["method"] == "adalora"

    resumed = _run(tmp_path, strategy, ckpt, "resume", "adalora")
    assert resumed["error"] is None, resumed["error"]
    assert resumed["losses"] == full["losses"][len(full["losses"]) // 2:]
    assert _max_diff(resumed["adapter"], full["adapter"]) == 0.0
    _check_export(export, allocated)
