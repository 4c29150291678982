"""``lightning-peft bench precision``: the same LoRA adapter over a bf16, LLM.int8 or 4-bit base, side by side.

For each model and base precision, in a fresh subprocess (so the CPU's peak RSS belongs to that row), with
LoRA r=16, alpha=32 on every linear layer of the blocks and bf16 compute:

* ``base_bytes``: bytes of the base model's parameters as stored (quantized linear weights with their scales,
  the rest in bf16); ``linear_bytes``: the linear weights of the blocks alone (what quantization shrinks);
* ``peak_train_memory_bytes``: peak RSS of the process after the training steps (CPU; model, optimizer,
  activations and the Python runtime) or ``torch.cuda.max_memory_allocated`` (GPU), and
  ``memory_before_train_bytes`` (RSS / allocated just before the first step: the difference is what training adds);
* ``forward_s`` / ``backward_s``: median training forward, and backward + optimizer step, at the training batch;
* ``latency_b1_s`` / ``latency_b32_s``: median generation-free forward (logits, no KV cache) at batch 1 and 32
  with the adapter unmerged, and ``merged_latency_*`` after ``unload(merge=True)`` (a quantized base is
  re-quantized by the merge, which rounds the update: fine for timing, see the QLoRA docs for exact exports);
* ``merged_equals_base``: the merged model has the base's module types and parameter shapes and dtypes
  (deterministic: its inference cost is the base's).

Examples::

    lightning-peft bench precision --model tiny-llama --bases bf16,int8,nf4
    lightning-peft bench precision --model tiny-llama --model small-llama --bases bf16,int8,nf4
    lightning-peft bench precision --model llama-1.1b --bases bf16,int8,nf4 --batch-size 4 --seq-len 512   # GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from lightning_peft.bench.common import (
    PRESETS,
    add_common_arguments,
    bench_main,
    build_model,
    check_names,
    current_memory,
    device_name,
    forward_latency,
    load_average,
    matplotlib_pyplot,
    peak_memory,
    random_ids,
    reset_peak_memory,
    run_rows,
    split_list,
    structure,
)

__all__ = ["BASES", "run", "run_one"]

#: Base precisions: ``None`` keeps the bf16 weights, else the :class:`~lightning_peft.plugins.QLoRAPrecision` mode.
BASES: dict[str, Optional[str]] = {"bf16": None, "int8": "int8", "nf4": "nf4", "nf4-dq": "nf4-dq", "fp4": "fp4"}

LORA = dict(r=16, alpha=32, target_modules="all-linear")


def _frozen_base(model: str, base: str, dev: torch.device, lora: bool) -> nn.Module:
    """The bf16 model (with LoRA when ``lora``), its base weights frozen and quantized as ``base`` says."""
    from lightning_peft import LoRA
    from lightning_peft.plugins import QLoRAPrecision

    net = build_model(model, torch.bfloat16).to(dev)
    if lora:
        net = LoRA(**LORA).inject(net)
    else:
        net.requires_grad_(False)
    if BASES[base] is not None:
        net = QLoRAPrecision(BASES[base], compute_dtype="bf16").convert_module(net)
    return net


def _bytes(model: nn.Module) -> tuple[int, int]:
    """``(base bytes, linear bytes)``: every non-adapter parameter as stored; the blocks' linear weights alone."""
    from lightning_peft.methods.lora import LoRALinear
    from lightning_peft.quant import QuantLinear, is_quantized, quantized_bytes

    quant, _ = quantized_bytes(model)
    plain = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n and not is_quantized(p))
    linear = 0
    for m in model.modules():
        if isinstance(m, (LoRALinear, QuantLinear)) or type(m) is nn.Linear and m.weight is not model.get_output_embeddings().weight:
            if not is_quantized(m.weight):
                linear += m.weight.numel() * m.weight.element_size()
    return quant + plain, quant + linear


def run_one(
    model: str = "tiny-llama", base: str = "bf16", batch_size: int = 4, seq_len: int = 128, steps: int = 3, warmup: int = 1,
    infer_batches: tuple[int, ...] = (1, 32), infer_seq_len: int = 128, repeats: int = 5, device: str = "cpu",
) -> dict[str, Any]:
    """Measure one (model, base precision) row in this process (``run`` calls it in a fresh subprocess)."""
    check_names("base precision", [base], list(BASES))
    dev = torch.device(device)
    net = _frozen_base(model, base, dev, lora=True)
    base_bytes, linear_bytes = _bytes(net)
    trainable = [p for p in net.parameters() if p.requires_grad]
    ids = random_ids(net, batch_size, seq_len, dev)
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    net.train()
    reset_peak_memory(dev)
    start = current_memory(dev)
    fwd, bwd = [], []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        loss = net(input_ids=ids, labels=ids, use_cache=False).loss
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t1 = time.perf_counter()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if step >= warmup:
            fwd.append(t1 - t0)
            bwd.append(time.perf_counter() - t1)
    peak, peak_kind = peak_memory(dev)
    del opt, loss
    row: dict[str, Any] = {
        "model": model, "base": base, "device": device_name(dev), "lora": "r=16, alpha=32, all-linear",
        "batch_size": batch_size, "seq_len": seq_len, "infer_seq_len": infer_seq_len,
        "base_bytes": base_bytes, "linear_bytes": linear_bytes, "trainable": sum(p.numel() for p in trainable),
        "peak_train_memory_bytes": peak, "memory_before_train_bytes": start, "peak_memory_kind": peak_kind,
        "forward_s": statistics.median(fwd), "backward_s": statistics.median(bwd),
    }
    for b in infer_batches:
        row[f"latency_b{b}_s"] = forward_latency(net, b, infer_seq_len, dev, repeats, warmup=1)
    from lightning_peft.core import unload

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the re-quantization warning of a quantized base
        unload(net, merge=True)
    for b in infer_batches:
        row[f"merged_latency_b{b}_s"] = forward_latency(net, b, infer_seq_len, dev, repeats, warmup=1)
    row["merged_equals_base"] = structure(net) == structure(_frozen_base(model, base, dev, lora=False))
    row["load_average"] = load_average()
    return row


