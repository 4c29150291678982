"""What the benches share: model presets, one fresh subprocess per measured row, timing, memory, output files.

A bench module defines ``run_one(**job) -> dict`` (one row, measured in this process) and calls
:func:`run_rows`, which runs ``python -m <module> --_worker <job as JSON>`` per job so each row's peak
memory belongs to it alone; its ``main`` starts with :func:`worker_main`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

__all__ = [
    "METHOD_ALIASES", "PRESETS", "build_model", "check_names", "current_memory", "device_name", "forward_latency", "load_average", "matplotlib_pyplot", "peak_memory",
    "peak_rss_bytes", "random_ids", "structure",
    "reset_peak_memory", "resolve_device", "run_rows", "split_list", "time_call", "torch_dtype", "worker_main", "write_outputs",
]

#: Random-initialized model shapes. ``llama-1.1b`` is the TinyLlama-1.1B shape of ``../shared/BENCHMARKS.md``;
#: ``tiny-llama`` and ``small-llama`` (2x wider, 2x deeper: ~8x the block weights) make a size sweep on a CPU.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": ("llama", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)),
    "small-llama": ("llama", dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, vocab_size=1000)),
    "tiny-qwen2": ("qwen2", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)),
    "tiny-gpt2": ("gpt2", dict(n_embd=256, n_layer=2, n_head=4, vocab_size=1000)),
    "llama-1.1b": ("llama", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)),
}

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_model(spec: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A causal LM from a preset name (random weights) or a local Hugging Face directory."""
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    if spec in PRESETS:
        model_type, kwargs = PRESETS[spec]
        config = CONFIG_MAPPING[model_type](max_position_embeddings=8192, **kwargs)
        config._attn_implementation = "sdpa"
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"--model {spec!r} is neither a preset ({sorted(PRESETS)}) nor a local model directory.")
    if any(path.glob("*.safetensors")) or any(path.glob("*.bin")):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, local_files_only=True), dtype=dtype)


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"Unknown dtype {name!r}: choose one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


def split_list(value: str) -> list[str]:
    """``"a,b,,c"`` -> ``["a", "b", "c"]``."""
    return [x.strip() for x in value.split(",") if x.strip()]


#: Earlier spellings of bench method names, accepted on input: each method is named as its callback's ``method_name``.
METHOD_ALIASES: dict[str, str] = {"parallel": "parallel_adapter", "mam": "mam_adapter"}


def method_names(names: Sequence[str]) -> list[str]:
    """``names`` with earlier spellings replaced by the method's one name (:data:`METHOD_ALIASES`)."""
    return [METHOD_ALIASES.get(n, n) for n in names]


def check_names(kind: str, given: Sequence[str], known: Sequence[str]) -> None:
    """Raise ``ValueError`` naming every unknown entry of ``given`` and the valid ones."""
    unknown = [g for g in given if g not in known]
    if unknown:
        raise ValueError(f"Unknown {kind} {', '.join(map(repr, unknown))}: choose from {list(known)}.")


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({torch.get_num_threads()} threads)"


def peak_rss_bytes() -> int:
    """This process's peak resident set size. Linux: ``VmHWM``, which starts afresh at ``exec``; ``getrusage``'s
    ``ru_maxrss`` does not (a child started by a 1.4 GiB parent reports at least 1.4 GiB), so it is only the fallback."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_memory(dev: torch.device) -> None:
    """CUDA: restart the peak counter. CPU: nothing can reset the process peak (hence a fresh process per row)."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def current_memory(dev: torch.device) -> int:
    """Bytes in use now: ``torch.cuda.memory_allocated`` on a GPU, the process's resident set on the CPU."""
    if dev.type == "cuda":
        return torch.cuda.memory_allocated(dev)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover  (not Linux)
        return 0


