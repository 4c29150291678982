"""``PredictionWriter``: what ``Trainer.predict`` returns, written as JSON lines, one object per example."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, TextIO

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_peft.validation import check_value

__all__ = ["PredictionWriter", "prediction_rows"]


class PredictionWriter(BasePredictionWriter):
    """Write every example's prediction as one JSON object per line (a ``.jsonl`` file).

    ``predict_step`` returns a dict of per-example values: tensors whose first dimension is the batch (each row
    becomes a number or a nested list) and lists or tuples with one item per example (e.g. strings). A list of one
    dict per example is also accepted, and a bare tensor is written under ``"prediction"``. Each row starts with
    ``"index"``, the example's position in the predict dataset (Lightning tracks the sampler's indices; a
    ``predict_step`` may return its own ``"index"``), and carries ``"dataloader_idx"`` when there are several
    predict dataloaders. For :class:`~lightning_peft.tasks.SequenceClassifier` a row reads
    ``{"index": 0, "label": 1, "label_name": "positive", "probs": [0.1, 0.9]}`` (``label_name`` when the DataModule
    has ``label_names``). Rows follow the loader's order, which is the dataset's for the unshuffled predict loaders of
    the task DataModules.

    Several processes (DDP): each rank predicts its own share of the examples and writes it to its own part file,
    ``<stem>.rank<N><suffix>`` beside ``output_file`` (``preds.rank0.jsonl``, ``preds.rank1.jsonl``, ...). No rank
    waits for or reads another's file, so this needs no shared filesystem; concatenate the parts and sort by
    ``"index"`` for the dataset's order. In one process ``output_file`` itself is written.

    Args:
        output_file: The JSONL file to write. Missing parent folders are created.
        write_interval: ``"batch"`` appends each batch's rows as soon as it is predicted (memory stays flat; a run
            that fails keeps the rows written so far); ``"epoch"`` writes all rows at the end, from the predictions
            Lightning keeps in memory until then, through a temporary file renamed into place: a run that fails
            leaves no file, or the earlier one as it was.
        overwrite: Replace an existing file. False refuses at the start of ``predict``, before any prediction is
            made, so that an earlier run's predictions are not lost by accident. The file is opened at the first row
            written: a run that fails before that leaves the earlier file as it was.

    Example::

        trainer = L.Trainer(callbacks=[PredictionWriter("preds.jsonl")])
        trainer.predict(model, data, return_predictions=False)

    On the command line (a list of callbacks in the config gets one more with ``+=``)::

        lightning-peft predict --config configs/quickstart.yaml --ckpt_path run.ckpt \\
            --trainer.callbacks+=lightning_peft.tasks.PredictionWriter --trainer.callbacks.output_file=preds.jsonl \\
            --data.init_args.predict_file=test.tsv
    """

    def __init__(self, output_file: str, write_interval: Literal["batch", "epoch"] = "batch", overwrite: bool = False) -> None:
        check_value("PredictionWriter", "output_file", output_file, str)
        check_value("PredictionWriter", "write_interval", write_interval, Literal["batch", "epoch"])
        check_value("PredictionWriter", "overwrite", overwrite, bool)
        if not str(output_file).strip():
            raise ValueError("PredictionWriter: output_file is empty. Pass the path of the .jsonl file to write, e.g. 'preds.jsonl'.")
        super().__init__(write_interval)
        self.output_file = str(output_file)
        self.overwrite = overwrite
        self._path: Optional[Path] = None
        self._file: Optional[TextIO] = None
        self._rows_written = 0
        self._failed = False
        self._next_index: dict[int, int] = {}  # per dataloader, when Lightning has no sampler indices

    @staticmethod
    def rank_file(output_file: str, global_rank: int, world_size: int) -> Path:
        """The file a process writes: ``output_file`` in one process, ``<stem>.rank<N><suffix>`` in several."""
        path = Path(output_file).expanduser()
        return path if world_size == 1 else path.with_name(f"{path.stem}.rank{global_rank}{path.suffix}")

    # -- Lightning hooks --------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # refuses a predict_step that takes dataloader_iter
        if stage != "predict":
            return
        path = self.rank_file(self.output_file, trainer.global_rank, trainer.world_size)
        if path.is_dir():
            raise IsADirectoryError(f"PredictionWriter: output_file {str(path)!r} is a directory. Pass a file path, e.g. '{path / 'preds.jsonl'}'.")
        # every rank stops, or none: a rank that went on alone would wait forever for the others
        if not self.overwrite and trainer.strategy.reduce_boolean_decision(path.exists(), all=False):
            which = repr(str(path)) if path.exists() else f"another process's part file (this one's is {str(path)!r})"
            raise FileExistsError(
                f"PredictionWriter: {which} already exists; nothing was predicted. Pass overwrite=True"
                " (--trainer.callbacks.overwrite=true) to replace it, or choose another output_file."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path, self._rows_written, self._failed = path, 0, False

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._path is not None  # set in setup("predict")
        self._close(keep=False)
        self._rows_written, self._next_index = 0, {}

    @override
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Optional[Sequence[int]],
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        self._write(trainer, prediction, batch_indices, dataloader_idx)

    @override
    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]
    ) -> None:
        # Lightning gives the batches of a single dataloader as one flat list, of several as one list per dataloader
        per_loader = [predictions] if len(batch_indices) == 1 else predictions
        for dataloader_idx, batches in enumerate(per_loader):
            indices = batch_indices[dataloader_idx] if dataloader_idx < len(batch_indices) else []
            for i, prediction in enumerate(batches):
                self._write(trainer, prediction, indices[i] if i < len(indices) else None, dataloader_idx)
        self._close(keep=True)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close(keep=True)
        parts = "" if trainer.world_size == 1 else " (rank 0's part; each rank writes its own)"
        rank_zero_info(f"PredictionWriter: wrote {self._rows_written} predictions to {self._path}{parts}.")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._failed = True
        self._close(keep=self.interval.on_batch)  # "batch": the rows written so far stay; "epoch": no half file

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close(keep=self.interval.on_batch and not self._failed)
        if stage == "predict" and not self._failed and self._path is not None and self._rows_written == 0:
            # nothing to predict (Lightning skips an empty loader, hooks and all): an empty file says so
            self._open()
            self._close(keep=True)

    # -- rows -------------------------------------------------------------------------------------
    def _write(self, trainer: pl.Trainer, prediction: Any, batch_indices: Optional[Sequence[int]], dataloader_idx: int) -> None:
        rows = prediction_rows(prediction)
        if batch_indices:
            if len(batch_indices) != len(rows):
                raise ValueError(
                    f"PredictionWriter: predict_step returned {len(rows)} rows for a batch of {len(batch_indices)} examples."
                    " Return one item per example: tensors whose first dimension is the batch, or lists as long as the batch."
                )
            indices = list(batch_indices)
        else:  # no sampler indices (e.g. an IterableDataset): count the examples of this process in order
            start = self._next_index.get(dataloader_idx, 0)
            indices = list(range(start, start + len(rows)))
            self._next_index[dataloader_idx] = start + len(rows)
        several = len(trainer.num_predict_batches) > 1
        lines = []  # the whole batch first: a row JSON cannot hold leaves no part of its batch in the file
        for index, row in zip(indices, rows):
            head = {"index": int(index)} if "index" not in row else {}
            if several:
                head["dataloader_idx"] = dataloader_idx
            lines.append(json.dumps({**head, **row}, ensure_ascii=False, default=_not_serialisable) + "\n")
        if self._file is None:
            self._open()
        assert self._file is not None
        self._file.write("".join(lines))
        self._file.flush()
        self._rows_written += len(rows)

    def _writing_to(self) -> Path:
        """Where rows go: ``output_file`` itself ("batch"), or a temporary file beside it ("epoch")."""
        assert self._path is not None  # set in setup("predict")
        return self._path if self.interval.on_batch else self._path.with_name(f".{self._path.name}.{os.getpid()}.tmp")

    def _open(self) -> None:
        self._file = open(self._writing_to(), "w", encoding="utf-8")

    def _close(self, keep: bool) -> None:
        """Close the file; in "epoch" mode move the temporary file into place (``keep``) or remove it."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        written = self._writing_to()
        if written == self._path:
            return
        if keep:
            os.replace(written, self._path)
        else:
            written.unlink(missing_ok=True)


