"""What every example shares: its command-line arguments, GLUE data, a quiet CPU Trainer, a Markdown table.

Not part of the library: a helper for the scripts in this folder, so each of them shows only its own idea.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here runs offline
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_peft.bench.quality import TASKS  # noqa: E402  (GLUE files, columns, metric and max length per task)
from lightning_peft.tasks import TextClassificationData  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"
SMOKE_VAL_BATCHES = 2  # smoke runs validate on the first 2 x 32 dev rows
METRIC_NAMES = {"acc": "accuracy", "f1": "F1", "mcc": "Matthews corr."}


def parser(description: str, out: str) -> argparse.ArgumentParser:
    """The arguments every example takes: ``--data-dir``, ``--smoke``, ``--threads``, ``--out``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder with glue/<TASK>/{train,dev}.tsv")
    p.add_argument("--smoke", action="store_true", help="a few rows and steps: checks that the script runs")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "examples" / out, help="where files are written")
    return p


def setup(args: argparse.Namespace) -> None:
    """Threads, output folder, a check that the data is there, seed 0."""
    if not (args.data_dir / "glue").is_dir():
        raise SystemExit(f"{args.data_dir}/glue does not exist: pass --data-dir <folder holding glue/SST-2, glue/CoLA, ...>.")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0, verbose=False)


def glue(task: str, data_dir: Path, train_rows: Optional[int], batch_size: int = 32, seed: int = 0) -> TextClassificationData:
    """A GLUE task (``sst2``, ``mrpc``, ``rte``, ``cola``): ``train_rows`` random training rows, the full dev set."""
    train_file, dev_file, columns, _, max_length = TASKS[task]
    return TextClassificationData(
        train_file=str(data_dir / train_file), val_file=str(data_dir / dev_file), max_length=max_length,
        batch_size=batch_size, eval_batch_size=32, max_train_rows=train_rows, seed=seed, **columns,
    )


def trainer(smoke: bool, **kwargs: Any) -> L.Trainer:
    """A quiet CPU Trainer (no logger, checkpoints, progress bar); smoke runs validate on a few dev batches."""
    settings = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    if smoke:
        settings["limit_val_batches"] = SMOKE_VAL_BATCHES
    return L.Trainer(**{**settings, **kwargs})


def table(rows: list[dict[str, Any]], columns: Optional[list[str]] = None) -> str:
    """Rows as a Markdown table (floats to 4 significant digits, integers with thousands separators)."""
    columns = columns or list(rows[0])

    def cell(v: Any) -> str:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return str(v)
        return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
