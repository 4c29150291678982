"""2. LoRA ranks and alphas on SST-2: dev accuracy against trainable parameters, one chart.

Ranks 1, 2, 4, 8, 16 and 64 with alpha = 2r (the same scale alpha / r = 2 for all), then alpha 8, 32 and 64 at
r = 8 (scales 1, 4 and 8). LoRA sits on every linear layer of all-MiniLM-L6-v2; the new classifier head (770
parameters) trains too. Same data, order, steps and learning rate for every run.

    python examples/02_lora_rank_sweep.py               # 4,000 SST-2 rows, 1 epoch, full dev set
    python examples/02_lora_rank_sweep.py --smoke
"""

from __future__ import annotations

import json
import sys
import time

import lightning as L
from _common import glue, parser, setup, table, trainer

from lightning_peft import LoRA, count_parameters
from lightning_peft.tasks import SequenceClassifier

RANKS = [1, 2, 4, 8, 16, 64]
ALPHAS_AT_R8 = [8, 32, 64]


def run(r: int, alpha: float, args) -> dict:
    L.seed_everything(0, verbose=False)  # the same head initialisation and data order for every run
    model = SequenceClassifier("all-MiniLM-L6-v2", num_labels=2, learning_rate=1e-3)
    data = glue("sst2", args.data_dir, train_rows=64 if args.smoke else args.train_rows, batch_size=16 if args.smoke else 32)
    fit = trainer(args.smoke, callbacks=[LoRA(r=r, alpha=alpha, target_modules="all-linear", trainable_modules=["classifier"])])
    start = time.perf_counter()
    fit.fit(model, data)
    counts = count_parameters(model)
    return {"sweep": "alpha" if (r == 8 and alpha != 2 * r) else "rank", "r": r, "alpha": alpha, "scale": alpha / r,
            "trainable": counts.trainable, "LoRA params": counts.added, "dev acc": float(fit.callback_metrics["val_acc"]),
            "seconds": round(time.perf_counter() - start, 1)}


def chart(rows: list[dict], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ranks = [r for r in rows if r["sweep"] == "rank"]
    ax.plot([r["trainable"] for r in ranks], [100 * r["dev acc"] for r in ranks], "o-", label="rank sweep, alpha = 2r")
    for r in ranks:
        ax.annotate(f"r={r['r']}", (r["trainable"], 100 * r["dev acc"]), textcoords="offset points", xytext=(4, -12), fontsize=8)
    alphas = [r for r in rows if r["sweep"] == "alpha"]
    ax.plot([r["trainable"] for r in alphas], [100 * r["dev acc"] for r in alphas], "s", label="r = 8, other alphas")
    for r in alphas:
        ax.annotate(f"alpha={r['alpha']:g}", (r["trainable"], 100 * r["dev acc"]), textcoords="offset points", xytext=(6, 2), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (LoRA + classifier head, log scale)")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    p = parser(__doc__.split("\n\n")[0], "02_lora_rank_sweep")
    p.add_argument("--train-rows", type=int, default=4000)
    args = p.parse_args(argv)
    setup(args)
    runs = [(r, 2.0 * r) for r in RANKS] + [(8, float(a)) for a in ALPHAS_AT_R8]
    rows = [run(r, alpha, args) for r, alpha in runs]
    n_rows = 64 if args.smoke else args.train_rows
    title = f"LoRA on all-MiniLM-L6-v2, SST-2: {n_rows:,} train rows, 1 epoch, lr 1e-3, batch {16 if args.smoke else 32}"
    chart(rows, args.out / "rank_sweep.png", title)
    (args.out / "rank_sweep.json").write_text(json.dumps({"title": title, "rows": rows}, indent=1) + "\n")
    print(table(rows))
    print(f"chart: {args.out / 'rank_sweep.png'}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