def prediction_rows(prediction: Any) -> list[dict[str, Any]]:
    """Split what a ``predict_step`` returned for one batch into one JSON-ready dict per example.

    Accepted: a dict of per-example values (tensors or arrays whose first dimension is the batch, lists or tuples
    with one item per example), a list of one dict per example, or a tensor (written under ``"prediction"``).
    """
    if isinstance(prediction, torch.Tensor):
        prediction = {"prediction": prediction}
    if isinstance(prediction, Mapping):
        columns = {str(key): _per_example(str(key), value) for key, value in prediction.items()}
        lengths = {key: len(column) for key, column in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"PredictionWriter: the values predict_step returned hold different numbers of examples: {lengths}."
                " Each must hold one item per example of the batch."
            )
        n = next(iter(lengths.values()), 0)
        return [{key: column[i] for key, column in columns.items()} for i in range(n)]
    if isinstance(prediction, (list, tuple)) and all(isinstance(row, Mapping) for row in prediction):
        return [{str(k): _jsonable(v) for k, v in row.items()} for row in prediction]
    raise TypeError(
        f"PredictionWriter: predict_step returned a {type(prediction).__name__}; it can write a dict of per-example"
        " values (tensors whose first dimension is the batch, lists with one item per example), a list of one dict"
        " per example, or a tensor."
    )


def _per_example(key: str, value: Any) -> list[Any]:
    if isinstance(value, torch.Tensor) and value.ndim >= 1:
        return value.detach().cpu().tolist()
    if hasattr(value, "tolist") and getattr(value, "ndim", 0) >= 1:  # a NumPy array
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    raise TypeError(
        f"PredictionWriter: predict_step's {key!r} is a {type(value).__name__}"
        f"{' with no batch dimension' if getattr(value, 'ndim', None) == 0 else ''}, not one value per example."
        " Return a tensor whose first dimension is the batch, or a list with one item per example."
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor) or (hasattr(value, "tolist") and hasattr(value, "dtype")):  # tensors, NumPy values
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _not_serialisable(value: Any) -> Any:
    raise TypeError(f"PredictionWriter: a {type(value).__name__} in a prediction cannot be written as JSON; return numbers, strings, lists or tensors.")