def run(
    models: list[str], bases: list[str], batch_size: int = 4, seq_len: int = 128, steps: int = 3, warmup: int = 1,
    infer_batches: tuple[int, ...] = (1, 32), infer_seq_len: int = 128, repeats: int = 5, device: str = "cpu", progress: bool = True,
) -> list[dict[str, Any]]:
    """Every (model, base) in a fresh subprocess; returns the rows."""
    check_names("base precision", bases, list(BASES))
    jobs = [
        dict(model=m, base=b, batch_size=batch_size, seq_len=seq_len, steps=steps, warmup=warmup, infer_batches=list(infer_batches),
             infer_seq_len=infer_seq_len, repeats=repeats, device=device)
        for m in models for b in bases
    ]
    return run_rows("lightning_peft.bench.precision", jobs, label=lambda j: f"{j['base']} base, {j['model']}", progress=progress)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    batches = sorted({int(k[len("latency_b"):-2]) for r in rows for k in r if k.startswith("latency_b")})
    head = ["model", "base", "base weights", "linear weights", "peak train mem (+ over start)", "fwd (ms)", "bwd+opt (ms)"]
    head += [f"b{b} unmerged (ms)" for b in batches] + [f"b{b} merged (ms)" for b in batches] + ["merged = base"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["model"], r["base"], f"{r['base_bytes'] / 2**20:.1f} MiB", f"{r['linear_bytes'] / 2**20:.1f} MiB",
            f"{r['peak_train_memory_bytes'] / 2**20:,.0f} MiB (+{(r['peak_train_memory_bytes'] - r['memory_before_train_bytes']) / 2**20:,.0f})",
            _ms(r["forward_s"]), _ms(r["backward_s"]),
        ]
        cells += [_ms(r[f"latency_b{b}_s"]) for b in batches] + [_ms(r[f"merged_latency_b{b}_s"]) for b in batches]
        cells.append("yes" if r["merged_equals_base"] else "no")
        lines.append("| " + " | ".join(cells) + " |")
    if rows:
        r = rows[0]
        lines.append(
            f"\n{r['device']}; LoRA {r['lora']}; training batch {r['batch_size']} x {r['seq_len']}, inference seq len "
            f"{r['infer_seq_len']}; medians; peak memory: {r['peak_memory_kind']}; load average at the end of each row: "
            + "; ".join(f"{x['model']}/{x['base']}: {x['load_average']}" for x in rows) + "."
        )
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], path: Path) -> Optional[Path]:
    """Base bytes, training step and batch-1 latency per (model, base), one PNG; ``None`` without matplotlib."""
    plt = matplotlib_pyplot()
    if plt is None:
        return None
    labels = [f"{r['base']}\n{r['model']}" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(max(10, 1.5 * len(rows) * 1.5), 4))
    axes[0].bar(labels, [r["base_bytes"] / 2**20 for r in rows], color="tab:blue")
    axes[0].set_ylabel("base weights (MiB)")
    axes[1].bar(labels, [1e3 * r["forward_s"] for r in rows], color="tab:orange", label="forward")
    axes[1].bar(labels, [1e3 * r["backward_s"] for r in rows], bottom=[1e3 * r["forward_s"] for r in rows], color="tab:red", label="backward + opt")
    axes[1].set_ylabel("training step (ms)")
    axes[1].legend(fontsize=7)
    x = range(len(rows))
    axes[2].bar([i - 0.2 for i in x], [1e3 * r["latency_b1_s"] for r in rows], width=0.4, label="unmerged")
    axes[2].bar([i + 0.2 for i in x], [1e3 * r["merged_latency_b1_s"] for r in rows], width=0.4, label="merged")
    axes[2].set_xticks(list(x), labels)
    axes[2].set_ylabel("batch-1 forward (ms)")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{rows[0]['device']}, LoRA {rows[0]['lora']} (noisy on a shared CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "precision", f"preset ({', '.join(PRESETS)}) or local HF directory; repeat or comma-separate for a size sweep")
    parser.add_argument("--bases", default="bf16,int8,nf4", help=f"comma-separated base precisions, from: {', '.join(BASES)}")
    parser.add_argument("--batch-size", type=int, default=4, help="training batch")
    parser.add_argument("--seq-len", type=int, default=128, help="training sequence length")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--infer-batches", default="1,32", help="comma-separated inference batch sizes")
    parser.add_argument("--infer-seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed inference forwards per batch size (median reported)")


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    def rows(args: argparse.Namespace, models: list[str], device: str) -> list[dict[str, Any]]:
        return run(
            models, split_list(args.bases), args.batch_size, args.seq_len, args.steps, args.warmup,
            tuple(int(b) for b in split_list(args.infer_batches)), args.infer_seq_len, args.repeats, device,
        )

    return bench_main(argv, "precision", __doc__, add_arguments, run_one, rows, markdown, chart)


if __name__ == "__main__":
    main()
