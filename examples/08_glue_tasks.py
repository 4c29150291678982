"""8. One method (LoRA r=8) across four GLUE tasks in one run, each scored with its own GLUE metric.

SST-2 (sentiment) and RTE (entailment) by accuracy, MRPC (paraphrase) by F1 of the positive class, CoLA
(acceptability) by Matthews' correlation. ``SequenceClassifier`` logs all three (``val_acc``, ``val_f1``,
``val_mcc``); sentence pairs (MRPC, RTE) go in as one ``[CLS] a [SEP] b [SEP]`` input.

    python examples/08_glue_tasks.py                    # up to 4,000 training rows per task, 1 epoch, full dev sets
    python examples/08_glue_tasks.py --tasks sst2,cola --train-rows 0    # all training rows
    python examples/08_glue_tasks.py --smoke
"""

from __future__ import annotations

import json
import sys
import time

import lightning as L
from _common import METRIC_NAMES, TASKS, glue, parser, setup, table, trainer

from lightning_peft import LoRA, count_parameters
from lightning_peft.tasks import SequenceClassifier


def run(task: str, args) -> dict:
    L.seed_everything(0, verbose=False)
    model = SequenceClassifier("all-MiniLM-L6-v2", num_labels=2, learning_rate=1e-3)
    data = glue(task, args.data_dir, train_rows=64 if args.smoke else (args.train_rows or None), batch_size=16 if args.smoke else 32)
    fit = trainer(args.smoke, callbacks=[LoRA(r=8, alpha=16, target_modules="all-linear", trainable_modules=["classifier"])])
    start = time.perf_counter()
    fit.fit(model, data)
    metric, m = TASKS[task][3], fit.callback_metrics
    return {"task": task, "GLUE metric": METRIC_NAMES[metric], "score": float(m[f"val_{metric}"]), "dev acc": float(m["val_acc"]),
            "train rows": len(data.datasets["train"]), "dev rows": len(data.datasets["val"]),
            "trainable": count_parameters(model).trainable, "seconds": round(time.perf_counter() - start, 1)}


def chart(rows: list[dict], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    bars = ax.bar([f"{r['task']}\n({r['GLUE metric']})" for r in rows], [100 * r["score"] for r in rows])
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_ylabel("dev score (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    p = parser(__doc__.split("\n\n")[0], "08_glue_tasks")
    p.add_argument("--tasks", default="sst2,mrpc,rte,cola", help=f"comma-separated, from {list(TASKS)}")
    p.add_argument("--train-rows", type=int, default=4000, help="training rows per task (0: all)")
    args = p.parse_args(argv)
    setup(args)
    rows = [run(task.strip(), args) for task in args.tasks.split(",") if task.strip()]
    title = "LoRA r=8 on all-MiniLM-L6-v2, 1 epoch per task" + (" (smoke: 64 rows)" if args.smoke else "")
    chart(rows, args.out / "glue_tasks.png", title)
    (args.out / "glue_tasks.json").write_text(json.dumps({"title": title, "rows": rows}, indent=1) + "\n")
    print(table(rows))
    print(f"chart: {args.out / 'glue_tasks.png'}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
