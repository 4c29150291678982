"""MultiTaskData + MultiTaskClassifier under DDP on 2 CPU processes (tests/scripts/ddp_multitask.py): the adapters and
heads one process trains when it accumulates the same two batches per step, on every rank; and a DDP run resumed
mid-epoch ends where the uninterrupted one does."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tasks.test_multitask import minilm_dir, task_files  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "scripts" / "ddp_multitask.py"


@pytest.fixture
def bert_without_dropout(tmp_path, minilm_dir):  # noqa: F811
    """A 2-layer random BERT classifier (3 outputs) with dropout 0: DDP ranks draw other dropout masks than one process."""
    from transformers import BertConfig, BertForSequenceClassification

    from lightning_peft.tasks import load_tokenizer

    tokenizer = load_tokenizer(minilm_dir)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    folder = tmp_path / "bert"
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _run(mode, tmp_path, bert, tasks, dropout=0.0, out=None, ok=True):
    out = out or tmp_path
    out.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, str(SCRIPT), mode, str(out), bert, str(tmp_path), json.dumps(tasks), str(dropout)],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.timeout(600)
def test_ddp_trains_the_adapters_and_heads_of_one_process_with_the_same_batches_and_resumes_exactly(tmp_path, task_files, bert_without_dropout):  # noqa: F811
    ddp = _run("ddp", tmp_path, bert_without_dropout, task_files)
    assert "find_unused_parameters=True" in ddp.stdout + ddp.stderr
    _run("one", tmp_path, bert_without_dropout, task_files)
    one, rank0, rank1 = (torch.load(tmp_path / f"{n}.pt") for n in ("one_rank0", "ddp_rank0", "ddp_rank1"))
    names = sorted(one["trained"])
    assert names == sorted(rank0["trained"]) and sum("modules_to_save" in n for n in names) == 6  # a head per task
    assert all(torch.equal(one["start"][n], rank0["start"][n]) for n in names)  # the same start
    moved = max((one["trained"][n] - one["start"][n]).abs().max().item() for n in names)
    assert moved > 1e-2, moved
    for n in names:
        assert torch.equal(rank0["trained"][n], rank1["trained"][n]), n  # every rank holds the same adapters
        torch.testing.assert_close(rank0["trained"][n], one["trained"][n], atol=2e-5, rtol=1e-4, msg=n)  # reduction order only



@pytest.mark.timeout(600)
def test_a_ddp_run_with_dropout_resumed_mid_epoch_ends_bitwise_equal(tmp_path, task_files, bert_without_dropout):  # noqa: F811
    """LoRA dropout 0.3: each rank draws its own masks, so each must resume with its own random state (the checkpoint
    keeps every rank's). Resumed at step 5 of 9 per epoch, through the epoch boundary, to step 12. Resuming that
    checkpoint in one process is refused (its batches are shared otherwise)."""
    out = tmp_path / "dropout"
    _run("ddp", tmp_path, bert_without_dropout, task_files, dropout=0.3, out=out)
    _run("resume", tmp_path, bert_without_dropout, task_files, dropout=0.3, out=out)
    for rank in (0, 1):
        whole, resumed = (torch.load(out / f"{m}_rank{rank}.pt")["trained"] for m in ("ddp", "resume"))
        assert whole and whole.keys() == resumed.keys()
        different = [n for n in whole if not torch.equal(resumed[n], whole[n])]
        assert not different, (rank, different[:3])
    refused = _run("resume_one", tmp_path, bert_without_dropout, task_files, dropout=0.3, out=out, ok=False)
    assert "the checkpoint was saved mid-epoch by 2 process(es), each 5 of its 9 batches into the epoch" in refused.stderr
