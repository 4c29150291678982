"""How large the adapters' updates end up, relative to the frozen weights (the figures in adalora_update_norms.json).

    python docs/bench/adalora_update_norms.py TASK METHOD SEED [JSON overrides of the callback, e.g. '{"alpha": 512.0}']

Trains a bench entry (``lightning_peft.bench.quality.METHODS``, built by ``quality.build``) under the bench protocol
on the task's training file, with no validation run, then prints the mean / median / max over the adapted layers
of ||dW||_F / ||W||_F.
A measurement script for the README's AdaLoRA paragraph, not part of the package or its tests.
"""

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import lightning as L
import torch

from lightning_peft.bench import quality
from lightning_peft.core import adapter_modules

task, method, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
overrides = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
epochs = int(os.environ.get("EPOCHS", "3" if task == "rte" else "1"))
model, data, callbacks = quality.build(method, task, seed, quality.DEFAULT_DATA_DIR)
for key, value in overrides.items():
    setattr(callbacks[0], key, value)
start = time.time()
trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, limit_val_batches=0, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks)
trainer.fit(model, data)
rel = {}
for name, layer in adapter_modules(model):
    if hasattr(layer, "delta_weight"):
        rel[name] = (layer.delta_weight().float().norm() / layer.weight.float().norm()).item()  # base weight keeps its name
values = sorted(rel.values())
largest = max(rel, key=rel.get)
print(json.dumps({"task": task, "method": method, "seed": seed, "overrides": overrides, "steps": trainer.global_step,
                  "rel_mean": round(sum(values) / len(values), 4), "rel_median": round(values[len(values) // 2], 4),
                  "rel_max": round(values[-1], 4), "largest": largest, "seconds": round(time.time() - start)}))
