"""Reading tables, the loaders the DataModules share (dynamic padding, resumable shuffling), text classification.

Both tokenize once in ``setup`` and pad each batch to its own longest sequence (dynamic padding),
on the right. The tokenizer is the LightningModule's ``tokenizer`` unless one is given.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Callable, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_peft.tasks._hf import ensure_pad_token, load_tokenizer
from lightning_peft.validation import check_value

__all__ = ["ResumableLoader", "TextClassificationData", "read_table"]

TableFormat = Literal["auto", "tsv", "csv", "jsonl", "json"]
_SUFFIX_FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "json"}


# ----------------------------------------------------------------------------------------------
# Reading tables


def _check_exists(path: Path) -> None:
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to the working directory {os.getcwd()})"
        kind = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"Data file {str(path)!r}{where} {kind}. Check the path in your config.")


def _read_rows(path: str | os.PathLike, format: TableFormat, has_header: bool) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a table with the line (TSV/CSV/JSONL) or 1-based item (JSON) number of each."""
    file = Path(path).expanduser()
    _check_exists(file)
    if format == "auto":
        if file.suffix.lower() not in _SUFFIX_FORMATS:
            raise ValueError(
                f"Cannot tell the format of {str(file)!r} from its suffix {file.suffix!r}. Use one of"
                f" {list(_SUFFIX_FORMATS)} or pass format= one of {list(_SUFFIX_FORMATS.values())}."
            )
        format = _SUFFIX_FORMATS[file.suffix.lower()]  # type: ignore[assignment]
    if format not in ("tsv", "csv") and not has_header:
        raise ValueError(f"has_header=False applies to TSV/CSV files only; {str(file)!r} is read as {format}.")

    rows: list[tuple[int, dict[str, Any]]] = []
    # utf-8-sig drops a byte-order mark (GLUE's MRPC starts with one).
    with open(file, newline="", encoding="utf-8-sig") as f:
        if format in ("tsv", "csv"):
            # TSV fields are never quoted (GLUE sentences contain bare '"'); CSV follows the usual quoting.
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if format == "tsv" else csv.reader(f)
            columns: Optional[list[str]] = None
            for fields in reader:
                if not fields:  # blank line
                    continue
                if columns is None:
                    if has_header:
                        columns = [c.strip() for c in fields]
                        continue
                    columns = [str(i) for i in range(len(fields))]
                if len(fields) != len(columns):
                    raise ValueError(
                        f"{str(file)!r} line {reader.line_num} has {len(fields)} fields, expected {len(columns)}"
                        f" (columns {columns}). Fix the row, or check the delimiter/has_header setting."
                    )
                rows.append((reader.line_num, dict(zip(columns, fields))))
        elif format == "jsonl":
            for line_num, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{str(file)!r} line {line_num} is not valid JSON: {err}.") from err
                if not isinstance(obj, dict):
                    raise ValueError(
                        f"{str(file)!r} line {line_num} is a JSON {type(obj).__name__}, expected an object per line."
                    )
                rows.append((line_num, obj))
        else:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{str(file)!r} is not valid JSON: {err}.") from err
            if not isinstance(data, list) or not all(isinstance(o, dict) for o in data):
                raise ValueError(
                    f"{str(file)!r} must hold a JSON list of objects (one per example), got"
                    f" {type(data).__name__}. For one object per line, name the file .jsonl."
                )
            rows = list(enumerate(data, start=1))
    return rows


def read_table(
    path: str | os.PathLike, format: TableFormat = "auto", has_header: bool = True
) -> list[dict[str, Any]]:
    """Read a .tsv/.csv/.jsonl/.json table into a list of row dicts.

    Args:
        path: The file.
        format: ``"auto"`` picks the format from the suffix. TSV is read with quoting off (as
            GLUE needs); CSV with standard quoting; JSONL has one object per line; JSON is a list
            of objects. A UTF-8 byte-order mark is dropped.
        has_header: TSV/CSV only. False for files without a header row (e.g. GLUE CoLA): the
            columns are then named by their index as strings, ``"0"``, ``"1"``, ...

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        ValueError: If the format is unknown, or a row is malformed (its line number is given).
    """
    return [row for _, row in _read_rows(path, format, has_header)]


