"""``lightning-peft bench speed``: typed parameters, memory and speed of PEFT methods side by side.

For each method, on the same model, batch and sequence length, each in a fresh subprocess (so the
CPU's peak RSS belongs to that method alone):

* ``trainable`` / ``added`` / ``changed`` parameters and ``base_params`` (never one mixed number);
* ``adapter_file_bytes``: what the method's save writes (a full checkpoint for full fine-tuning);
* ``saved_bytes_per_token``: unique storages autograd saves for backward in one training forward
  (``saved_tensors_hooks``, parameters excluded), divided by the tokens of the batch;
* ``peak_memory_bytes``: ``torch.cuda.max_memory_allocated()`` on a GPU, the process's peak RSS on the CPU;
* ``step_time_s`` (median of the timed steps after warm-up) and ``tokens_per_s``.

With ``--peers peft`` Hugging Face PEFT's equivalent configuration runs in the same invocation.

Examples::

    lightning-peft bench speed --model tiny-llama --methods full,lora --peers peft
    lightning-peft bench speed --model llama-1.1b --methods full,lora,qlora --peers peft --batch-size 4 --seq-len 2048
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from lightning_peft.bench.common import (
    PRESETS,
    add_common_arguments,
    bench_main,
    build_model,
    device_name,
    matplotlib_pyplot,
    method_names,
    peak_memory,
    reset_peak_memory,
    run_rows,
    split_list,
    torch_dtype,
)

__all__ = ["METHODS", "PEERS", "PRESETS", "build_model", "register_method", "run", "run_one"]

FIELDS = (
    "method", "implementation", "model", "device", "dtype", "batch_size", "seq_len", "trainable", "added", "changed",
    "base_params", "adapter_file_bytes", "saved_bytes_per_token", "peak_memory_bytes", "peak_memory_kind", "step_time_s",
    "tokens_per_s",
)


@dataclass(frozen=True)
class BenchMethod:
    """``apply(model) -> model`` adds the method; ``save(model, dir)`` writes what the method stores."""

    apply: Callable[[nn.Module], nn.Module]
    save: Optional[Callable[[nn.Module, Path], None]] = None
    implementation: str = "lightning-peft"


def _save_ours(model: nn.Module, directory: Path) -> None:
    """The PEFT-format adapter where the method has one; else the trained tensors as safetensors (what a checkpoint keeps)."""
    from safetensors.torch import save_file

    from lightning_peft.core import adapter_modules
    from lightning_peft.io import save_adapter

    if next(adapter_modules(model), None) is not None:  # BitFit adds no layer: it trains base biases only
        try:
            save_adapter(model, directory)
            return
        except NotImplementedError:  # Houlsby, parallel adapter: no Hugging Face PEFT format
            pass
    directory.mkdir(parents=True, exist_ok=True)
    kept = {k: p.detach().contiguous() for k, p in model.named_parameters() if p.requires_grad}
    save_file(kept, str(directory / "adapter.safetensors"))


def _save_full(model: nn.Module, directory: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))


def _save_peft(model: nn.Module, directory: Path) -> None:
    model.save_pretrained(directory)


def _lora(model: nn.Module) -> nn.Module:
    from lightning_peft import LoRA

    return LoRA(r=16, alpha=32, target_modules="all-linear").inject(model)


def _peft_lora(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))


def _qlora(model: nn.Module) -> nn.Module:
    from lightning_peft.plugins import QLoRAPrecision

    dtype = next(model.parameters()).dtype
    compute = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    return QLoRAPrecision("nf4-dq", compute_dtype=compute).convert_module(_lora(model))


def _ia3(model: nn.Module) -> nn.Module:
    from lightning_peft.callbacks.ia3 import IA3

    return IA3().inject(model)


def _peft_ia3(model: nn.Module) -> nn.Module:
    from peft import IA3Config, get_peft_model

    return get_peft_model(model, IA3Config(task_type="CAUSAL_LM"))


class _Callback:
    """``apply``: inject the named callback (default settings unless given) into the model (picklable)."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        self.name, self.kwargs = name, kwargs

    def __call__(self, model: nn.Module) -> nn.Module:
        import lightning_peft

        return getattr(lightning_peft, self.name)(**self.kwargs).inject(model)


class _Peft:
    """``apply``: ``peft.get_peft_model`` with the named config class (picklable)."""

    def __init__(self, config: str, **kwargs: Any) -> None:
        self.config, self.kwargs = config, kwargs

    def __call__(self, model: nn.Module) -> nn.Module:
        import peft

        return peft.get_peft_model(model, getattr(peft, self.config)(**self.kwargs))


