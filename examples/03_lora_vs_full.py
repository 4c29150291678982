"""3. LoRA against full fine-tuning: accuracy, trainable parameters, checkpoint size, peak memory, wall time.

Each run is a fresh Python process (this script with ``--worker``), so its peak resident memory
(Linux's ``VmHWM``) is its own: the model, the optimizer state and training, nothing left from the other.
LoRA r=8 on every linear layer (+ the new classifier head) at lr 1e-3; full fine-tuning at lr 5e-5.

    python examples/03_lora_vs_full.py                  # 4,000 SST-2 rows, 1 epoch, full dev set
    python examples/03_lora_vs_full.py --smoke
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from _common import glue, parser, setup, table, trainer

METHODS = {"LoRA r=8": 1e-3, "full fine-tuning": 5e-5}


def worker(method: str, args) -> dict:
    """One training run in this process; the row is printed as JSON on the last line."""
    from lightning_peft import LoRA, count_parameters
    from lightning_peft.bench.common import peak_rss_bytes
    from lightning_peft.tasks import SequenceClassifier

    start = time.perf_counter()
    model = SequenceClassifier("all-MiniLM-L6-v2", num_labels=2, learning_rate=METHODS[method])
    data = glue("sst2", args.data_dir, train_rows=64 if args.smoke else args.train_rows, batch_size=16 if args.smoke else 32)
    callbacks = [LoRA(r=8, alpha=16, target_modules="all-linear", trainable_modules=["classifier"])] if method.startswith("LoRA") else []
    fit = trainer(args.smoke, callbacks=callbacks)
    fit.fit(model, data)
    ckpt = args.out / f"{method.split()[0].lower()}.ckpt"
    fit.save_checkpoint(ckpt, weights_only=True)  # with LoRA: the adapter and the head only
    size = ckpt.stat().st_size
    ckpt.unlink()
    return {"method": method, "dev acc": float(fit.callback_metrics["val_acc"]), "trainable": count_parameters(model).trainable,
            "checkpoint MiB": size / 2**20, "peak RSS MiB": peak_rss_bytes() / 2**20,
            "wall s": round(time.perf_counter() - start, 1)}


def chart(rows: list[dict], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["dev acc", "trainable", "checkpoint MiB", "peak RSS MiB", "wall s"]
    fig, axes = plt.subplots(1, len(keys), figsize=(13, 3.4))
    for ax, key in zip(axes, keys):
        ax.bar([r["method"] for r in rows], [r[key] for r in rows], color=["tab:blue", "tab:gray"])
        ax.set_title(key, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        if key == "trainable":
            ax.set_yscale("log")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    p = parser(__doc__.split("\n\n")[0], "03_lora_vs_full")
    p.add_argument("--train-rows", type=int, default=4000)
    p.add_argument("--worker", choices=list(METHODS), help="internal: run one method here, print its row as JSON")
    args = p.parse_args(argv)
    setup(args)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return []
    rows = []
    for method in METHODS:
        cmd = [sys.executable, __file__, "--worker", method, *(sys.argv[1:] if argv is None else argv)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{method} run failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    n_rows = 64 if args.smoke else args.train_rows
    title = f"all-MiniLM-L6-v2 on SST-2, {n_rows:,} train rows, 1 epoch, {args.threads} CPU thread(s)"
    chart(rows, args.out / "lora_vs_full.png", title)
    (args.out / "lora_vs_full.json").write_text(json.dumps({"title": title, "rows": rows}, indent=1) + "\n")
    print(table(rows))
    print(f"chart: {args.out / 'lora_vs_full.png'}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
