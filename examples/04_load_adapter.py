"""4. Save a trained adapter, load it onto a fresh base model, evaluate: the same accuracy, the same logits.

``save_adapter`` writes Hugging Face PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``:
the LoRA matrices and the trained classifier head). ``load_adapter`` on a freshly built model reads the
config, injects the LoRA it describes, checks every tensor's shape and the base's fingerprint, and loads.

    python examples/04_load_adapter.py                  # 4,000 SST-2 rows, 1 epoch, full dev set
    python examples/04_load_adapter.py --smoke
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from _common import glue, parser, setup, table, trainer

from lightning_peft import LoRA, count_parameters, load_adapter, save_adapter
from lightning_peft.tasks import SequenceClassifier


def evaluate(model: SequenceClassifier, data, smoke: bool) -> tuple[float, torch.Tensor]:
    """Dev accuracy (through Trainer.validate) and the logits of the first dev batch."""
    acc = trainer(smoke).validate(model, data, verbose=False)[0]["val_acc"]
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        logits = model.eval()(batch).logits
    return acc, logits


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__.split("\n\n")[0], "04_load_adapter").parse_args(argv)
    setup(args)
    data = glue("sst2", args.data_dir, train_rows=64 if args.smoke else 4000, batch_size=16 if args.smoke else 32)

    trained = SequenceClassifier("all-MiniLM-L6-v2", num_labels=2)
    trainer(args.smoke, callbacks=[LoRA(r=8, alpha=16, trainable_modules=["classifier"])]).fit(trained, data)
    adapter_dir = save_adapter(trained, args.out / "sst2_adapter")
    trained_acc, trained_logits = evaluate(trained, data, args.smoke)

    L.seed_everything(1, verbose=False)  # the fresh model's new head starts from other random values
    fresh = SequenceClassifier("all-MiniLM-L6-v2", num_labels=2)
    fresh_acc, _ = evaluate(fresh, data, args.smoke)
    load_adapter(fresh, adapter_dir)
    loaded_acc, loaded_logits = evaluate(fresh, data, args.smoke)

    files = {p.name: p.stat().st_size for p in adapter_dir.iterdir()}
    rows = [
        {"model": "trained (LoRA + head)", "dev acc": trained_acc, "LoRA params": count_parameters(trained).added},
        {"model": "fresh base, new head", "dev acc": fresh_acc, "LoRA params": 0},
        {"model": "fresh base + load_adapter", "dev acc": loaded_acc, "LoRA params": count_parameters(fresh).added},
    ]
    print(table(rows))
    diff = (trained_logits - loaded_logits).abs().max().item()
    print(f"adapter files: {files}; max |logit difference| trained vs loaded: {diff:.2e}")
    return {"rows": rows, "max_logit_diff": diff, "files": files}


if __name__ == "__main__":
    main(sys.argv[1:])
