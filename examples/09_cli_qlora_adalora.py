"""9. QLoRA and AdaLoRA end to end through the command line, with their YAML configs.

Runs ``lightning-peft fit --config configs/qlora.yaml`` (4-bit NF4 base, LoRA, instruction tuning on Alpaca
data; the config's tiny random Llama, so the loss, not the quality, is what to look at) and
``lightning-peft fit --config configs/adalora.yaml`` (AdaLoRA on SST-2, rank 12 per layer at first, final
budget LoRA r=8's parameter count), each
with a few overrides on the command line, then reads what they wrote: the adapters, the CSV logs, and
AdaLoRA's final rank allocation (``adalora_ranks.json``) and heatmap (``adalora_ranks.png``).

    python examples/09_cli_qlora_adalora.py             # the configs' sizes (AdaLoRA: 8,000 SST-2 rows)
    python examples/09_cli_qlora_adalora.py --smoke
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

from _common import REPO, parser, setup, table
from safetensors.torch import load_file

CLI = [shutil.which("lightning-peft")] if shutil.which("lightning-peft") else [sys.executable, "-m", "lightning_peft.cli"]


def fit(config: str, overrides: list[str], threads: int) -> None:
    cmd = [*CLI, "fit", "--config", str(REPO / "configs" / config), *overrides, "--trainer.enable_progress_bar=false"]
    print("$ lightning-peft " + " ".join(cmd[len(CLI):]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"lightning-peft fit --config {config} failed:\n{done.stderr[-3000:]}")


def logged(folder) -> dict[str, list[float]]:
    """Every metric of the CSV logger's metrics.csv under ``folder``, in step order."""
    with open(next(folder.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows if r.get(k)] for k in rows[0] if k not in ("epoch", "step")}


def adapter_summary(folder) -> dict:
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    trained_b = sum(bool(t.abs().sum() > 0) for k, t in tensors.items() if "lora_B" in k)
    return {"peft_type": config["peft_type"], "tensors": len(tensors), "lora_B trained": trained_b,
            "adapter KiB": round((folder / "adapter_model.safetensors").stat().st_size / 1024, 1)}


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__.split("\n\n")[0], "09_cli_qlora_adalora").parse_args(argv)
    setup(args)
    out, logger = args.out, "--trainer.logger=lightning.pytorch.loggers.CSVLogger"
    glue = args.data_dir / "glue" / "SST-2"

    qlora = out / "qlora"
    fit("qlora.yaml", [
        f"--data.init_args.train_file={args.data_dir / 'instructions' / 'alpaca_data_1k_sample.json'}",
        f"--trainer.callbacks.init_args.save_dir={qlora / 'adapter'}", f"--trainer.default_root_dir={qlora}",
        # the data module gets the model's tokenizer too: with a logger, Lightning refuses differing hparams of the same name
        "--data.init_args.tokenizer_name_or_path=all-MiniLM-L6-v2", logger, f"--trainer.logger.init_args.save_dir={qlora}", "--trainer.log_every_n_steps=1", "--trainer.accelerator=cpu",
        *(["--trainer.max_steps=4", "--data.init_args.max_rows=40"] if args.smoke else []),
    ], args.threads)

    adalora = out / "adalora"
    fit("adalora.yaml", [
        f"--data.init_args.train_file={glue / 'train.tsv'}", f"--data.init_args.val_file={glue / 'dev.tsv'}",
        f"--trainer.callbacks.init_args.save_dir={adalora / 'adapter'}", f"--trainer.logger.init_args.save_dir={adalora}",
        *([  # 8 steps: the schedule as fractions of the run
            "--data.init_args.max_train_rows=128", "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1",
            "--trainer.callbacks.init_args.tinit=0.25", "--trainer.callbacks.init_args.tfinal=0.25",
            "--trainer.callbacks.init_args.delta_t=1"] if args.smoke else ["--data.init_args.max_train_rows=8000"]),
    ], args.threads)

    ranks = json.loads(next(adalora.rglob("adalora_ranks.json")).read_text())["ranks"]
    # the parameter budget: rank 8 in every layer, a triplet of an in x out layer costing in + out + 1
    tensors = load_file(adalora / "adapter" / "adapter_model.safetensors")
    stored = sum(t.numel() for k, t in tensors.items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_E", "lora_B"))
    costs = [t.shape[1] + tensors[k[: -len("lora_A")] + "lora_B"].shape[0] + 1 for k, t in tensors.items() if k.endswith("lora_A")]
    heatmap = next(adalora.rglob("adalora_ranks.png"))
    q_log, a_log = logged(qlora), logged(adalora)
    rows = [
        {"run": "configs/qlora.yaml", **adapter_summary(qlora / "adapter"),
         "first loss": q_log["train_loss"][0], "last loss": q_log["train_loss"][-1], "dev acc": "-"},
        {"run": "configs/adalora.yaml", **adapter_summary(adalora / "adapter"), "first loss": a_log["train_loss"][0],
         "last loss": a_log["train_loss"][-1], "dev acc": a_log["val_acc"][-1]},
    ]
    print(table(rows))
    print(f"AdaLoRA: {len(ranks)} layers, total rank {sum(ranks.values())} (initial {12 * len(ranks)}), per-layer ranks "
          f"{min(ranks.values())}..{max(ranks.values())}, {stored:,} parameters of a budget of {8 * sum(costs):,}; heatmap: {heatmap}")
    return {"rows": rows, "ranks": ranks, "heatmap": heatmap, "qlora_log": q_log, "adalora_log": a_log,
            "adalora_params": stored, "adalora_budget": 8 * sum(costs), "adalora_max_cost": max(costs)}


if __name__ == "__main__":
    main(sys.argv[1:])
