"""``lightning-peft bench inference``: what each PEFT method adds to a forward pass, against the plain base.

Adapter layers in series (Houlsby: +2% to +30% at batch 1 in the LoRA paper's Table 1), extra virtual tokens
(prompt/prefix tuning, LLaMA-Adapter) and unmerged low-rank paths all cost time at serving; a merged LoRA or
IA3 costs nothing. For each model and method, in a fresh subprocess, on the same bf16 model (callback defaults,
LoRA r=16 alpha=32 all-linear, 20 virtual tokens for prompt/prefix methods):

* ``latency_b1_s`` / ``latency_b32_s``: median generation-free forward (logits, no KV cache) at batch 1 and 32,
  adapter unmerged, and ``merged_latency_*`` after ``unload(merge=True)`` for methods that can merge (LoRA,
  AdaLoRA, IA3);
* ``flops_b1`` / ``merged_flops_b1``: floating-point operations of one batch-1 forward counted by
  ``torch.utils.flop_counter`` (deterministic, noise-free);
* ``merged_equals_base``: the merged model has the base's module types, parameter shapes and dtypes;
* ``overhead_*_pct``: latency over the ``base`` row of the same model, in percent.

Examples::

    lightning-peft bench inference --methods lora,ia3,houlsby,parallel_adapter,prompt_tuning,prefix_tuning,llama_adapter
    lightning-peft bench inference --model tiny-llama --model small-llama --methods lora,ia3,houlsby
"""

from __future__ import annotations

import argparse
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
    device_name,
    forward_latency,
    load_average,
    matplotlib_pyplot,
    method_names,
    random_ids,
    run_rows,
    split_list,
    structure,
)

__all__ = ["METHOD_NAMES", "run", "run_one"]

DEFAULT_METHODS = "lora,ia3,houlsby,parallel_adapter,prompt_tuning,prefix_tuning,llama_adapter"


def _methods() -> dict[str, Any]:
    from lightning_peft.bench.speed import METHODS

    return {name: spec for name, spec in METHODS.items() if name != "full"}  # full fine-tuning serves as the base


#: ``base`` (the plain model) and every method of ``bench speed`` but full fine-tuning (which serves as the base does).
METHOD_NAMES: tuple[str, ...] = ("base", *_methods())


@torch.no_grad()
def _flops(model: nn.Module, seq_len: int, dev: torch.device) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    ids = random_ids(model, 1, seq_len, dev)
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False)
    return int(counter.get_total_flops())


def run_one(
    model: str = "tiny-llama", method: str = "lora", batch_sizes: tuple[int, ...] = (1, 32), seq_len: int = 128,
    repeats: int = 5, warmup: int = 1, device: str = "cpu",
) -> dict[str, Any]:
    """Measure one (model, method) row in this process (``run`` calls it in a fresh subprocess)."""
    from lightning_peft.core import adapter_modules, unload

    check_names("method", [method], list(METHOD_NAMES))
    dev = torch.device(device)
    net = build_model(model, torch.bfloat16).to(dev)
    base_structure = structure(net)
    base_params = sum(p.numel() for p in net.parameters())
    if method != "base":
        net = _methods()[method].apply(net)
    net.eval()
    layers = list(adapter_modules(net))
    mergeable = method != "base" and bool(layers) and all(m.merge_problem() is None for _, m in layers)
    row: dict[str, Any] = {
        "model": model, "method": method, "device": device_name(dev), "seq_len": seq_len, "base_params": base_params,
        "added_params": sum(p.numel() for p in {id(p): p for p in net.parameters()}.values()) - base_params,
        "mergeable": mergeable, "flops_b1": _flops(net, seq_len, dev),
    }
    for b in batch_sizes:
        row[f"latency_b{b}_s"] = forward_latency(net, b, seq_len, dev, repeats, warmup)
    if mergeable:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            unload(net, merge=True)
        row["merged_flops_b1"] = _flops(net, seq_len, dev)
        row["merged_equals_base"] = structure(net) == base_structure
        for b in batch_sizes:
            row[f"merged_latency_b{b}_s"] = forward_latency(net, b, seq_len, dev, repeats, warmup)
    row["load_average"] = load_average()
    return row


def run(
    models: list[str], methods: list[str], batch_sizes: tuple[int, ...] = (1, 32), seq_len: int = 128, repeats: int = 5,
    warmup: int = 1, device: str = "cpu", progress: bool = True,
) -> list[dict[str, Any]]:
    """``base`` and every method, per model, each in a fresh subprocess; adds the overheads over ``base``."""
    methods = method_names(methods)
    check_names("method", methods, list(METHOD_NAMES))
    methods = ["base", *[m for m in methods if m != "base"]]
    jobs = [dict(model=m, method=x, batch_sizes=list(batch_sizes), seq_len=seq_len, repeats=repeats, warmup=warmup, device=device) for m in models for x in methods]
    rows = run_rows("lightning_peft.bench.inference", jobs, label=lambda j: f"{j['method']} on {j['model']}", progress=progress)
    base = {r["model"]: r for r in rows if r["method"] == "base"}
    for r in rows:
        ref = base[r["model"]]
        for b in batch_sizes:
            for kind in ("", "merged_"):
                if f"{kind}latency_b{b}_s" in r:
                    r[f"{kind}overhead_b{b}_pct"] = 100.0 * (r[f"{kind}latency_b{b}_s"] / ref[f"latency_b{b}_s"] - 1.0)
        r["flops_overhead_pct"] = 100.0 * (r["flops_b1"] / ref["flops_b1"] - 1.0)
    return rows


