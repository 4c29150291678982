"""`lightning-peft bench precision`: the same LoRA over bf16 / LLM.int8 / NF4 bases, fields consistent with the formats."""

import json

import pytest
import torch

from lightning_peft.bench import precision
from lightning_peft.bench.common import build_model
from lightning_peft.cli import main

pytest.importorskip("bitsandbytes")

SMALL = ["--batch-size", "2", "--seq-len", "16", "--steps", "1", "--warmup", "0", "--infer-batches", "1,2", "--infer-seq-len", "16", "--repeats", "1"]


def _check_row(r):
    for key in ("base_bytes", "linear_bytes", "trainable", "peak_train_memory_bytes", "forward_s", "backward_s",
                "latency_b1_s", "latency_b2_s", "merged_latency_b1_s", "merged_latency_b2_s"):
        assert r[key] > 0, (r["base"], key)
    assert r["merged_equals_base"] is True, r["base"]  # merged LoRA: the base's modules and shapes again
    assert r["peak_train_memory_bytes"] >= r["memory_before_train_bytes"] > 0


@pytest.fixture
def in_process(monkeypatch):
    """Rows measured in this process: the fresh-subprocess runner (shared with `bench speed`, tested there) costs
    a torch + transformers import per row."""
    monkeypatch.setattr(precision, "run_rows", lambda module, jobs, label, progress=True: [precision.run_one(**j) for j in jobs])


def test_bench_precision_cli_bf16_and_int8(tmp_path, capsys, in_process):
    out = tmp_path / "precision"
    main(["bench", "precision", "--model", "tiny-llama", "--bases", "bf16,int8", *SMALL, "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [(r["model"], r["base"]) for r in rows] == [("tiny-llama", "bf16"), ("tiny-llama", "int8")]
    bf16, int8 = rows
    for r in rows:
        _check_row(r)
    assert bf16["trainable"] == int8["trainable"]  # the same adapter over both
    # int8: one byte per weight + a float32 scale per output row (hidden 256: 1.0156 B/weight) vs two bytes in bf16
    ratio = int8["linear_bytes"] / bf16["linear_bytes"]
    assert 0.5 < ratio < 0.52, ratio
    assert bf16["base_bytes"] - int8["base_bytes"] == bf16["linear_bytes"] - int8["linear_bytes"]  # only the linears shrink
    printed = capsys.readouterr().out
    assert "| tiny-llama | int8 |" in printed and "load average" in printed


def test_nf4_row_in_process():
    r = precision.run_one("tiny-llama", "nf4", batch_size=2, seq_len=16, steps=1, warmup=0, infer_batches=(1,), infer_seq_len=16, repeats=1)
    assert r["merged_equals_base"] is True and r["merged_latency_b1_s"] > 0
    # 4 bits + one float32 absmax per 64 weights = 0.5625 bytes per weight
    n_linear = sum(m.weight.numel() for n, m in build_model("tiny-llama", torch.bfloat16).named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    assert r["linear_bytes"] / n_linear == pytest.approx(0.5625, abs=0.002)


def test_unknown_base_precision_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown base precision 'int4', 'fp8': choose from \['bf16', 'int8', 'nf4', 'nf4-dq', 'fp4'\]"):
        main(["bench", "precision", "--bases", "bf16,int4,fp8", "--out", str(tmp_path / "never")])
