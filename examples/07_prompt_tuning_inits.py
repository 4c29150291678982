"""7. Prompt tuning on SST-2 with three initialisations of the soft prompt: random, vocabulary, task text.

``PromptTuning`` prepends ``n`` learned embeddings to every input of all-MiniLM-L6-v2 and trains only them (and
the new classifier head). The prompt starts as (a) random vectors at the scale of the word embeddings, (b) the
embeddings of randomly sampled vocabulary tokens, or (c) the embeddings of a task description's tokens (repeated
to ``n`` tokens), as in Lester et al. (2021). Same data, order, steps and learning rate for every run; the
table and chart show dev accuracy and how far each prompt moved from its start.

    python examples/07_prompt_tuning_inits.py               # 4,000 SST-2 rows, 1 epoch, full dev set
    python examples/07_prompt_tuning_inits.py --smoke
"""

from __future__ import annotations

import json
import sys
import time

import lightning as L
from _common import glue, parser, setup, table, trainer

from lightning_peft import PromptTuning, adapter_state_dict, count_parameters
from lightning_peft.tasks import SequenceClassifier

INITS = ["random", "vocab", "text"]
TASK_TEXT = "Classify the sentiment of this movie review as positive or negative:"


def run(init: str, args) -> dict:
    L.seed_everything(0, verbose=False)  # the same head initialisation and data order for every run
    model = SequenceClassifier("all-MiniLM-L6-v2", num_labels=2, learning_rate=args.lr)
    callback = PromptTuning(num_virtual_tokens=args.tokens, init=init, init_text=TASK_TEXT if init == "text" else None,
                            trainable_modules=["classifier"])
    callback.inject(model)  # the same injection the Trainer would do in setup; here we want the starting prompt
    start_prompt = next(v for k, v in adapter_state_dict(model).items() if "classifier" not in k).clone()
    data = glue("sst2", args.data_dir, train_rows=64 if args.smoke else args.train_rows, batch_size=16 if args.smoke else 32)
    fit = trainer(args.smoke, callbacks=[callback])
    began = time.perf_counter()
    fit.fit(model, data)
    prompt = next(v for k, v in adapter_state_dict(model).items() if "classifier" not in k)
    counts = count_parameters(model)
    return {"init": init, "trainable": counts.trainable, "prompt params": counts.added,
            "start norm / token": float(start_prompt.norm(dim=-1).mean()),
            "moved (rel.)": float((prompt - start_prompt).norm() / start_prompt.norm()),
            "dev acc": float(fit.callback_metrics["val_acc"]), "seconds": round(time.perf_counter() - began, 1)}


def chart(rows: list[dict], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([r["init"] for r in rows], [100 * r["dev acc"] for r in rows], color=["#999999", "#4477aa", "#cc6677"])
    for i, r in enumerate(rows):
        ax.text(i, 100 * r["dev acc"] + 0.5, f"{100 * r['dev acc']:.1f}", ha="center", fontsize=9)
    ax.set_ylim(40, 100)
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_xlabel("prompt initialisation")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    p = parser(__doc__.split("\n\n")[0], "07_prompt_tuning_inits")
    p.add_argument("--train-rows", type=int, default=4000)
    p.add_argument("--tokens", type=int, default=20, help="virtual tokens")
    p.add_argument("--lr", type=float, default=3e-2)
    args = p.parse_args(argv)
    setup(args)
    rows = [run(init, args) for init in INITS]
    n_rows = 64 if args.smoke else args.train_rows
    title = f"prompt tuning ({args.tokens} tokens) on all-MiniLM-L6-v2, SST-2: {n_rows:,} rows, 1 epoch, lr {args.lr:g}"
    chart(rows, args.out / "prompt_inits.png", title)
    (args.out / "prompt_inits.json").write_text(json.dumps({"title": title, "rows": rows}, indent=1) + "\n")
    print(table(rows))
    print(f"chart: {args.out / 'prompt_inits.png'}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