# ----------------------------------------------------------------------------------------------
# Shared DataModule plumbing


class _ListDataset(Dataset):
    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


class _PadCollator:
    """Right-pad every sequence of a batch to the batch's longest (a class, so workers can pickle it)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0, "labels": -100}

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        batch = {}
        for key in examples[0]:
            values = [e[key] for e in examples]
            if isinstance(values[0], int):  # one class id per example
                batch[key] = torch.tensor(values, dtype=torch.long)  # (B,)
            else:
                pad = self.pad_values[key]
                batch[key] = torch.tensor([v + [pad] * (longest - len(v)) for v in values], dtype=torch.long)  # (B, T)
        return batch


def _attached_module(dm: L.LightningDataModule) -> Optional[L.LightningModule]:
    trainer = getattr(dm, "trainer", None)
    return None if trainer is None else trainer.lightning_module


def _resolve_tokenizer(dm: L.LightningDataModule, own: Any) -> Any:
    if own is not None:
        return own
    tokenizer = getattr(_attached_module(dm), "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            f"{type(dm).__name__} has no tokenizer: pass tokenizer_name_or_path=..., or use it in a Trainer"
            " whose LightningModule has a `tokenizer` attribute (SequenceClassifier and CausalLM do)."
        )
    return tokenizer


#: Batches whose rows are sorted by length together by :func:`group_by_length`.
GROUP_BATCHES = 50


def group_by_length(
    indices: torch.Tensor, lengths: torch.Tensor, batch_size: int, generator: torch.Generator, group_batches: int = GROUP_BATCHES
) -> torch.Tensor:
    """``indices`` (an epoch's order) reordered so that batches hold rows of similar lengths: each run of
    ``group_batches`` batches is sorted by length (longest first, stable), cut into batches again, and the whole batches
    are shuffled with ``generator`` (the last, partial batch stays last). The epoch keeps its rows; each batch pads
    less when lengths differ."""
    span = batch_size * group_batches
    groups = []
    for start in range(0, len(indices), span):
        chunk = indices[start : start + span]
        groups.append(chunk[torch.argsort(lengths[chunk], descending=True, stable=True)])
    indices = torch.cat(groups)
    full = len(indices) // batch_size
    order = torch.randperm(full, generator=generator)
    head = indices[: full * batch_size].view(full, batch_size)[order].reshape(-1)
    return torch.cat([head, indices[full * batch_size :]])


class ResumableBatches(Sampler[list[int]]):
    """Shuffled batches of indices, a different reproducible order every epoch, that resume mid-epoch.

    The order is exactly ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))``'s (per epoch
    the loader's iterator draws a seed from the generator, then ``RandomSampler`` one ``randperm`` and one more when
    it is exhausted), so runs are unchanged.
    :meth:`state_dict` records the generator state at the start of the current epoch; after
    :meth:`load_state_dict` with ``consumed`` batches, the next iteration replays that epoch's order and skips the
    batches already trained on (or, if the epoch was complete, starts the next one).

    With ``lengths`` (tokens per row) the epoch's order is then grouped by length (:func:`group_by_length`, the
    batches shuffled with a generator seeded from the epoch's state, so a resume replays it too).
    """

    def __init__(self, n: int, batch_size: int, seed: int, lengths: Optional[Sequence[int]] = None) -> None:
        self.n, self.batch_size = n, batch_size
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"ResumableBatches: lengths has {len(lengths)} entries for {n} rows: give one per row.")
        self.lengths = None if lengths is None else torch.as_tensor(list(lengths), dtype=torch.long)
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_state: torch.Tensor = self.generator.get_state()
        self._resume: Optional[tuple[torch.Tensor, int]] = None

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        skip = 0
        if self._resume is not None:
            state, skip = self._resume
            self._resume = None
            self.generator.set_state(state)
            if skip >= len(self):  # the saved epoch was complete: draw past it (and past the next iterator's seed)
                torch.randperm(self.n, generator=self.generator)
                torch.randperm(self.n, generator=self.generator)
                torch.empty((), dtype=torch.int64).random_(generator=self.generator)
                skip = 0
        self.epoch_state = self.generator.get_state()
        order = torch.randperm(self.n, generator=self.generator)
        torch.randperm(self.n, generator=self.generator)  # RandomSampler's trailing draw, as it is exhausted
        if self.lengths is not None:
            digest = hashlib.sha256(self.epoch_state.numpy().tobytes()).digest()
            shuffle = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            order = group_by_length(order, self.lengths, self.batch_size, shuffle)
        order = order.tolist()
        for start in range(skip * self.batch_size, self.n, self.batch_size):
            yield order[start : start + self.batch_size]

    def resume(self, epoch_state: torch.Tensor, consumed: int) -> None:
        self._resume = (epoch_state, consumed)


class ResumableLoader(DataLoader):
    """A training ``DataLoader`` whose position Lightning saves in checkpoints and restores on resume.

    Lightning calls :meth:`state_dict` when it saves a checkpoint (the fit loop's ``combined_loader`` state) and
    :meth:`load_state_dict` before it iterates again after ``fit(ckpt_path=...)``. The state holds the epoch's
    shuffle (:class:`ResumableBatches`), the batches the training loop has finished (``progress()``), and torch's
    global RNG state (dropout), so a run killed at any step and resumed trains on the same batches with the same
    random numbers as an uninterrupted one.

    Args:
        dataset: The training examples.
        batch_size: Rows per batch of the default :class:`ResumableBatches`; unused with ``batch_sampler``.
        seed: Seed of the default batches' shuffle (and of the workers' base seed with ``batch_sampler``).
        progress: How many batches of the current epoch the training loop has finished.
        batch_sampler: Any resumable batch sampler instead of ``ResumableBatches(len(dataset), batch_size, seed)``:
            it has ``epoch_state`` (what replays the epoch being iterated, saved in checkpoints) and
            ``resume(epoch_state, consumed)`` (the next iteration replays that epoch less its first ``consumed``
            batches, or starts the next epoch if it was complete), e.g. ``MultiTaskBatches``.
        **kwargs: Other ``DataLoader`` arguments (``collate_fn``, ``num_workers``, ...).
    """

    def __init__(
        self, dataset: Dataset, batch_size: Optional[int], seed: int, progress: Callable[[], int],
        batch_sampler: Optional[Sampler[list[int]]] = None, **kwargs: Any,
    ) -> None:
        if batch_sampler is None:
            batches = ResumableBatches(len(dataset), batch_size, seed)
            generator = batches.generator
        else:
            missing = [a for a in ("epoch_state", "resume") if not hasattr(batch_sampler, a)]
            if missing:
                raise TypeError(
                    f"ResumableLoader: the batch sampler {type(batch_sampler).__name__} lacks {missing}: give it"
                    " `epoch_state` and `resume(epoch_state, consumed)` (see ResumableBatches), or use a plain DataLoader."
                )
            # a generator of its own: the loader draws its workers' base seed from it each epoch, which must not move
            # torch's global RNG (restored at resume, after that draw in the uninterrupted run)
            batches, generator = batch_sampler, getattr(batch_sampler, "generator", None) or torch.Generator().manual_seed(seed)
        super().__init__(dataset, batch_sampler=batches, generator=generator, **kwargs)
        self._progress = progress
        self._rng: Optional[torch.Tensor] = None

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch_rng": self.batch_sampler.epoch_state, "consumed": int(self._progress()), "torch_rng": torch.get_rng_state(),
                 "grouped": getattr(self.batch_sampler, "lengths", None) is not None}
        replicas = getattr(self.batch_sampler, "num_replicas", None)
        if replicas is None:  # a sampler of one process
            return state
        state.update(num_replicas=int(replicas), share_batches=len(self.batch_sampler))
        import torch.distributed as dist

        if replicas > 1 and dist.is_available() and dist.is_initialized():
            # several processes, each with its own share of batches and its own random numbers (dropout): the
            # checkpoint (written by rank 0) keeps every rank's. Lightning collects this state on every rank.
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, state["torch_rng"])
            state["torch_rng_per_rank"] = states
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        consumed = int(state_dict["consumed"])
        now = getattr(self.batch_sampler, "num_replicas", None)
        saved, share = state_dict.get("num_replicas"), state_dict.get("share_batches")
        if now is not None and saved is None:  # written before the state recorded it: by one process
            saved, share = 1, getattr(self.batch_sampler, "epoch_batches", None)
        if now is not None and saved != now and share is not None:
            if 0 < consumed < share:
                raise ValueError(
                    f"ResumableLoader: the checkpoint was saved mid-epoch by {saved} process(es), each {consumed} of its"
                    f" {share} batches into the epoch; {now} process(es) would share the epoch's batches otherwise, so no"
                    f" position here resumes it exactly. Resume with {saved} process(es), or from a checkpoint saved at an"
                    " epoch's end."
                )
            if consumed >= share:  # the saved epoch was complete: the next one starts, whatever this share's length
                consumed = len(self.batch_sampler)
        grouped = getattr(self.batch_sampler, "lengths", None) is not None
        was_grouped = state_dict.get("grouped")
        if was_grouped is None and isinstance(self.batch_sampler, ResumableBatches):
            was_grouped = False  # written before ResumableBatches could group
        if was_grouped is not None and was_grouped != grouped and 0 < consumed < len(self.batch_sampler):
            raise ValueError(
                f"ResumableLoader: the checkpoint was saved mid-epoch with group_by_length={was_grouped}, and"
                f" this run has group_by_length={grouped}: the epoch's batches differ, so its position cannot be resumed."
                " Resume with the setting it was saved with, or from a checkpoint saved at an epoch's end."
            )
        self.batch_sampler.resume(state_dict["epoch_rng"], consumed)
        per_rank = state_dict.get("torch_rng_per_rank")
        rank = int(getattr(self.batch_sampler, "rank", 0))
        self._rng = per_rank[rank] if per_rank and saved == now else state_dict.get("torch_rng")

    def __iter__(self):
        if self._rng is not None:  # resuming: the random numbers continue where the saved run was
            torch.set_rng_state(self._rng)
            self._rng = None
        return super().__iter__()


def _loader(
    dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int, collate: _PadCollator,
    progress: Optional[Callable[[], int]] = None, grouped: bool = False,
) -> DataLoader:
    """The loader of one split. Training (``shuffle`` with ``progress``): a :class:`ResumableLoader`, its rows grouped
    by length if ``grouped``; under a distributed strategy (no ``progress``) a plain one for Lightning to shard."""
    common = dict(num_workers=num_workers, persistent_workers=num_workers > 0, collate_fn=collate)
    if shuffle and progress is not None:  # training in one process: a seeded order every epoch, resumable mid-epoch
        batches = None
        if grouped:
            lengths = [len(row["input_ids"]) for row in dataset.examples]  # type: ignore[attr-defined]
            batches = ResumableBatches(len(dataset), batch_size, seed, lengths)  # type: ignore[arg-type]
        return ResumableLoader(dataset, batch_size, seed, progress, batch_sampler=batches, **common)
    if grouped and shuffle:
        rank_zero_warn(
            "group_by_length has no effect under a distributed strategy: Lightning's DistributedSampler shuffles the"
            " rows. Batches are padded to their longest row as without it."
        )
    # evaluation; or training under a distributed strategy, where Lightning puts in its DistributedSampler (which
    # resumes at epoch boundaries, not mid-epoch)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, **common)


def lightning_shards_loaders(trainer: Optional[L.Trainer]) -> bool:
    """Whether the training loader is Lightning's to shard: under any distributed strategy (DDP, FSDP, DeepSpeed, ...),
    one device included (``strategy="ddp", devices=1``), not only when the world size is above 1. (With
    ``Trainer(use_distributed_sampler=False)`` Lightning puts no sampler in, and every process then gets the same
    shuffle: sharding is then the user's.)"""
    return trainer is not None and trainer.distributed_sampler_kwargs is not None


def _trained_batches(dm: L.LightningDataModule, sharded_by_us: bool = False) -> Optional[Callable[[], int]]:
    """How many batches of the current epoch the fit loop has trained on (read when a checkpoint is saved); None
    under a distributed strategy (the loader is then Lightning's to shard), unless the loader shards itself
    (``sharded_by_us``: every process then counts its own batches, the same number)."""
    if not sharded_by_us and lightning_shards_loaders(getattr(dm, "trainer", None)):
        return None

    def progress() -> int:
        trainer = getattr(dm, "trainer", None)
        return 0 if trainer is None else trainer.fit_loop.epoch_loop.batch_progress.current.processed

    return progress


def _check_loader_args(
    owner: str, batch_size: int, eval_batch_size: Optional[int], num_workers: int, max_length: int
) -> None:
    for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("max_length", max_length)):
        if value is not None and value < 1:
            raise ValueError(f"{owner}: {name} must be >= 1, got {value}.")
    if num_workers < 0:
        raise ValueError(f"{owner}: num_workers must be >= 0, got {num_workers}.")


