"""Several classification tasks in one job: one LoRA adapter per task, rows of all tasks in every batch.

:class:`MultiTaskData` reads GLUE-style tasks (each a name -> its files and columns, spelled as
:class:`~lightning_peft.tasks.TextClassificationData` spells them) and mixes their training rows in every batch
(:class:`MultiTaskBatches`: task ``t`` fills each slot with probability ``p_t``, proportional to its size ``n_t`` or to
``n_t ** (1 / T)``). :class:`MultiTaskClassifier` runs each row through the LoRA adapter named like its task
(:func:`lightning_peft.core.per_sample_adapters`), masks the logits a task does not have, and reports one score per
task and their mean, ``val_score``.

Example::

    model = MultiTaskClassifier({"sst2": 2, "mrpc": 2, "cola": 2}, metrics={"mrpc": "f1", "cola": "matthews"})
    data = MultiTaskData({"sst2": {...}, "mrpc": {...}, "cola": {...}}, data_dir="glue")
    callbacks = [LoRA(adapter_name=name) for name in ("sst2", "mrpc", "cola")]
    L.Trainer(callbacks=callbacks, max_epochs=1).fit(model, data)
"""

from __future__ import annotations

import hashlib
import math
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, TypedDict

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, XLAStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from torchmetrics import MeanMetric
from torchmetrics.classification import Accuracy, F1Score, MatthewsCorrCoef

from lightning_peft.core import ADAPTER_NAME, adapter_names, per_sample_adapters
from lightning_peft.mixin import PEFTMixin
from lightning_peft.tasks._hf import (
    check_checkpointing_fits_adapters,
    ensure_pad_token,
    load_sequence_classifier,
    load_tokenizer,
)
from lightning_peft.tasks._optim import adamw_with_linear_schedule, check_schedule_args
from lightning_peft.tasks.classification import _MODEL_INPUTS
from lightning_peft.tasks.data import (
    GROUP_BATCHES,
    ResumableLoader,
    _attached_module,
    _check_loader_args,
    _ListDataset,
    _loader,
    _PadCollator,
    _resolve_tokenizer,
    _tokenize_table,
    _trained_batches,
    group_by_length,
    lightning_shards_loaders,
)
from lightning_peft.validation import check_value, check_values

__all__ = ["MultiTaskBatches", "MultiTaskClassifier", "MultiTaskData", "TaskSettings", "task_probabilities"]

Sampling = Literal["proportional", "temperature"]
TaskMetric = Literal["accuracy", "f1", "matthews"]
_METRIC_KEYS = {"accuracy": "acc", "f1": "f1", "matthews": "mcc"}


class TaskSettings(TypedDict, total=False):
    """The settings of one task of :class:`MultiTaskData`, spelled as :class:`~lightning_peft.tasks.TextClassificationData`'s
    arguments (typed, so that LightningCLI keeps ``text_column: "3"`` a string)."""

    train_file: Optional[str]
    val_file: Optional[str]
    text_column: str
    text_pair_column: Optional[str]
    label_column: str
    label_names: Optional[list[str]]
    num_labels: Optional[int]
    has_header: bool
    max_length: Optional[int]
    max_train_rows: Optional[int]


_TASK_DEFAULTS: dict[str, Any] = {
    "train_file": None, "val_file": None, "text_column": "sentence", "text_pair_column": None, "label_column": "label",
    "label_names": None, "num_labels": None, "has_header": True, "max_length": None, "max_train_rows": None,
}


def _check_task_names(owner: str, names: Sequence[Any]) -> None:
    if not names:
        raise ValueError(f"{owner}: tasks is empty. Give at least one task, e.g. tasks={{'sst2': ...}}.")
    bad = [n for n in names if not isinstance(n, str) or not ADAPTER_NAME.fullmatch(n)]
    if bad:
        raise ValueError(
            f"{owner}: task names {bad} are not valid adapter names. A task trains the LoRA adapter of the same name, so"
            " its name must be letters, digits, '_' or '-', not starting with a digit or '-' (e.g. 'sst2', 'mrpc')."
        )


# ----------------------------------------------------------------------------------------------
# Sampling


def task_probabilities(sizes: Sequence[int], sampling: Sampling = "proportional", temperature: float = 1.0) -> list[float]:
    """The probability that a training row comes from each task: ``p_t = n_t ** (1 / T) / sum_s n_s ** (1 / T)``.

    Args:
        sizes: Training rows per task, ``n_t``.
        sampling: ``"proportional"`` (``T = 1``: ``p_t = n_t / N``) or ``"temperature"``.
        temperature: ``T``; larger values move ``p`` towards uniform (small tasks drawn more often).
    """
    power = 1.0 if sampling == "proportional" else 1.0 / temperature
    weights = [float(n) ** power for n in sizes]
    total = math.fsum(weights)
    return [w / total for w in weights]