def _cell(r: dict[str, Any], key: str) -> str:
    if key not in r:
        return "—"
    ms = f"{r[key] * 1e3:,.1f}"
    pct = r.get(key.replace("latency", "overhead").replace("_s", "_pct"))
    return ms if pct is None or r["method"] == "base" else f"{ms} ({pct:+.0f}%)"


def markdown(rows: list[dict[str, Any]]) -> str:
    batches = sorted({int(k[len("latency_b"):-2]) for r in rows for k in r if k.startswith("latency_b")})
    head = ["model", "method", "added params", "GFLOPs b1 (vs base)"]
    head += [f"b{b} unmerged ms (vs base)" for b in batches] + [f"b{b} merged ms (vs base)" for b in batches] + ["merged = base"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        flops = f"{r['flops_b1'] / 1e9:.3f}" + ("" if r["method"] == "base" else f" ({r['flops_overhead_pct']:+.1f}%)")
        if "merged_flops_b1" in r:
            flops += f"; merged {r['merged_flops_b1'] / 1e9:.3f}"
        cells = [r["model"], r["method"], f"{r['added_params']:,}", flops]
        cells += [_cell(r, f"latency_b{b}_s") for b in batches] + [_cell(r, f"merged_latency_b{b}_s") for b in batches]
        cells.append("—" if "merged_equals_base" not in r else ("yes" if r["merged_equals_base"] else "no"))
        lines.append("| " + " | ".join(cells) + " |")
    models = list(dict.fromkeys(r["model"] for r in rows))
    if len(models) > 1:  # the size sweep: overhead per method and model, side by side
        lines += ["", "Overhead over the base, unmerged (merged where mergeable), by model size:", ""]
        sweep = ["method"] + [f"{m} b{b}" for m in models for b in batches]
        lines += ["| " + " | ".join(sweep) + " |", "|" + "---|" * len(sweep)]
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "base"):
            cells = [method]
            for m in models:
                r = next((x for x in rows if x["model"] == m and x["method"] == method), {})
                for b in batches:
                    u, g = r.get(f"overhead_b{b}_pct"), r.get(f"merged_overhead_b{b}_pct")
                    cells.append("—" if u is None else f"{u:+.0f}%" + ("" if g is None else f" ({g:+.0f}%)"))
            lines.append("| " + " | ".join(cells) + " |")
    if rows:
        r = rows[0]
        lines.append(
            f"\n{r['device']}, bf16, seq len {r['seq_len']}, medians; load average at the end of each row: "
            + "; ".join(f"{x['model']}/{x['method']}: {x['load_average']}" for x in rows) + "."
        )
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], path: Path) -> Optional[Path]:
    """Latency overhead per method (unmerged and merged) at each batch size, one PNG; ``None`` without matplotlib."""
    plt = matplotlib_pyplot()
    if plt is None:
        return None
    batches = sorted({int(k[len("latency_b"):-2]) for r in rows for k in r if k.startswith("latency_b")})
    shown = [r for r in rows if r["method"] != "base"]
    labels = [r["method"] + (f"\n{r['model']}" if len({x["model"] for x in rows}) > 1 else "") for r in shown]
    fig, axes = plt.subplots(1, len(batches), figsize=(max(8, 1.2 * len(shown) * len(batches)), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        x = range(len(shown))
        ax.bar([i - 0.2 for i in x], [r[f"overhead_b{b}_pct"] for r in shown], width=0.4, label="unmerged")
        ax.bar([i + 0.2 for i in x], [r.get(f"merged_overhead_b{b}_pct", 0.0) for r in shown], width=0.4, label="merged")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(list(x), labels)
        ax.tick_params(axis="x", labelsize=7, labelrotation=30)
        ax.set_ylabel(f"latency over base, batch {b} (%)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{rows[0]['device']}, bf16, seq len {rows[0]['seq_len']} (noisy on a shared CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "inference", f"preset ({', '.join(PRESETS)}) or local HF directory; repeat or comma-separate for a size sweep")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, from: {', '.join(METHOD_NAMES)} (base always runs)")
    parser.add_argument("--batch-sizes", default="1,32", help="comma-separated inference batch sizes")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per batch size (median reported)")
    parser.add_argument("--warmup", type=int, default=1)


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    def rows(args: argparse.Namespace, models: list[str], device: str) -> list[dict[str, Any]]:
        return run(models, split_list(args.methods), tuple(int(b) for b in split_list(args.batch_sizes)), args.seq_len, args.repeats, args.warmup, device)

    return bench_main(argv, "inference", __doc__, add_arguments, run_one, rows, markdown, chart)


if __name__ == "__main__":
    main()
