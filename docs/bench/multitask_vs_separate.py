"""#27's measurement: one multi-task job (``configs/multitask.yaml``: SST-2 + MRPC + CoLA on MiniLM, an adapter and
a head per task, mixed batches) against three separate single-task runs of the quality bench's LoRA protocol
(``lightning-peft bench quality --methods lora``: the same rows per task, batch 32, one epoch, lr 1e-3, r=8 all
linear, the head trained), seed by seed.

    python docs/bench/multitask_vs_separate.py --seeds 0 1 2 --out docs/bench/multitask_vs_separate.jsonl
    python docs/bench/multitask_vs_separate.py --summarize docs/bench/multitask_vs_separate.jsonl
    # the multi-task job alone, with settings on top of the config (rows marked with them):
    python docs/bench/multitask_vs_separate.py --multitask-only --extra=--data.init_args.group_by_length=true --out ...

Each run is a fresh process (its wall time includes start-up and model loading; its peak resident memory is the
process's own ``ru_maxrss``); rows are appended to the JSONL file as runs finish, so an interrupted measurement
keeps the finished seeds. Scores: accuracy (SST-2), F1 (MRPC), Matthews' correlation (CoLA) on the full dev sets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
TASKS = ("sst2", "mrpc", "cola")
METRIC = {"sst2": "acc", "mrpc": "f1", "cola": "mcc"}

_SEPARATE = """
import json, resource, sys
from pathlib import Path
from lightning_peft.bench.quality import _run_one
row = _run_one("lora", sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), 4000, 1, 32, None)
row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(row))
"""

_MULTITASK = """
import json, resource, sys, time
from lightning.pytorch import LightningDataModule, LightningModule
import lightning_peft.tasks
from lightning_peft.cli import PEFTCLI
from lightning_peft.core import count_parameters
seed, config, data_dir, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
start = time.perf_counter()
cli = PEFTCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
              save_config_kwargs={"overwrite": True},
              args=["fit", "--config", config, "--seed_everything", seed, "--data.init_args.seed", seed,
                    "--data.init_args.data_dir", data_dir, "--trainer.enable_progress_bar=false",
                    "--trainer.enable_model_summary=false", *extra])
m = cli.trainer.callback_metrics
row = {"seed": int(seed), "seconds_fit": round(time.perf_counter() - start, 1),
       "scores": {"sst2": float(m["val_acc_sst2"]), "mrpc": float(m["val_f1_mrpc"]), "cola": float(m["val_mcc_cola"])},
       "val_score": float(m["val_score"]), "trainable": count_parameters(cli.model).trainable,
       "steps": cli.trainer.global_step, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
print("RESULT " + json.dumps(row))
"""


def _child(code: str, *args: str) -> dict:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"run {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    row = json.loads(lines[-1][len("RESULT "):])
    row["wall_s"] = round(wall, 1)
    return row


def measure(seeds: list[int], out: Path, multitask_only: bool = False, extra: tuple[str, ...] = ()) -> None:
    config = str(REPO / "lightning_peft" / "configs" / "multitask.yaml")
    for seed in seeds:
        for task in () if multitask_only else TASKS:
            row = _child(_SEPARATE, task, str(seed), str(DATA))
            rec = {"kind": "separate", "task": task, "seed": seed, "score": row["score"], "wall_s": row["wall_s"],
                   "fit_s": row["seconds"], "peak_rss_mib": round(row["peak_rss_mib"], 1), "train_rows": row["train_rows"]}
            _append(out, rec)
        row = _child(_MULTITASK, str(seed), config, str(DATA / "glue"), *extra)
        rec = {"kind": "multitask", "extra": list(extra), "seed": seed, "scores": row["scores"], "val_score": row["val_score"], "wall_s": row["wall_s"],
               "fit_s": row["seconds_fit"], "peak_rss_mib": round(row["peak_rss_mib"], 1), "steps": row["steps"]}
        _append(out, rec)


def _append(out: Path, rec: dict) -> None:
    print(json.dumps(rec), flush=True)
    with out.open("a") as f:
        f.write(json.dumps(rec) + "\n")


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}"


def summarize(path: Path) -> None:
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if not r.get("superseded")]  # a run measured again (the row says why)
    variants = sorted({tuple(r.get("extra", [])) for r in rows if r["kind"] == "multitask"})
    for extra in variants:
        print(f"== multitask {' '.join(extra) or '(the config as shipped)'}")
        _summarize(rows, {r["seed"]: r for r in rows if r["kind"] == "multitask" and tuple(r.get("extra", [])) == extra})


def _summarize(rows: list[dict], multi: dict[int, dict]) -> None:
    seeds = sorted(s for s in multi if all(any(r["kind"] == "separate" and r["seed"] == s and r["task"] == t for r in rows) for t in TASKS))
    print(f"complete seeds: {seeds}")
    for t in TASKS:
        sep = [next(r["score"] for r in rows if r["kind"] == "separate" and r["seed"] == s and r["task"] == t) for s in seeds]
        mt = [multi[s]["scores"][t] for s in seeds]
        print(f"{t} ({METRIC[t]}): separate {_ms(sep)} {sep}; multitask {_ms(mt)} {mt}")
    sep_wall = [sum(r["wall_s"] for r in rows if r["kind"] == "separate" and r["seed"] == s) for s in seeds]
    mt_wall = [multi[s]["wall_s"] for s in seeds]
    print(f"wall per seed: separate (3 runs) {sep_wall}, multitask {mt_wall}")
    print(f"peak RSS MiB: separate max {max(r['peak_rss_mib'] for r in rows if r['kind'] == 'separate')}, "
          f"multitask max {max(multi[s]['peak_rss_mib'] for s in seeds)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench" / "multitask_vs_separate.jsonl")
    parser.add_argument("--summarize", type=Path)
    parser.add_argument("--multitask-only", action="store_true", help="only the multi-task job (the separate runs are already measured)")
    parser.add_argument("--extra", action="append", default=[], help="a command-line setting for the multi-task job (repeatable)")
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize)
    else:
        measure(args.seeds, args.out, args.multitask_only, tuple(args.extra))


if __name__ == "__main__":
    main()
