"""PiSSA on SST-2 (bench quality protocol) with the new classifier head at its own learning rate: python docs/bench/quality_sst2_pissa_sweep.py ALPHA LR HEAD_LR OUT.json [INIT]. Results: quality_sst2_pissa_sweep.json."""
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(2)
import lightning as L
from lightning_peft import LoRA
from lightning_peft.bench import quality
from lightning_peft.tasks._optim import adamw_with_linear_schedule

alpha, lr, head_lr = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]); init = sys.argv[5] if len(sys.argv) > 5 else "pissa"
out = Path(sys.argv[4])
rows = []
for seed in (0, 1, 2):
    quality.METHODS["pissa"] = (lambda: LoRA(r=8, alpha=alpha, target_modules="all-linear", trainable_modules=["classifier"], init=init), lr, "x")
    model, data, cbs = quality.build("pissa", "sst2", seed, Path(__file__).resolve().parents[3] / "shared" / "data", 4000, 32, None)
    orig = model.configure_optimizers
    def configure_optimizers(model=model):
        cfg = adamw_with_linear_schedule(model, lr, 0.01, 0.06)
        opt = cfg["optimizer"]
        head = {id(p) for n, p in model.named_parameters() if "classifier" in n}
        new_groups = []
        for g in opt.param_groups:
            for is_head in (False, True):
                ps = [p for p in g["params"] if (id(p) in head) == is_head]
                if ps:
                    new_groups.append({"params": ps, "weight_decay": g["weight_decay"], "lr": head_lr if is_head else lr})
        opt2 = torch.optim.AdamW(new_groups, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt2, cfg["lr_scheduler"]["scheduler"].lr_lambdas[0])
        return {"optimizer": opt2, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
    model.configure_optimizers = configure_optimizers
    t = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, callbacks=cbs)
    s = time.perf_counter(); t.fit(model, data)
    rows.append({"seed": seed, "acc": float(t.callback_metrics["val_acc"]), "seconds": time.perf_counter() - s})
    print(rows[-1], flush=True)
accs = torch.tensor([r["acc"] for r in rows])
res = {"init": init, "alpha": alpha, "lr": lr, "head_lr": head_lr, "rows": rows, "mean": accs.mean().item(), "std": accs.std().item()}
out.write_text(json.dumps(res, indent=1)); print(res)