#: Methods of this library (``--methods``); other method files register theirs with :func:`register_method`.
#: Every method runs with its callback's defaults (LoRA: r=16, alpha=32, every linear layer of the blocks).
#: AdaLoRA runs its layers' forward and backward; its allocator (a callback hook) is not part of the step here.
METHODS: dict[str, BenchMethod] = {
    "full": BenchMethod(apply=lambda m: m.requires_grad_(True), save=_save_full, implementation="full fine-tuning"),
    "lora": BenchMethod(apply=_lora, save=_save_ours),
    "dora": BenchMethod(apply=_Callback("LoRA", r=16, alpha=32, use_dora=True), save=_save_ours),
    "pissa": BenchMethod(apply=_Callback("LoRA", r=16, alpha=32, init="pissa"), save=_save_ours),
    "qlora": BenchMethod(apply=_qlora, save=_save_ours),
    "adalora": BenchMethod(apply=_Callback("AdaLoRA", init_r=12, target_r=8, total_steps=1000, heatmap=False), save=_save_ours),
    "ia3": BenchMethod(apply=_ia3, save=_save_ours),
    "houlsby": BenchMethod(apply=_Callback("Houlsby"), save=_save_ours),
    "parallel_adapter": BenchMethod(apply=_Callback("ParallelAdapter"), save=_save_ours),
    "bitfit": BenchMethod(apply=_Callback("BitFit"), save=_save_ours),
    "prompt_tuning": BenchMethod(apply=_Callback("PromptTuning", num_virtual_tokens=20), save=_save_ours),
    "prefix_tuning": BenchMethod(apply=_Callback("PrefixTuning", num_virtual_tokens=20), save=_save_ours),
    "p_tuning_v2": BenchMethod(apply=_Callback("PTuningV2", num_virtual_tokens=20), save=_save_ours),
    "llama_adapter": BenchMethod(apply=_Callback("LlamaAdapter", adapter_len=10, adapter_layers=2), save=_save_ours),
}
#: Peer implementations of the same methods (``--peers peft``): ``{peer: {method: BenchMethod}}``.
PEERS: dict[str, dict[str, BenchMethod]] = {
    "peft": {
        "lora": BenchMethod(apply=_peft_lora, save=_save_peft, implementation="HF PEFT"),
        "dora": BenchMethod(
            apply=_Peft("LoraConfig", r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", use_dora=True), save=_save_peft,
            implementation="HF PEFT",
        ),
        "pissa": BenchMethod(
            apply=_Peft("LoraConfig", r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", init_lora_weights="pissa"), save=_save_peft,
            implementation="HF PEFT",
        ),
        "adalora": BenchMethod(
            apply=_Peft("AdaLoraConfig", init_r=12, target_r=8, total_step=1000, target_modules="all-linear"), save=_save_peft, implementation="HF PEFT",
        ),
        "ia3": BenchMethod(apply=_peft_ia3, save=_save_peft, implementation="HF PEFT"),
        "prompt_tuning": BenchMethod(apply=_Peft("PromptTuningConfig", task_type="CAUSAL_LM", num_virtual_tokens=20), save=_save_peft, implementation="HF PEFT"),
        "prefix_tuning": BenchMethod(
            apply=_Peft("PrefixTuningConfig", task_type="CAUSAL_LM", num_virtual_tokens=20, prefix_projection=True), save=_save_peft, implementation="HF PEFT",
        ),
        "p_tuning_v2": BenchMethod(apply=_Peft("PrefixTuningConfig", task_type="CAUSAL_LM", num_virtual_tokens=20), save=_save_peft, implementation="HF PEFT"),
        "llama_adapter": BenchMethod(apply=_Peft("AdaptionPromptConfig", task_type="CAUSAL_LM", adapter_len=10, adapter_layers=2), save=_save_peft, implementation="HF PEFT"),
    }
}


def register_method(name: str, method: BenchMethod, peer: Optional[tuple[str, BenchMethod]] = None) -> None:
    """Add a method (and optionally its peer implementation) to the speed bench."""
    METHODS[name] = method
    if peer is not None:
        PEERS.setdefault(peer[0], {})[name] = peer[1]


def _dir_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin"))


def run_one(
    method: str, implementation: str = "lightning-peft", model: str = "tiny-llama", batch_size: int = 4, seq_len: int = 128,
    steps: int = 5, warmup: int = 2, dtype: str = "bf16", device: str = "cpu", seed: int = 0,
) -> dict[str, Any]:
    """Measure one method in this process (``run`` calls it in a fresh subprocess per method)."""
    from lightning_peft.bench.saved_bytes import measure_saved_bytes

    table = METHODS if implementation == "lightning-peft" else PEERS[implementation]
    if method not in table:
        raise ValueError(f"Unknown method {method!r} for {implementation}: known {sorted(table)}.")
    spec = table[method]
    dev = torch.device(device)
    net = build_model(model, torch_dtype(dtype), seed).to(dev)
    before = {id(p) for p in net.parameters()}
    base_params = sum(p.numel() for p in net.parameters())
    net = spec.apply(net)
    params = list({id(p): p for p in net.parameters()}.values())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    added = sum(p.numel() for p in params if id(p) not in before)
    changed = sum(p.numel() for p in params if id(p) in before and p.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        spec.save(net, Path(tmp) / "out")
        file_bytes = _dir_bytes(Path(tmp) / "out")

    vocab = net.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(dev)
    saved = measure_saved_bytes(net, batch)
    reset_peak_memory(dev)
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-5, **({"fused": True} if dev.type == "cuda" else {}))
    net.train()
    times = []
    for step in range(warmup + steps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        loss = net(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    step_time = statistics.median(times)
    peak, peak_kind = peak_memory(dev)
    tokens = batch_size * seq_len
    return {
        "method": method, "implementation": spec.implementation, "model": model, "device": device_name(dev), "dtype": dtype,
        "batch_size": batch_size, "seq_len": seq_len, "trainable": trainable, "added": added, "changed": changed,
        "base_params": base_params, "adapter_file_bytes": file_bytes, "saved_bytes_per_token": saved / tokens,
        "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
        "step_time_s": step_time, "tokens_per_s": tokens / step_time,
    }


def run(
    models: list[str], methods: list[str], peers: list[str], batch_size: int, seq_len: int, steps: int, warmup: int,
    dtype: str, device: str, progress: bool = True,
) -> list[dict[str, Any]]:
    """Every (model, method[, peer]) in a fresh subprocess; returns the rows."""
    jobs = []
    for model in models:
        for method in method_names(methods):
            if method not in METHODS:
                raise ValueError(f"Unknown method {method!r}: known {sorted(METHODS)}.")
            jobs.append((model, method, "lightning-peft"))
            for peer in peers:
                if peer not in PEERS:
                    raise ValueError(f"Unknown peer {peer!r}: known {sorted(PEERS)}.")
                if method in PEERS[peer]:
                    jobs.append((model, method, peer))
    return run_rows(
        "lightning_peft.bench.speed",
        [dict(method=method, implementation=impl, model=model, batch_size=batch_size, seq_len=seq_len, steps=steps, warmup=warmup, dtype=dtype, device=device)
         for model, method, impl in jobs],
        label=lambda j: f"{j['method']} ({j['implementation']}) on {j['model']}", progress=progress,
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | method | implementation | trainable | added | changed | adapter file | saved/token | peak memory | step (s) | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['implementation']} | {r['trainable']:,} | {r['added']:,} | {r['changed']:,} | "
            f"{r['adapter_file_bytes'] / 2**20:.2f} MiB | {r['saved_bytes_per_token'] / 1024:.1f} KiB | "
            f"{r['peak_memory_bytes'] / 2**30:.2f} GiB | {r['step_time_s']:.3f} | {r['tokens_per_s']:,.0f} |"
        )
    if rows:
        r = rows[0]
        lines.append(f"\n{r['device']}, {r['dtype']}, batch {r['batch_size']} x {r['seq_len']}; peak memory: {r['peak_memory_kind']}.")
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], path: Path) -> Optional[Path]:
    """Tokens/s and peak memory per method, one PNG; ``None`` when matplotlib is missing."""
    plt = matplotlib_pyplot()
    if plt is None:
        return None
    labels = [f"{r['method']} ({r['implementation']})" + (f"\n{r['model']}" if len({x['model'] for x in rows}) > 1 else "") for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows)), 4))
    ax1.bar(labels, [r["tokens_per_s"] for r in rows], color="tab:blue")
    ax1.set_ylabel("tokens / s")
    ax2.bar(labels, [r["peak_memory_bytes"] / 2**30 for r in rows], color="tab:orange")
    ax2.set_ylabel(f"peak memory (GiB, {rows[0]['peak_memory_kind']})")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=8, labelrotation=30)
    fig.suptitle(f"{rows[0]['device']}, {rows[0]['dtype']}, batch {rows[0]['batch_size']} x {rows[0]['seq_len']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "speed", f"presets ({', '.join(PRESETS)}) or local HF directories; repeat or comma-separate")
    parser.add_argument("--methods", default="full,lora", help=f"comma-separated, from: {', '.join(sorted(METHODS))}")
    parser.add_argument("--peers", default="", help="comma-separated peer implementations to run too: peft")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    def rows(args: argparse.Namespace, models: list[str], device: str) -> list[dict[str, Any]]:
        return run(models, split_list(args.methods), split_list(args.peers), args.batch_size, args.seq_len, args.steps, args.warmup, args.dtype, device)

    return bench_main(argv, "speed", __doc__, add_arguments, run_one, rows, markdown, chart)


if __name__ == "__main__":
    main()
