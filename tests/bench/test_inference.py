"""`lightning-peft bench inference`: overhead of each method over the plain base; merged LoRA/IA3 cost what the base costs."""

import json

import pytest
import torch

from lightning_peft.bench import inference
from lightning_peft.bench.common import build_model, structure
from lightning_peft.cli import main
from lightning_peft.core import unload

FAST = dict(batch_sizes=(1, 2), seq_len=16, repeats=1, warmup=0)


@pytest.fixture
def in_process(monkeypatch):
    """Rows measured in this process: the fresh-subprocess runner (shared with `bench speed`, tested there) costs
    a torch + transformers import per row."""
    monkeypatch.setattr(inference, "run_rows", lambda module, jobs, label, progress=True: [inference.run_one(**j) for j in jobs])


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_merged_model_has_the_base_structure_and_flops(method):
    """The deterministic proxy of "merged inference costs what the base costs": after unload(merge=True) the
    module types, parameter shapes and dtypes are the base's, and so are the counted FLOPs."""
    base = inference.run_one("tiny-llama", "base", **FAST)
    row = inference.run_one("tiny-llama", method, **FAST)
    assert row["mergeable"] and row["merged_equals_base"] is True
    assert row["merged_flops_b1"] == base["flops_b1"]
    if method == "lora":  # unmerged, the low-rank path is extra work; IA3's scaling is elementwise (no matmul FLOPs)
        assert row["flops_b1"] > base["flops_b1"]
    # the proxy itself can fail: an unmerged LoRA model differs from the base
    from lightning_peft import LoRA

    plain = build_model("tiny-llama", torch.bfloat16)
    adapted = LoRA(r=16, alpha=32, target_modules="all-linear").inject(build_model("tiny-llama", torch.bfloat16))
    assert structure(adapted) != structure(plain)
    assert structure(unload(adapted, merge=True)) == structure(plain)


@pytest.mark.parametrize("method", ["houlsby", "prompt_tuning", "prefix_tuning"])  # prefix_tuning crashed on transformers 5.24
def test_unmergeable_methods_add_flops_and_have_no_merged_row(method):
    base = inference.run_one("tiny-llama", "base", **FAST)
    row = inference.run_one("tiny-llama", method, **FAST)
    assert not row["mergeable"] and "merged_latency_b1_s" not in row and "merged_equals_base" not in row
    assert row["flops_b1"] > base["flops_b1"] and row["added_params"] > 0
    assert row["latency_b1_s"] > 0 and row["latency_b2_s"] > 0


def test_bench_inference_cli_size_sweep(tmp_path, capsys, in_process):
    out = tmp_path / "inference"
    main(["bench", "inference", "--model", "tiny-llama", "--model", "tiny-gpt2", "--methods", "lora,houlsby",
          "--batch-sizes", "1,2", "--seq-len", "16", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [(r["model"], r["method"]) for r in rows] == [
        (m, x) for m in ("tiny-llama", "tiny-gpt2") for x in ("base", "lora", "houlsby")
    ]
    for r in rows:
        base = next(x for x in rows if x["model"] == r["model"] and x["method"] == "base")
        assert r["overhead_b1_pct"] == pytest.approx(100 * (r["latency_b1_s"] / base["latency_b1_s"] - 1))
        assert ("merged_overhead_b2_pct" in r) == (r["method"] == "lora")
    printed = capsys.readouterr().out
    assert "| tiny-gpt2 | lora |" in printed and "by model size" in printed and "| method | tiny-llama b1 |" in printed


def test_unknown_method_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown method 'lroa': choose from \['base', 'lora', .*'ia3', .*'prefix_tuning'"):
        main(["bench", "inference", "--methods", "lora,lroa", "--out", str(tmp_path / "never")])
