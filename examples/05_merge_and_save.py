"""5. Merge the adapter into the base weights, check the outputs do not change, save a plain Hugging Face model.

``merge_adapters`` folds ``W + s B A`` into each weight (and ``unmerge_adapters`` takes it out again);
``unload(model, merge=True)`` merges and puts plain ``nn.Linear`` layers back, so ``save_pretrained`` writes an
ordinary model that ``transformers`` loads with no lightning-peft or peft installed.

    python examples/05_merge_and_save.py                # 4,000 SST-2 rows, 1 epoch, full dev set
    python examples/05_merge_and_save.py --smoke
"""

from __future__ import annotations

import sys

import torch
from _common import SMOKE_VAL_BATCHES, glue, parser, setup, table, trainer
from torch import nn
from transformers import AutoModelForSequenceClassification

from lightning_peft import LoRA, merge_adapters, unload, unmerge_adapters
from lightning_peft.tasks import SequenceClassifier


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__.split("\n\n")[0], "05_merge_and_save").parse_args(argv)
    setup(args)
    data = glue("sst2", args.data_dir, train_rows=64 if args.smoke else 4000, batch_size=16 if args.smoke else 32)
    module = SequenceClassifier("all-MiniLM-L6-v2", num_labels=2)
    trainer(args.smoke, callbacks=[LoRA(r=8, alpha=16, trainable_modules=["classifier"])]).fit(module, data)

    model = module.model.eval()  # the Hugging Face model inside, carrying LoRA layers
    batches = list(data.val_dataloader())[: SMOKE_VAL_BATCHES if args.smoke else None]
    inputs = [{k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in b} for b in batches]

    @torch.no_grad()
    def logits(m: nn.Module) -> torch.Tensor:
        return torch.cat([m(**x).logits for x in inputs])  # (N, 2)

    def accuracy(out: torch.Tensor) -> float:
        return (out.argmax(-1) == torch.cat([b["labels"] for b in batches])).float().mean().item()

    reference = logits(model)
    rows = [{"model": "LoRA layers (unmerged)", "max abs diff": 0.0, "dev acc": accuracy(reference)}]
    merged = logits(merge_adapters(model))
    rows.append({"model": "merge_adapters", "max abs diff": (merged - reference).abs().max().item(), "dev acc": accuracy(merged)})
    unmerged = logits(unmerge_adapters(model))
    rows.append({"model": "unmerge_adapters", "max abs diff": (unmerged - reference).abs().max().item(), "dev acc": accuracy(unmerged)})

    plain = unload(model, merge=True)  # nn.Linear layers again, with W + s B A in their weights
    lora_layers = sum(type(m).__name__ == "LoRALinear" for m in plain.modules())
    plain.save_pretrained(args.out / "merged_model")
    reloaded = AutoModelForSequenceClassification.from_pretrained(args.out / "merged_model").eval()
    out = logits(reloaded)
    rows.append({"model": "saved, reloaded with transformers", "max abs diff": (out - reference).abs().max().item(), "dev acc": accuracy(out)})

    print(table(rows))
    size = sum(p.stat().st_size for p in (args.out / "merged_model").iterdir()) / 2**20
    names = [n for n, _ in reloaded.named_parameters()]
    print(f"plain model: {args.out / 'merged_model'} ({size:.1f} MiB), {len(names)} tensors, "
          f"{sum('lora' in n for n in names)} with 'lora' in the name, {lora_layers} LoRA layers left after unload")
    return {"rows": rows, "lora_layers_left": lora_layers, "reloaded_names": names,
            "linear_types": {type(m) for m in reloaded.modules() if isinstance(m, nn.Linear)}}


if __name__ == "__main__":
    main(sys.argv[1:])