def peak_memory(dev: torch.device) -> tuple[int, str]:
    """``(bytes, kind)``: ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on the CPU."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev), "cuda_max_allocated"
    return max(peak_rss_bytes(), current_memory(dev)), "process_peak_rss"  # the two counters differ by a few pages


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_call(fn: Callable[[], Any], dev: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones (device synchronized)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_rows(module: str, jobs: list[dict[str, Any]], label: Callable[[dict[str, Any]], str], progress: bool = True) -> list[dict[str, Any]]:
    """Run ``python -m <module> --_worker <job>`` for every job, one fresh subprocess each; returns their rows."""
    try:
        from tqdm.auto import tqdm

        bar = tqdm(jobs, desc=module.rsplit(".", 1)[-1], disable=not progress, file=sys.stderr)
    except ImportError:  # pragma: no cover
        bar = jobs
    rows = []
    for job in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(label(job))
        proc = subprocess.run(
            [sys.executable, "-m", module, "--_worker", json.dumps(job)],
            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{module}: {label(job)} failed:\n{proc.stderr[-4000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def worker_main(argv: list[str], run_one: Callable[..., dict[str, Any]]) -> bool:
    """In a worker subprocess (``--_worker <job>``): print ``run_one(**job)`` as the last stdout line; returns
    whether it was one."""
    if argv[:1] != ["--_worker"]:
        return False
    print(json.dumps(run_one(**json.loads(argv[1]))))
    return True


def add_common_arguments(parser: argparse.ArgumentParser, name: str, model_help: str) -> None:
    """``--model`` (repeat or comma-separate), ``--device`` and ``--out``, the options every device bench takes."""
    parser.add_argument("--model", action="append", help=f"{model_help} (default tiny-llama)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--out", default=f"bench_results/{name}", help="output prefix: writes <out>.json and <out>.png")


def bench_main(
    argv: Optional[list[str]], name: str, doc: str, add_arguments: Callable[[argparse.ArgumentParser], None],
    run_one: Callable[..., dict[str, Any]], run: Callable[[argparse.Namespace, list[str], str], list[dict[str, Any]]],
    markdown: Callable[[list[dict[str, Any]]], str], chart: Optional[Callable[[list[dict[str, Any]], Path], Optional[Path]]] = None,
) -> list[dict[str, Any]]:
    """The ``main`` of ``lightning-peft bench <name>``: a worker subprocess runs one job (``--_worker``); otherwise
    parse the arguments (the bench's own and :func:`add_common_arguments`), call ``run(args, models, device)`` and
    write the rows (:func:`write_outputs`)."""
    argv = sys.argv[1:] if argv is None else argv
    if worker_main(argv, run_one):
        return []
    parser = argparse.ArgumentParser(prog=f"lightning-peft bench {name}", description=doc.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    models = [m for spec in (args.model or ["tiny-llama"]) for m in split_list(spec)]
    rows = run(args, models, resolve_device(args.device))
    write_outputs(rows, Path(args.out), markdown, chart)
    return rows


def write_outputs(
    rows: list[dict[str, Any]], out: Path, markdown: Callable[[list[dict[str, Any]]], str],
    chart: Optional[Callable[[list[dict[str, Any]], Path], Optional[Path]]] = None,
) -> str:
    """``<out>.json`` (the rows), ``<out>.png`` (when ``chart`` and matplotlib), and the Markdown printed; returns it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    png = chart(rows, out.with_suffix(".png")) if chart is not None else None
    text = markdown(rows)
    print(text)
    print(f"\nwritten: {out.with_suffix('.json')}" + (f", {png}" if png else " (no chart)"))
    return text


def load_average() -> str:
    """``"1-min, 5-min, 15-min"`` load average of the machine (CPU timings are noisy when it exceeds the cores)."""
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def matplotlib_pyplot():
    """``matplotlib.pyplot`` with the Agg backend, or ``None`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def random_ids(model: nn.Module, batch_size: int, seq_len: int, dev: torch.device, seed: int = 0) -> torch.Tensor:
    """``(batch_size, seq_len)`` random token ids within the model's vocabulary."""
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed)).to(dev)


@torch.no_grad()
def forward_latency(model: nn.Module, batch_size: int, seq_len: int, dev: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of one generation-free forward (logits, no KV cache) of ``model`` in eval mode."""
    ids = random_ids(model, batch_size, seq_len, dev)
    was_training = model.training
    model.eval()
    try:
        return time_call(lambda: model(input_ids=ids, use_cache=False), dev, repeats, warmup)
    finally:
        model.train(was_training)


def structure(model: nn.Module) -> list[tuple[str, str, tuple[int, ...], str]]:
    """``(name, module type, parameter shape, dtype)`` of every parameter: a deterministic proxy of inference
    cost (two models with equal structure run the same kernels on the same shapes)."""
    owners = {id(p): (n, type(m).__name__) for n, m in model.named_modules() for p in m.parameters(recurse=False)}
    return [(name, owners[id(p)][1], tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters()]