# ----------------------------------------------------------------------------------------------
# Text classification


def _tokenize_table(
    file: str,
    tokenizer: Any,
    *,
    text_column: str,
    text_pair_column: Optional[str],
    label_column: str,
    label_names: Optional[list[str]],
    num_labels: int,
    max_length: int,
    has_header: bool = True,
    max_rows: Optional[int] = None,
    seed: int = 0,
    labels_optional: bool = False,
) -> list[dict[str, Any]]:
    """Read a classification table and tokenize it: one ``{"input_ids", "attention_mask", ["token_type_ids"],
    "labels"}`` dict per row (:class:`TextClassificationData`'s files, and each task's of ``MultiTaskData``).

    Args:
        file: The table (.tsv/.csv/.jsonl/.json).
        tokenizer: A Hugging Face tokenizer; texts (or text pairs) are truncated to ``max_length`` tokens.
        text_column: Column with the text.
        text_pair_column: Column with the second text of a pair; None for single texts.
        label_column: Column with the label.
        label_names: Text labels in class-id order; None means labels are integer class ids in ``[0, num_labels)``.
        num_labels: Number of classes.
        max_length: Longer inputs are truncated to this many tokens.
        has_header: False for headerless TSV/CSV (columns ``"0"``, ``"1"``, ...).
        max_rows: Keep this many rows, drawn with ``seed`` (in file order); None keeps all.
        seed: Seed of the ``max_rows`` draw.
        labels_optional: Rows carry ``labels`` only if the file has ``label_column`` (prediction files).

    Raises:
        ValueError: If the file has no rows, lacks a column, or a label is not allowed (its row is named).
    """
    numbered = _read_rows(file, "auto", has_header)
    if not numbered:
        raise ValueError(f"{file!r} has no data rows.")
    if max_rows is not None and max_rows < len(numbered):
        keep = sorted(random.Random(seed).sample(range(len(numbered)), max_rows))
        numbered = [numbered[i] for i in keep]

    found = list(numbered[0][1])
    with_labels = not labels_optional or label_column in found
    expected = [c for c in (text_column, text_pair_column) if c is not None]
    expected += [label_column] if with_labels else []
    missing = [c for c in expected if c not in found]
    if missing:
        hint = "" if has_header else " (a file read with has_header=False has columns '0', '1', ...)"
        raise ValueError(
            f"{file!r} lacks the column(s) {missing}. Columns found: {found}; expected: {expected}. Set"
            f" text_column / text_pair_column / label_column to the file's column names{hint}, or set"
            " has_header=False if the file has no header row."
        )
    for line, row in numbered:
        absent = [c for c in expected if c not in row]
        if absent:
            raise ValueError(f"{file!r} row {line} lacks the column(s) {absent}; expected: {expected}.")

    texts = [str(row[text_column]) for _, row in numbered]
    pairs = [str(row[text_pair_column]) for _, row in numbered] if text_pair_column else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    examples = [{k: encoded[k][i] for k in keys} for i in range(len(texts))]
    if with_labels:
        for example, (line, row) in zip(examples, numbered):
            example["labels"] = _label_id(row[label_column], file, line, label_names, num_labels)
    return examples


