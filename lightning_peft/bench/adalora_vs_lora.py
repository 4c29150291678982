"""AdaLoRA vs LoRA at the same final rank budget on real GLUE data (all-MiniLM-L6-v2, CPU).

Protocol: ``SequenceClassifier`` on all-MiniLM-L6-v2, every linear layer of the encoder adapted and the
classifier head trained in full (as ``configs/quickstart.yaml``), AdamW with linear warmup/decay.
LoRA ``r=8``; AdaLoRA ``init_r=12 -> target_r=8`` on the same targets, so both end with the same total rank
(8 per layer on average; AdaLoRA's parameter count moves with where the ranks go and is reported).
Same training subset, steps and seeds for both; accuracy on the full GLUE dev set, measured after
training (AdaLoRA: after pruning).

Run (from the repository root, with the GLUE TSVs in ``../shared/data/glue``)::

    python -m lightning_peft.bench.adalora_vs_lora --tasks sst2 rte --seeds 0 1 2 --train-rows 640 --rte-train-rows 320 \
        --adalora-alpha 256 --delta-t 2 --out outputs/adalora_vs_lora.json

Short runs and AdaLoRA's scale. ``E`` starts at zero and Adam moves it by about ``lr`` per step, so after
``k`` steps a triplet contributes a singular value of about ``(alpha / init_r) * k * lr`` (``A`` and ``B``
are near-orthonormal), where LoRA's ``B`` (``out x r`` entries, each moving by ``lr``) reaches about
``(alpha / r) * sqrt(out) * k * lr * |A_i|``, an order of magnitude more. The paper trains for thousands of
steps; in a run of tens of steps AdaLoRA with ``alpha=16`` barely moves, hence ``--adalora-alpha``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

TASKS = {
    "sst2": {"dir": "SST-2", "text": "sentence", "pair": None, "labels": None, "max_length": 64},
    "rte": {"dir": "RTE", "text": "sentence1", "pair": "sentence2", "labels": ["entailment", "not_entailment"], "max_length": 128},
}


def run_one(task: str, method: str, seed: int, args: argparse.Namespace) -> dict:
    import lightning as L

    from lightning_peft.callbacks.adalora import AdaLoRA
    from lightning_peft.callbacks.lora import LoRA
    from lightning_peft.core import count_parameters
    from lightning_peft.tasks import SequenceClassifier, TextClassificationData

    spec = TASKS[task]
    rows = args.rte_train_rows if task == "rte" and args.rte_train_rows else args.train_rows
    data_dir = Path(args.data) / spec["dir"]
    L.seed_everything(seed, verbose=False)
    model = SequenceClassifier("all-MiniLM-L6-v2", num_labels=2, learning_rate=args.lr, weight_decay=0.01, warmup_ratio=0.06)
    data = TextClassificationData(
        train_file=str(data_dir / "train.tsv"), val_file=str(data_dir / "dev.tsv"), text_column=spec["text"],
        text_pair_column=spec["pair"], label_names=spec["labels"], max_length=spec["max_length"],
        batch_size=args.batch_size, eval_batch_size=128, max_train_rows=rows, seed=seed,
    )
    steps = args.epochs * (rows // args.batch_size + (rows % args.batch_size > 0))
    if method == "lora":
        cb = LoRA(r=8, alpha=16, target_modules="all-linear", trainable_modules=["classifier"])
    else:
        cb = AdaLoRA(
            init_r=12, target_r=8, tinit=int(args.tinit * steps), tfinal=int(args.tfinal * steps), delta_t=args.delta_t,
            orth_reg_weight=args.orth_reg_weight, alpha=args.adalora_alpha, target_modules="all-linear",
            trainable_modules=["classifier"], heatmap=False, log_ranks=False,
        )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[cb], default_root_dir=args.root,
    )
    start = time.time()
    trainer.fit(model, data)
    train_s = time.time() - start
    trainer2 = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer2.validate(model, data, verbose=False)[0]
    counts = count_parameters(model)
    result = {
        "task": task, "method": method, "seed": seed, "val_acc": float(metrics["val_acc"]), "val_f1": float(metrics["val_f1"]),
        "train_rows": rows, "steps": trainer.global_step, "train_s": round(train_s, 1), "added_params": counts.added, "trainable_params": counts.trainable,
    }
    if method == "adalora":
        result["alpha"] = args.adalora_alpha
        result["total_rank"] = sum(cb.final_ranks.values())
        result["ranks"] = cb.final_ranks
    return result


def summarize(results: list[dict]) -> list[str]:
    lines = []
    for task in dict.fromkeys(r["task"] for r in results):
        for method in ("lora", "adalora"):
            accs = [100 * r["val_acc"] for r in results if r["task"] == task and r["method"] == method]
            if not accs:
                continue
            params = [r["added_params"] for r in results if r["task"] == task and r["method"] == method]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            lines.append(
                f"{task:5s} {method:8s} acc {statistics.mean(accs):6.2f} +- {sd:4.2f} (min {min(accs):.2f}, max {max(accs):.2f}, "
                f"n={len(accs)}) | added params {min(params):,}-{max(params):,}"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["sst2", "rte"], choices=sorted(TASKS))
    parser.add_argument("--methods", nargs="+", default=["lora", "adalora"], choices=["lora", "adalora"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "glue"))
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--rte-train-rows", type=int, default=None, help="RTE's subset (its pairs are ~4x longer); default --train-rows")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--adalora-alpha", type=float, default=16.0)
    parser.add_argument("--tinit", type=float, default=0.1, help="fraction of the steps")
    parser.add_argument("--tfinal", type=float, default=0.3, help="fraction of the steps")
    parser.add_argument("--delta-t", type=int, default=5)
    parser.add_argument("--orth-reg-weight", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", default="outputs/adalora_vs_lora")
    parser.add_argument("--out", default="outputs/adalora_vs_lora.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:  # seed-major, so that an interrupted run still covers every task and method
        for task in args.tasks:
            for method in args.methods:
                r = run_one(task, method, seed, args)
                results.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "ranks"}), flush=True)
                out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    print("\n".join(summarize(results)))


if __name__ == "__main__":
    main()
