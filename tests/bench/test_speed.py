"""`lightning-peft bench speed`: the JSON has every field, with positive, consistent numbers."""

import json

import pytest
import torch
from torch import nn

from lightning_peft.bench import speed
from lightning_peft.bench.speed import FIELDS
from lightning_peft.cli import main
from lightning_peft.methods.lora import LoRALinear


def test_bench_speed_cli_writes_every_field(tmp_path, capsys):
    pytest.importorskip("peft")
    out = tmp_path / "speed"
    main(["bench", "speed", "--model", "tiny-llama", "--methods", "full,lora", "--peers", "peft", "--batch-size", "2",
          "--seq-len", "32", "--steps", "2", "--warmup", "1", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [(r["method"], r["implementation"]) for r in rows] == [("full", "full fine-tuning"), ("lora", "lightning-peft"), ("lora", "HF PEFT")]
    for r in rows:
        assert set(FIELDS) <= set(r), set(FIELDS) - set(r)
        for key in ("trainable", "base_params", "adapter_file_bytes", "saved_bytes_per_token", "peak_memory_bytes", "step_time_s", "tokens_per_s"):
            assert r[key] > 0, (r["method"], key)
        assert r["tokens_per_s"] == pytest.approx(r["batch_size"] * r["seq_len"] / r["step_time_s"])
    full, ours, theirs = rows
    assert full["trainable"] == full["changed"] == full["base_params"] and full["added"] == 0
    for lora in (ours, theirs):  # purely additive: every trainable parameter is added, none changed
        assert lora["added"] >= lora["trainable"] and lora["changed"] == 0 and lora["base_params"] == full["base_params"]
    assert ours["trainable"] == theirs["trainable"]
    assert ours["adapter_file_bytes"] < full["adapter_file_bytes"] / 5
    assert ours["saved_bytes_per_token"] < theirs["saved_bytes_per_token"]
    printed = capsys.readouterr().out
    assert "| tiny-llama | lora | lightning-peft |" in printed and "HF PEFT" in printed
    if pytest.importorskip("matplotlib"):
        assert out.with_suffix(".png").stat().st_size > 0


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match=r"Unknown method 'nope': known \[.*'lora'"):
        main(["bench", "speed", "--methods", "nope", "--out", "/tmp/never"])


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_layer_compiles_without_graph_breaks(dropout):
    layer = LoRALinear(nn.Linear(32, 16), r=4, alpha=8, dropout=dropout).train()
    x = torch.randn(8, 32, requires_grad=True)
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(layer)
    compiled.eval(), layer.eval()
    torch.testing.assert_close(compiled(x), layer(x), atol=1e-5, rtol=1e-5)


ADDITIVE = ["adalora", "ia3", "houlsby", "parallel_adapter", "prompt_tuning", "prefix_tuning", "p_tuning_v2", "llama_adapter"]


@pytest.mark.parametrize("method", ADDITIVE)
def test_every_additive_method_measures_consistently(method):
    """Each method the bench offers runs a training step on the tiny Llama; adding parameters is all it does, its
    file holds at least the trainable values, and where peft has the same configuration the counts agree."""
    row = speed.run_one(method, steps=1, warmup=0, batch_size=2, seq_len=16)
    assert set(FIELDS) <= set(row)
    assert row["changed"] == 0 and row["added"] >= row["trainable"] > 0
    if method == "prefix_tuning":  # the file holds the per-layer prefixes; the reparameterizing MLP is dropped
        assert row["adapter_file_bytes"] < 2 * row["trainable"]
    else:
        assert row["adapter_file_bytes"] >= 2 * row["trainable"]  # at least bf16 for every trained value
    assert row["saved_bytes_per_token"] > 0 and row["step_time_s"] > 0
    if method in speed.PEERS["peft"] and method != "prefix_tuning":  # ours reparameterizes from the hidden size, peft from the KV width
        peer = speed.run_one(method, "peft", steps=1, warmup=0, batch_size=2, seq_len=16)
        assert peer["trainable"] == pytest.approx(row["trainable"], rel=1e-3), (peer["trainable"], row["trainable"])


def test_bitfit_changes_base_biases_only():
    row = speed.run_one("bitfit", model="tiny-gpt2", steps=1, warmup=0, batch_size=2, seq_len=16)
    assert row["added"] == 0 and row["changed"] == row["trainable"] > 0 and row["adapter_file_bytes"] >= 2 * row["trainable"]


def test_peak_memory_of_a_fresh_process_is_its_own():
    """A child's peak RSS must not inherit its parent's (getrusage's ru_maxrss survives exec; Linux's VmHWM does not)."""
    import subprocess
    import sys

    ballast = bytearray(1536 * 2**20)  # raise this process's peak well above what the child will use
    ballast[:: 4096] = b"\x01" * len(ballast[:: 4096])
    code = "from lightning_peft.bench.common import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])
    del ballast
    assert 0 < child < 1536 * 2**20