def _seed(*parts: Any) -> int:
    """A seed for torch that depends on every part (the same in every process and Python session)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


class MultiTaskBatches(Sampler[list[int]]):
    """Batches of indices that mix the rows of several tasks; a different reproducible order every epoch, resumable
    mid-epoch.

    The dataset holds the tasks one after another (task ``t``'s rows at ``offsets[t] .. offsets[t] + n_t - 1``). An epoch
    has ``N = sum n_t`` slots, cut into ``ceil(N / batch_size)`` batches in order; slot ``i`` takes the next row of
    task ``t_i``'s stream, where each task's stream is an endless series of shuffles of its rows (a new shuffle each time
    the stream has gone through them all, continued from one epoch to the next):

    * ``"proportional"``: the slots' tasks are a random permutation of ``n_t`` copies of each task, so each row is
      trained on exactly once per epoch and each slot is task ``t`` with probability ``n_t / N``;
    * ``"temperature"``: each slot's task is drawn independently with ``p_t`` proportional to ``n_t ** (1 / T)``
      (:func:`task_probabilities`): small tasks go round their stream several times an epoch, large ones part way.

    Everything is a function of ``seed`` and the epoch number (:meth:`batches`), so a resumed run replays its epoch:
    :attr:`epoch_state` is the epoch being iterated and :meth:`resume` sets where the next iteration starts
    (the protocol :class:`~lightning_peft.tasks.data.ResumableLoader` uses).

    Args:
        sizes: Training rows per task, ``n_t`` (each at least 1).
        batch_size: Rows per batch (the last batch of an epoch may be smaller).
        seed: Seed of every draw.
        sampling: ``"proportional"`` or ``"temperature"``.
        temperature: ``T`` of temperature sampling (> 0); must stay 1.0 with proportional sampling.
        lengths: Tokens of each dataset row; given, the epoch's rows are grouped by length: each run of
            ``GROUP_BATCHES`` batches is sorted by length and cut into batches again, and the batches are shuffled (the
            same rows per epoch, batches of similar lengths: less padding when tasks differ in length).
        num_replicas: Processes that share the epoch (a distributed strategy's world size). Every process computes
            the same epoch's batches (:meth:`batches`) and iterates its own: process ``rank`` takes batches ``rank,
            rank + num_replicas, ...``; when the count does not divide, the epoch's first batches are repeated so that
            every process has ``ceil(batches / num_replicas)`` (as torch's ``DistributedSampler`` pads).
        rank: This process's rank, ``0 .. num_replicas - 1``.
    """

    #: Batches whose rows are sorted by length together when ``lengths`` is given.
    GROUP_BATCHES = GROUP_BATCHES

    def __init__(
        self, sizes: Sequence[int], batch_size: int, seed: int = 0, sampling: Sampling = "proportional", temperature: float = 1.0,
        lengths: Optional[Sequence[int]] = None, num_replicas: int = 1, rank: int = 0,
    ) -> None:
        owner = "MultiTaskBatches"
        check_values(MultiTaskBatches.__init__, owner, dict(
            sizes=sizes, batch_size=batch_size, seed=seed, sampling=sampling, temperature=temperature,
            num_replicas=num_replicas, rank=rank,
        ))
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"{owner}: rank must be in 0 .. num_replicas - 1 (num_replicas >= 1), got rank={rank}, num_replicas={num_replicas}.")
        self.num_replicas, self.rank = num_replicas, rank
        _check_sampling(owner, sampling, temperature)
        if not sizes or any(n < 1 for n in sizes):
            raise ValueError(f"{owner}: every task needs at least one training row, got sizes {list(sizes)}.")
        if batch_size < 1:
            raise ValueError(f"{owner}: batch_size must be >= 1, got {batch_size}.")
        self.sizes, self.batch_size, self.seed = [int(n) for n in sizes], batch_size, seed
        if lengths is not None and len(lengths) != sum(self.sizes):
            raise ValueError(f"{owner}: lengths has {len(lengths)} entries for {sum(self.sizes)} rows: give one per row.")
        self.lengths = None if lengths is None else torch.as_tensor(list(lengths), dtype=torch.long)
        self.sampling, self.temperature = sampling, float(temperature)
        self.offsets = [sum(self.sizes[:t]) for t in range(len(self.sizes))]
        self.probabilities = task_probabilities(self.sizes, sampling, temperature)
        self.epoch_state: int = 0  # the epoch being iterated (or, before the first iteration, the first one)
        self._next: tuple[int, int] = (0, 0)  # (epoch, batches to skip) of the next iteration
        self._starts: dict[int, torch.Tensor] = {0: torch.zeros(len(self.sizes), dtype=torch.long)}

    @property
    def total(self) -> int:
        """Rows per epoch, ``N``."""
        return sum(self.sizes)

    @property
    def epoch_batches(self) -> int:
        """Batches of an epoch, all processes together."""
        return math.ceil(self.total / self.batch_size)

    def __len__(self) -> int:
        """Batches this process iterates an epoch."""
        return math.ceil(self.epoch_batches / self.num_replicas)

    def own_batches(self, epoch: int) -> list[list[int]]:
        """This process's batches of ``epoch``: ``batches(epoch)[rank::num_replicas]``, padded as described above."""
        batches = self.batches(epoch)
        if self.num_replicas == 1:
            return batches
        padded = [batches[i % len(batches)] for i in range(len(self) * self.num_replicas)]
        return padded[self.rank :: self.num_replicas]

    def task_order(self, epoch: int) -> torch.Tensor:
        """The task of each of the epoch's ``N`` slots, ``(N,)``."""
        if self.sampling == "proportional":
            tasks = torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(self.sizes))  # (N,)
            return tasks[torch.randperm(self.total, generator=_generator(self.seed, "order", epoch))]
        p = torch.tensor(self.probabilities, dtype=torch.float64)
        return torch.multinomial(p, self.total, replacement=True, generator=_generator(self.seed, "order", epoch))

    def _stream_starts(self, epoch: int) -> torch.Tensor:
        """How far each task's stream has gone at the start of ``epoch``, ``(T,)``."""
        if self.sampling == "proportional":  # every epoch takes exactly n_t rows of task t
            return epoch * torch.tensor(self.sizes)
        known = max(e for e in self._starts if e <= epoch)
        starts = self._starts[known]
        for e in range(known, epoch):  # replay the draws of the epochs in between (once: cached)
            starts = starts + torch.bincount(self.task_order(e), minlength=len(self.sizes))
            self._starts[e + 1] = starts
        return starts

    def _stream(self, task: int, start: int, count: int) -> torch.Tensor:
        """Rows ``start .. start + count - 1`` of task ``task``'s stream (indices into the task), ``(count,)``."""
        n = self.sizes[task]
        cycle, at = divmod(start, n)
        parts, left = [], count
        while left > 0:
            shuffle = torch.randperm(n, generator=_generator(self.seed, "rows", task, cycle))
            parts.append(shuffle[at : at + left])
            left -= len(parts[-1])
            cycle, at = cycle + 1, 0
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch``, a function of ``seed`` and ``epoch`` only."""
        order = self.task_order(epoch)  # (N,)
        starts = self._stream_starts(epoch)
        indices = torch.empty(self.total, dtype=torch.long)
        for t in range(len(self.sizes)):
            slots = (order == t).nonzero().squeeze(1)
            indices[slots] = self.offsets[t] + self._stream(t, int(starts[t]), len(slots))
        if self.lengths is not None:
            indices = group_by_length(indices, self.lengths, self.batch_size, _generator(self.seed, "batches", epoch), self.GROUP_BATCHES)
        flat = indices.tolist()
        return [flat[i : i + self.batch_size] for i in range(0, self.total, self.batch_size)]

    def __iter__(self):
        (epoch, skip), self._next = self._next, (self._next[0] + 1, 0)
        self.epoch_state = epoch
        return iter(self.own_batches(epoch)[skip:])

    def resume(self, epoch_state: int, consumed: int) -> None:
        """Make the next iteration epoch ``epoch_state`` less its first ``consumed`` batches (the next epoch if none are
        left)."""
        epoch, consumed = int(epoch_state), int(consumed)
        self._next = (epoch + 1, 0) if consumed >= len(self) else (epoch, consumed)


def _plain_ddp(strategy: Any) -> bool:
    """DDP itself (``ddp``, ``ddp_spawn``, ``ddp_find_unused_parameters_true``, ...): not its subclasses DeepSpeed and XLA,
    which shard or place the model their own way."""
    return isinstance(strategy, DDPStrategy) and not isinstance(strategy, (DeepSpeedStrategy, XLAStrategy))


def _check_sampling(owner: str, sampling: str, temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"{owner}: temperature must be > 0 (1 is proportional sampling, larger is closer to uniform), got {temperature}.")
    if sampling == "proportional" and temperature != 1.0:
        raise ValueError(
            f"{owner}: temperature={temperature} has no effect with sampling='proportional'. Set sampling='temperature'"
            " to use it, or drop temperature."
        )


# ----------------------------------------------------------------------------------------------
# Data


class _MultiTaskCollator:
    """Pad a batch (:class:`~lightning_peft.tasks.data._PadCollator`) with its rows stable-sorted by task, so each task's
    rows are one slice; add ``adapter``, the task name of each row (a class, so workers can pickle it)."""

    def __init__(self, pad_token_id: int, task_names: Sequence[str]) -> None:
        self.pad = _PadCollator(pad_token_id)
        self.task_names = list(task_names)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        examples = sorted(examples, key=lambda e: e["task_id"])  # stable: a task's rows keep their drawn order
        batch: dict[str, Any] = self.pad(examples)  # task_id, one int per row, becomes a (B,) LongTensor
        batch["adapter"] = [self.task_names[e["task_id"]] for e in examples]
        return batch


class MultiTaskData(L.LightningDataModule):
    """Several text classification tasks (e.g. GLUE SST-2, MRPC, CoLA) whose training rows are mixed in every batch.

    Each task is read and tokenized as :class:`~lightning_peft.tasks.TextClassificationData` reads one file. Training
    batches come from :class:`MultiTaskBatches` (resumable mid-epoch, like ``TextClassificationData``'s); each batch has
    ``input_ids``, ``attention_mask`` (``token_type_ids``), ``labels``, ``task_id`` (``(B,)``, the task's position in
    ``tasks``) and ``adapter`` (the task name of each row), its rows sorted by task. Validation has one loader per task
    with a ``val_file``, in the order of ``tasks``.

    Args:
        tasks: Task name -> its settings. The name is the LoRA adapter the task trains (letters, digits, ``_``, ``-``).
            Settings (the spelling of ``TextClassificationData``): ``train_file``, ``val_file``, ``text_column``
            (default ``"sentence"``), ``text_pair_column``, ``label_column`` (default ``"label"``), ``label_names``,
            ``num_labels`` (default: the model's ``tasks[name]``, else ``len(label_names)``, else 2), ``has_header``
            (default True), ``max_length`` (default: the shared one), ``max_train_rows`` (a random subset drawn with
            ``seed``; default all rows).
        data_dir: Folder that relative task files are read from; None reads them from the working directory.
        sampling: How training rows are mixed: ``"proportional"`` (each row once per epoch, task ``t`` in a slot with
            probability ``n_t / N``) or ``"temperature"`` (``p_t`` proportional to ``n_t ** (1 / temperature)``, small
            tasks cycled). An epoch is ``N = sum n_t`` rows either way.
        temperature: ``T`` of temperature sampling (> 0; 1 is proportional in expectation, larger is closer to uniform).
        max_length: Longer inputs are truncated to this many tokens (a task's ``max_length`` overrides it).
        batch_size: Training batch size.
        eval_batch_size: Batch size for validation; None uses ``batch_size``.
        num_workers: DataLoader worker processes.
        seed: Seed of the training subsets and of the sampling.
        tokenizer_name_or_path: Tokenizer directory; None uses the LightningModule's ``tokenizer``.
        group_by_length: Put training rows of similar lengths in the same batches (see :class:`MultiTaskBatches`):
            tasks of different lengths (MRPC's sentence pairs beside SST-2's sentences) then pad less. Each epoch
            still trains each row the sampling gives once, in batches that still mix tasks.

    Under DDP every process computes the same epoch of batches and trains on its own share of them (batches
    ``rank, rank + world_size, ...``: see :class:`MultiTaskBatches`), resumable mid-epoch as in one process.

    Raises:
        ValueError: At setup under FSDP or DeepSpeed (one process and DDP are supported).

    Example::

        data = MultiTaskData(
            data_dir="glue",
            tasks={
                "sst2": {"train_file": "SST-2/train.tsv", "val_file": "SST-2/dev.tsv"},
                "mrpc": {"train_file": "MRPC/train.tsv", "val_file": "MRPC/dev.tsv", "text_column": "#1 String",
                         "text_pair_column": "#2 String", "label_column": "Quality"},
                "cola": {"train_file": "CoLA/train.tsv", "val_file": "CoLA/dev.tsv", "has_header": False,
                         "text_column": "3", "label_column": "1"},
            },
            sampling="temperature", temperature=2.0,
        )
    """

    def __init__(
        self,
        tasks: dict[str, TaskSettings],
        data_dir: Optional[str] = None,
        sampling: Sampling = "proportional",
        temperature: float = 1.0,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
        tokenizer_name_or_path: Optional[str] = None,
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_values(MultiTaskData.__init__, owner, dict(
            tasks=tasks, data_dir=data_dir, sampling=sampling, temperature=temperature, max_length=max_length,
            batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed,
            tokenizer_name_or_path=tokenizer_name_or_path, group_by_length=group_by_length,
        ))
        _check_loader_args(owner, batch_size, eval_batch_size, num_workers, max_length)
        _check_sampling(owner, sampling, temperature)
        _check_task_names(owner, list(tasks))
        #: Each task's settings, defaults filled in.
        self.tasks: dict[str, dict[str, Any]] = {name: _task_settings(owner, name, given) for name, given in tasks.items()}
        # `tasks` is kept as the attribute above, not as a hyperparameter: the model's `tasks` (name -> num_labels) is
        # another value under the same key, which a logger's merge of the two would refuse
        ignore = ["tasks"] + [k for k, v in (("tokenizer_name_or_path", tokenizer_name_or_path),) if v is None]
        self.save_hyperparameters(ignore=ignore)
        self.tokenizer = load_tokenizer(tokenizer_name_or_path) if tokenizer_name_or_path else None
        self.num_labels: dict[str, int] = {}  # resolved in setup
        self.train_dataset: Optional[_ListDataset] = None
        self.train_sizes: list[int] = []
        self.val_datasets: dict[str, _ListDataset] = {}

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    # -- setup ---------------------------------------------------------------------------------

    def _path(self, name: str, key: str) -> str:
        file = Path(self.tasks[name][key]).expanduser()
        data_dir = self.hparams.data_dir
        if not file.is_absolute() and data_dir is not None:
            file = Path(data_dir).expanduser() / file
        if not file.is_file():
            where = f" (under data_dir={data_dir!r})" if data_dir is not None and not Path(self.tasks[name][key]).is_absolute() else ""
            raise FileNotFoundError(
                f"MultiTaskData: task {name!r} {key}={self.tasks[name][key]!r}{where} is {str(file)!r}, which is not a file."
                " Set data_dir to the folder the task files are relative to, or give the file's path."
            )
        return str(file)

    def _resolve_num_labels(self) -> dict[str, int]:
        module = _attached_module(self)
        model_tasks = getattr(module, "hparams", {}).get("tasks") if module is not None else None
        if isinstance(model_tasks, dict) and set(model_tasks) != set(self.tasks):
            raise ValueError(
                f"MultiTaskData has the tasks {self.task_names} but the model has {list(model_tasks)}. Give both the same tasks."
            )
        resolved = {}
        for name, task in self.tasks.items():
            own = task["num_labels"] if task["num_labels"] is not None else (len(task["label_names"]) if task["label_names"] else None)
            model_n = model_tasks.get(name) if isinstance(model_tasks, dict) else None
            if own is not None and model_n is not None and own != model_n:
                raise ValueError(
                    f"MultiTaskData: task {name!r} has {own} labels (num_labels/label_names) but the model's tasks give it"
                    f" {model_n}. Make them agree."
                )
            resolved[name] = own if own is not None else (model_n if model_n is not None else 2)
        return resolved

    def setup(self, stage: Optional[str] = None) -> None:
        trainer = getattr(self, "trainer", None)
        if stage in (None, "fit") and lightning_shards_loaders(trainer) and not _plain_ddp(trainer.strategy):
            raise ValueError(
                f"MultiTaskData trains in one process or under DDP (strategy=ddp), not under {type(trainer.strategy).__name__}"
                " yet: routing rows to adapters under FSDP and DeepSpeed is untested. Use strategy=ddp, or train each task"
                " with TextClassificationData."
            )
        self.num_labels = self._resolve_num_labels()
        self.tokenizer = _resolve_tokenizer(self, self.tokenizer)
        ensure_pad_token(self.tokenizer)
        if stage in (None, "fit") and self.train_dataset is None:
            no_train = [n for n, t in self.tasks.items() if t["train_file"] is None]
            if no_train and stage == "fit":
                raise ValueError(f"MultiTaskData: Trainer.fit() needs training data, but the task(s) {no_train} have no train_file.")
            if not no_train:
                examples: list[dict[str, Any]] = []
                for task_id, name in enumerate(self.tasks):
                    rows = self._tokenize(name, "train_file", task_id)
                    self.train_sizes.append(len(rows))
                    examples += rows
                self.train_dataset = _ListDataset(examples)
        if stage in (None, "fit", "validate"):
            with_val = [n for n, t in self.tasks.items() if t["val_file"] is not None]
            if not with_val and stage == "validate":
                raise ValueError("MultiTaskData: Trainer.validate() needs data, but no task has a val_file.")
            for task_id, name in enumerate(self.tasks):
                if name in with_val and name not in self.val_datasets:
                    self.val_datasets[name] = _ListDataset(self._tokenize(name, "val_file", task_id))

    def _tokenize(self, name: str, key: str, task_id: int) -> list[dict[str, Any]]:
        task = self.tasks[name]
        rows = _tokenize_table(
            self._path(name, key), self.tokenizer, text_column=task["text_column"], text_pair_column=task["text_pair_column"],
            label_column=task["label_column"], label_names=task["label_names"], num_labels=self.num_labels[name],
            max_length=task["max_length"] or self.hparams.max_length, has_header=task["has_header"],
            max_rows=task["max_train_rows"] if key == "train_file" else None, seed=self.hparams.seed,
        )
        for row in rows:
            row["task_id"] = task_id
        return rows

    # -- loaders -------------------------------------------------------------------------------

    def _collate(self) -> _MultiTaskCollator:
        return _MultiTaskCollator(self.tokenizer.pad_token_id, self.task_names)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        if self.train_dataset is None:
            raise RuntimeError("MultiTaskData: call setup('fit') first (the Trainer does), with a train_file for every task.")
        lengths = [len(row["input_ids"]) for row in self.train_dataset.examples] if hp.group_by_length else None
        trainer = getattr(self, "trainer", None)
        replicas = trainer.distributed_sampler_kwargs if lightning_shards_loaders(trainer) else None
        shares = {} if replicas is None else {"num_replicas": replicas["num_replicas"], "rank": replicas["rank"]}
        batches = MultiTaskBatches(self.train_sizes, hp.batch_size, hp.seed, hp.sampling, hp.temperature, lengths, **shares)
        loader = ResumableLoader(
            self.train_dataset, None, hp.seed, _trained_batches(self, sharded_by_us=True), batch_sampler=batches,
            collate_fn=self._collate(), num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0,
        )
        if shares:
            # the batch sampler yields this process's share already; a DistributedSampler in the loader's (unused)
            # `sampler` tells Lightning so: it would otherwise try to put its own into the batch sampler, and fail
            object.__setattr__(loader, "sampler", DistributedSampler(self.train_dataset, shuffle=False, **shares))
        return loader

    def val_dataloader(self) -> list[DataLoader]:
        hp = self.hparams
        size = hp.eval_batch_size or hp.batch_size
        return [_loader(data, size, False, hp.seed, hp.num_workers, self._collate()) for data in self.val_datasets.values()]


def _task_settings(owner: str, name: str, given: dict[str, Any]) -> dict[str, Any]:
    keys = typing.get_type_hints(TaskSettings)
    if not isinstance(given, dict):
        raise TypeError(f"{owner}: tasks[{name!r}]={given!r} must be a mapping of settings ({list(keys)}).")
    unknown = sorted(set(given) - set(keys))
    if unknown:
        raise ValueError(f"{owner}: task {name!r} has unknown setting(s) {unknown}; the settings of a task are {list(keys)}.")
    task = {**_TASK_DEFAULTS, **given}
    where = f"tasks[{name!r}]"
    for key, tp in keys.items():
        check_value(owner, f"{where}.{key}", task[key], tp)
    for key in ("num_labels", "max_length", "max_train_rows"):
        least = 2 if key == "num_labels" else 1
        if task[key] is not None and task[key] < least:
            raise ValueError(f"{owner}: {where}.{key} must be >= {least} (or None), got {task[key]}.")
    names = task["label_names"]
    if names is not None and len(set(names)) != len(names):
        raise ValueError(f"{owner}: {where}.label_names must be distinct, got {names}.")
    if names is not None and task["num_labels"] is not None and len(names) != task["num_labels"]:
        raise ValueError(
            f"{owner}: {where}.label_names has {len(names)} names {names} but num_labels={task['num_labels']}. Drop"
            " num_labels or make them agree."
        )
    if task["train_file"] is None and task["val_file"] is None:
        raise ValueError(f"{owner}: task {name!r} has neither train_file nor val_file. Give it its files.")
    return task


# ----------------------------------------------------------------------------------------------
# Model


def _task_metric(kind: str, num_labels: int) -> nn.Module:
    task = "binary" if num_labels == 2 else "multiclass"
    if kind == "accuracy":
        return Accuracy(task=task, num_classes=num_labels)
    if kind == "f1":
        return F1Score(task=task, num_classes=num_labels, average="micro" if num_labels == 2 else "macro")
    return MatthewsCorrCoef(task=task, num_classes=num_labels)


class MultiTaskClassifier(PEFTMixin, L.LightningModule):
    """One Hugging Face encoder, one LoRA adapter per task, trained on batches that mix the tasks' rows.

    Each row goes through the adapter named like its task (``batch["adapter"]``, as :class:`MultiTaskData` makes
    batches; :func:`lightning_peft.core.per_sample_adapters`). The classification head has ``max(tasks.values())``
    outputs; a row's logits past its task's label count are set to ``-inf``, so its loss is the cross-entropy over its
    own classes and its prediction one of them. Adapters come from one LoRA callback per task (``adapter_name=<task>``);
    fit refuses to start without them.

    Logs ``train_loss``; per task ``val_loss_<task>``, ``val_acc_<task>`` and, for a task whose metric is not accuracy,
    ``val_f1_<task>`` or ``val_mcc_<task>``; ``val_score``, the mean over the tasks of each task's metric; and
    ``val_loss``, the mean of the tasks' losses.

    Args:
        tasks: Task name -> its number of classes (at least 2), e.g. ``{"sst2": 2, "mrpc": 2, "cola": 2}``.
        model_name_or_path: A local model directory (with ``config.json``) or the alias ``"all-MiniLM-L6-v2"``.
        metrics: Task name -> its score: ``"accuracy"`` (the default for tasks not listed), ``"f1"`` (binary F1 of
            class 1 for two labels, macro otherwise: MRPC's) or ``"matthews"`` (Matthews' correlation: CoLA's).
        loss_weighting: ``"rows"``: the mean over the batch's rows (a task weighs as much as it has rows);
            ``"tasks"``: the mean over the batch's tasks of each task's mean.
        learning_rate: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay, applied to weight matrices only.
        warmup_ratio: Fraction of the training steps with a linear warmup, then linear decay to 0.
        tokenizer_name_or_path: Tokenizer directory; None uses ``model_name_or_path``.
        gradient_checkpointing: Recompute activations in the backward pass (as ``SequenceClassifier``'s).

    Example::

        model = MultiTaskClassifier({"sst2": 2, "cola": 2}, metrics={"cola": "matthews"})
        trainer = L.Trainer(callbacks=[LoRA(adapter_name="sst2"), LoRA(adapter_name="cola")])
        trainer.fit(model, MultiTaskData(tasks={"sst2": {...}, "cola": {...}}))
    """

    def __init__(
        self,
        tasks: dict[str, int],
        model_name_or_path: str = "all-MiniLM-L6-v2",
        metrics: Optional[dict[str, TaskMetric]] = None,
        loss_weighting: Literal["rows", "tasks"] = "rows",
        learning_rate: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.06,
        tokenizer_name_or_path: Optional[str] = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_values(MultiTaskClassifier.__init__, owner, dict(
            tasks=tasks, model_name_or_path=model_name_or_path, metrics=metrics, loss_weighting=loss_weighting,
            learning_rate=learning_rate, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
            tokenizer_name_or_path=tokenizer_name_or_path, gradient_checkpointing=gradient_checkpointing,
        ))
        _check_task_names(owner, list(tasks))
        few = {name: n for name, n in tasks.items() if n < 2}
        if few:
            raise ValueError(f"{owner}: every task needs at least 2 classes (cross-entropy over classes), got {few}.")
        unknown = [name for name in (metrics or {}) if name not in tasks]
        if unknown:
            raise ValueError(f"{owner}: metrics names {unknown}, which are not tasks; the tasks are {list(tasks)}.")
        check_schedule_args(owner, learning_rate, weight_decay, warmup_ratio)
        self.save_hyperparameters()

        self.task_names = list(tasks)
        self.task_metrics = {name: (metrics or {}).get(name, "accuracy") for name in tasks}
        self._task_index = {name: i for i, name in enumerate(tasks)}
        self.register_buffer("task_num_labels", torch.tensor(list(tasks.values())), persistent=False)  # (T,)
        self.model, self.tokenizer = load_sequence_classifier(
            model_name_or_path, max(tasks.values()), tokenizer_name_or_path, gradient_checkpointing, owner
        )
        # per task, in task order (a list, not a dict keyed by name: a task may be called "update" or "keys")
        self.val_acc = nn.ModuleList([_task_metric("accuracy", n) for n in tasks.values()])
        self.val_metric = nn.ModuleList([_task_metric(self.task_metrics[name], n) for name, n in tasks.items()])
        self.val_loss = nn.ModuleList([MeanMetric() for _ in tasks])

    # -- forward -------------------------------------------------------------------------------

    def task_ids(self, adapters: Sequence[str]) -> torch.Tensor:
        """The task index of each row, ``(B,)``, from the rows' task names."""
        unknown = sorted({a for a in adapters if a not in self._task_index})
        if unknown:
            raise ValueError(f"MultiTaskClassifier: batch rows name the tasks {unknown}, which are not among {self.task_names}.")
        return torch.tensor([self._task_index[a] for a in adapters], device=self.task_num_labels.device)

    def mask_logits(self, logits: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """``logits`` with each row's classes past its task's label count set to ``-inf``."""
        classes = torch.arange(logits.shape[-1], device=logits.device)  # (C,)
        beyond = classes[None, :] >= self.task_num_labels[task_ids][:, None]  # (B, C)
        return logits.masked_fill(beyond, float("-inf"))

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked logits ``(B, C)`` of each row through its task's adapter, and the rows' task indices ``(B,)``."""
        inputs = {k: batch[k] for k in _MODEL_INPUTS if k in batch}
        with per_sample_adapters(self.model, batch["adapter"]):
            logits = self.model(**inputs).logits  # (B, C)
        task_ids = self.task_ids(batch["adapter"])
        return self.mask_logits(logits.float(), task_ids), task_ids

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of masked logits, weighted by ``loss_weighting``."""
        losses = F.cross_entropy(logits, labels, reduction="none")  # (B,)
        if self.hparams.loss_weighting == "rows":
            return losses.mean()
        tasks = len(self.task_names)
        sums = losses.new_zeros(tasks).index_add(0, task_ids, losses)  # (T,)
        counts = torch.bincount(task_ids, minlength=tasks)  # (T,)
        present = counts > 0
        return (sums[present] / counts[present]).mean()

    # -- steps ---------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        # Under DDP a batch may hold no row of some task: that adapter (and its head) takes no part in the step, and
        # DDP must be told to expect that before it wraps the model (after this hook). Lightning keeps DDP's
        # arguments in `_ddp_kwargs`; `strategy=ddp_find_unused_parameters_true` sets the same flag.
        strategy = self.trainer.strategy if self._trainer is not None else None
        if stage == "fit" and _plain_ddp(strategy):
            kwargs = getattr(strategy, "_ddp_kwargs", None)
            if not isinstance(kwargs, dict):
                raise ValueError(
                    "MultiTaskClassifier under DDP needs find_unused_parameters=True (a batch may hold no row of a task,"
                    " whose adapter then takes no part in the step): pass strategy=ddp_find_unused_parameters_true."
                )
            if not kwargs.get("find_unused_parameters"):
                kwargs["find_unused_parameters"] = True
                rank_zero_info(
                    "MultiTaskClassifier: DDP runs with find_unused_parameters=True (a batch may hold no row of a task,"
                    " whose adapter then takes no part in the step)."
                )

    def on_fit_start(self) -> None:
        # the adapters exist now (the LoRA callbacks inject them in setup)
        check_checkpointing_fits_adapters(self, "MultiTaskClassifier")
        try:
            names = adapter_names(self.model)
        except ValueError:  # no adapter layers at all
            names = []
        except NotImplementedError as err:
            raise ValueError(f"MultiTaskClassifier routes each row to its task's LoRA adapter: {err}") from err
        missing = [t for t in self.task_names if t not in names]
        if missing:
            raise ValueError(
                f"MultiTaskClassifier: each task trains the LoRA adapter of its name, but the model has no adapter named"
                f" {missing} (its adapters: {names}). Add one LoRA callback per task, e.g."
                f" LoRA(adapter_name={missing[0]!r}) (in YAML: adapter_name: {missing[0]})."
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits, task_ids = self(batch)
        loss = self.loss(logits, batch["labels"], task_ids)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(task_ids))
        self._routed_rows = list(batch["adapter"])  # for backward (see below)
        return loss

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        # activation checkpointing runs the forward again inside backward: the rows must take their adapters then too
        rows, self._routed_rows = getattr(self, "_routed_rows", None), None
        if rows is None:
            return super().backward(loss, *args, **kwargs)
        with per_sample_adapters(self.model, rows):
            super().backward(loss, *args, **kwargs)

    def on_validation_epoch_start(self) -> None:
        # reset here, not at the end: the states are then made in this loop's mode (a `trainer.validate` before `fit`
        # runs in inference mode, whose tensors fit's validation could not update in place)
        for metrics in (self.val_loss, self.val_acc, self.val_metric):
            for metric in metrics:
                metric.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        logits, task_ids = self(batch)
        losses = F.cross_entropy(logits, batch["labels"], reduction="none")  # (B,)
        preds = logits.argmax(dim=-1)  # (B,)
        for t in torch.unique(task_ids).tolist():
            rows = task_ids == t
            self.val_loss[t].update(losses[rows])
            self.val_acc[t].update(preds[rows], batch["labels"][rows])
            self.val_metric[t].update(preds[rows], batch["labels"][rows])

    def on_validation_epoch_end(self) -> None:
        # computed here, not logged per step: each metric syncs across processes in compute(), and val_score needs them all
        scores, losses = [], []
        for t, name in enumerate(self.task_names):
            if not self.val_loss[t].update_called:
                continue  # no rows of this task this epoch (e.g. limit_val_batches)
            kind = self.task_metrics[name]
            losses.append(self.val_loss[t].compute())
            self.log(f"val_loss_{name}", losses[-1])
            self.log(f"val_acc_{name}", self.val_acc[t].compute())
            scores.append(self.val_metric[t].compute())
            if kind != "accuracy":
                self.log(f"val_{_METRIC_KEYS[kind]}_{name}", scores[-1])
        if scores:
            self.log("val_score", torch.stack(scores).float().mean(), prog_bar=True)
            self.log("val_loss", torch.stack(losses).float().mean())

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return adamw_with_linear_schedule(self, hp.learning_rate, hp.weight_decay, hp.warmup_ratio)