def _label_id(value: Any, file: str, line: int, names: Optional[list[str]], num_labels: int) -> int:
    if names is not None:
        if str(value).strip() in names:
            return names.index(str(value).strip())
        raise ValueError(
            f"{file!r} row {line}: label {value!r} is not in label_names {names}. Add it to label_names"
            " (in class-id order) or fix the row."
        )
    allowed = f"integer class ids 0..{num_labels - 1}"
    try:
        label = int(value.strip()) if isinstance(value, str) else value
    except ValueError:
        label = None
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < num_labels:
        raise ValueError(
            f"{file!r} row {line}: label {value!r} is not allowed; labels must be {allowed}"
            f" (num_labels={num_labels}). For text labels pass label_names=[...] in class-id order."
        )
    return label


class TextClassificationData(L.LightningDataModule):
    """Text (or text-pair) classification from TSV/CSV/JSONL/JSON files, e.g. GLUE.

    Every file is tokenized once in ``setup``; batches are padded to their longest sequence.

    Args:
        train_file: Training table (needed to fit).
        val_file: Validation table; None skips validation.
        test_file: Test table, with labels.
        predict_file: Table to predict on; labels are used only if present.
        text_column: Column with the text.
        text_pair_column: Column with the second text of a pair (MRPC, RTE); None for single texts.
        label_column: Column with the label.
        label_names: Text labels in class-id order, e.g. ``["entailment", "not_entailment"]`` for
            RTE; None means labels are integer class ids.
        num_labels: Number of classes; None takes the model's ``hparams.num_labels`` (or
            ``len(label_names)``, else 2). Labels must lie in ``[0, num_labels)``.
        max_length: Longer inputs are truncated to this many tokens.
        batch_size: Training batch size.
        eval_batch_size: Batch size for validation, test and predict; None uses ``batch_size``.
        num_workers: DataLoader worker processes.
        has_header: False for headerless TSV/CSV (e.g. CoLA); columns are then ``"0"``, ``"1"``, ...
        max_train_rows: Train on a random subset of this many rows (drawn with ``seed``); None uses all.
        seed: Seed of the training subset and of the per-epoch shuffle.
        tokenizer_name_or_path: Tokenizer directory; None uses the LightningModule's ``tokenizer``.
        group_by_length: Put training rows of similar lengths in the same batches (:func:`group_by_length`): each run
            of 50 batches of the epoch's shuffle sorted by length, the batches shuffled. Each epoch keeps its rows,
            batches pad less; still resumable mid-epoch. One process only (under DDP Lightning's sampler shuffles).

    Example::

        # GLUE RTE: text pairs with string labels
        data = TextClassificationData(
            train_file="RTE/train.tsv", val_file="RTE/dev.tsv", text_column="sentence1",
            text_pair_column="sentence2", label_names=["entailment", "not_entailment"],
        )
    """

    def __init__(
        self,
        train_file: Optional[str] = None,
        val_file: Optional[str] = None,
        test_file: Optional[str] = None,
        predict_file: Optional[str] = None,
        text_column: str = "sentence",
        text_pair_column: Optional[str] = None,
        label_column: str = "label",
        label_names: Optional[list[str]] = None,
        num_labels: Optional[int] = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        has_header: bool = True,
        max_train_rows: Optional[int] = None,
        seed: int = 0,
        tokenizer_name_or_path: Optional[str] = None,
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_value(owner, "group_by_length", group_by_length, bool)
        _check_loader_args(owner, batch_size, eval_batch_size, num_workers, max_length)
        if label_names is not None and len(set(label_names)) != len(label_names):
            raise ValueError(f"{owner}: label_names must be distinct, got {label_names}.")
        if label_names is not None and num_labels is not None and len(label_names) != num_labels:
            raise ValueError(
                f"{owner}: label_names has {len(label_names)} names {label_names} but num_labels={num_labels}."
                " Drop num_labels or make them agree."
            )
        if num_labels is not None and num_labels < 2:
            raise ValueError(f"{owner}: num_labels must be >= 2, got {num_labels}.")
        if max_train_rows is not None and max_train_rows < 1:
            raise ValueError(f"{owner}: max_train_rows must be >= 1 or None (all rows), got {max_train_rows}.")
        # None means "take it from the LightningModule": not recorded, so a logger's merge of the module's and the
        # data's hyperparameters does not see two different values for one key
        self.save_hyperparameters(ignore=[k for k, v in (("num_labels", num_labels), ("tokenizer_name_or_path", tokenizer_name_or_path)) if v is None])
        self.tokenizer = load_tokenizer(tokenizer_name_or_path) if tokenizer_name_or_path else None
        self.num_labels: Optional[int] = None  # resolved in setup
        self.datasets: dict[str, _ListDataset] = {}

    # -- setup ---------------------------------------------------------------------------------

    def _resolve_num_labels(self) -> int:
        hp = self.hparams
        own = hp.get("num_labels") if hp.get("num_labels") is not None else (len(hp.label_names) if hp.label_names else None)
        module = _attached_module(self)
        model_n = getattr(module, "hparams", {}).get("num_labels") if module is not None else None
        if own is not None and model_n is not None and own != model_n:
            raise ValueError(
                f"TextClassificationData expects {own} labels (num_labels/label_names) but the model has"
                f" num_labels={model_n}. Make them agree."
            )
        return own if own is not None else (model_n if model_n is not None else 2)

    def setup(self, stage: Optional[str] = None) -> None:
        self.num_labels = self._resolve_num_labels()
        self.tokenizer = _resolve_tokenizer(self, self.tokenizer)
        ensure_pad_token(self.tokenizer)
        hp = self.hparams
        needed = {
            "fit": [("train", hp.train_file), ("val", hp.val_file)],
            "validate": [("val", hp.val_file)],
            "test": [("test", hp.test_file)],
            "predict": [("predict", hp.predict_file)],
        }
        stages = [stage] if stage is not None else list(needed)
        for st in stages:
            required = needed[st][0]
            if required[1] is None and stage is not None:
                raise ValueError(
                    f"TextClassificationData: Trainer.{st}() needs data, but {required[0]}_file is not set."
                    f" Pass {required[0]}_file=<path to a .tsv/.csv/.jsonl/.json file>."
                )
            for split, file in needed[st]:
                if file is not None and split not in self.datasets:
                    self.datasets[split] = self._tokenize_file(split, file)

    def _tokenize_file(self, split: str, file: str) -> _ListDataset:
        hp = self.hparams
        return _ListDataset(_tokenize_table(
            file, self.tokenizer, text_column=hp.text_column, text_pair_column=hp.text_pair_column,
            label_column=hp.label_column, label_names=hp.label_names, num_labels=self.num_labels, max_length=hp.max_length,
            has_header=hp.has_header, max_rows=hp.max_train_rows if split == "train" else None, seed=hp.seed,
            labels_optional=split == "predict",
        ))

    # -- loaders -------------------------------------------------------------------------------

    def _eval_loader(self, split: str) -> DataLoader | list:
        if split not in self.datasets:
            return []  # e.g. fit without val_file: Lightning then skips validation
        hp = self.hparams
        size = hp.eval_batch_size or hp.batch_size
        return _loader(self.datasets[split], size, False, hp.seed, hp.num_workers, self._collate())

    def _collate(self) -> _PadCollator:
        return _PadCollator(self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return _loader(self.datasets["train"], hp.batch_size, True, hp.seed, hp.num_workers, self._collate(),
                       _trained_batches(self), grouped=hp.group_by_length)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader | list:
        return self._eval_loader("predict")
