"""The ``AdaLoRA`` callback: :mod:`lightning_peft.methods.adalora` with its budget scheduler, in one callback.

Where each piece runs (Lightning 2.6, automatic or manual optimization):

* ``on_before_optimizer_step``: once per optimizer step, after the closure ran every backward of the
  accumulation window and, with 16-bit AMP, after ``GradScaler.unscale_`` (``MixedPrecision.optimizer_step``
  unscales, then calls this hook, then clips and steps; bf16 has no scaler). Here the orthogonal
  regularizer's gradient is added to ``.grad`` (one extra backward through the adapter weights only, so
  it reaches the gradients whatever ``training_step`` returns, is counted once per step whatever the
  accumulation, and is never multiplied by the loss scale), then the allocator reads the accumulated,
  unscaled gradients: importance EMAs, budget, masks. A step whose gradients are not finite (the scaler
  will skip it) leaves the allocator alone.
* ``on_train_batch_end``: the first hook after ``optimizer.step()``; it zeroes the masked ``E`` entries
  (the paper's ``Lambda <- T(Lambda - lr * grad)``), before any ``ModelCheckpoint`` (Lightning runs
  checkpoint callbacks last) or validation sees the weights, and logs the ranks.
* ``on_train_end``: the final allocation if the schedule did not reach it, physical pruning, the
  ``rank_pattern`` and a heatmap of the ranks beside the checkpoints. ``on_fit_end`` writes the adapter
  in PEFT's AdaLoRA format when ``save_dir`` is set.

The allocator's state (EMAs, masks, step) is part of the callback's state in checkpoints, so a resumed
run continues the schedule exactly (loaded in ``on_fit_start``, or when the strategy restores callbacks after it,
as FSDP and DeepSpeed do).

Under FSDP2 (``ModelParallelStrategy``) and DeepSpeed ZeRO-1/2/3 the allocator and the regularizer work on whole
adapter tensors gathered from the shards (:class:`lightning_peft.distributed.ShardedTensors`), so every rank computes
the masks one process would; masking writes the module's parameter and the optimizer's copy. The layers are not
pruned in place there (they keep ``init_r`` rows, the masked ones zero); the export holds the allocated triplets.
Under FSDP1 (``use_orig_params=True``, Lightning's default) the adapter shares flat shards with the base: each step
gathers the wrapped units that hold AdaLoRA layers, one at a time, with their gradients, and writes the regularizer's
gradients and the masks back the same way (:class:`lightning_peft.distributed.FSDP1Tensors`): about three unit
all-gathers per step, base weights included, which FSDP2 avoids.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_peft.callbacks.base import PEFTCallback
from lightning_peft.methods.adalora import (
    AdaLoRALinear,
    RankAllocator,
    WholeTensors,
    check_adalora_args,
    check_schedule,
    inject_adalora,
    orthogonal_regularization_grads,
)

__all__ = ["AdaLoRA", "rank_grid", "save_rank_heatmap"]


def _steps(tinit: Union[int, float], tfinal: Union[int, float], total: Optional[int]) -> tuple[int, int]:
    """``tinit``/``tfinal`` in optimizer steps: floats in (0, 1) are fractions of ``total`` (0 until it is known)."""

    def one(v: Union[int, float]) -> int:
        if isinstance(v, float) and not v.is_integer():
            return int(v * total) if total is not None else 0
        return int(v)

    return one(tinit), one(tfinal)


class AdaLoRA(PEFTCallback):
    """AdaLoRA: SVD-form low-rank updates whose ranks move to the layers that matter, scheduled automatically.

    No call in the training loop: the callback scores the triplets, masks them to the budget, adds the
    orthogonal regularizer and prunes the adapters at the end. Steps are optimizer steps.

    Args:
        init_r: initial rank of every adapted layer.
        target_r: final average rank; the final budget is ``target_r * number of layers`` triplets (with
            ``target_r=8`` the same total rank as LoRA ``r=8`` on the same targets), or the parameters of rank
            ``target_r`` in every layer with ``budget="params"``.
        tinit: steps at the initial budget before the budget starts to shrink: an integer number of optimizer
            steps, or a float in (0, 1): that fraction of the run's optimizer steps (e.g. ``0.1``).
        tfinal: last steps at the final, fixed allocation: steps, or a fraction of the run as for ``tinit``.
        delta_t: reallocate every ``delta_t`` steps while the budget shrinks.
        beta1: EMA factor of the sensitivity, in (0, 1).
        beta2: EMA factor of the uncertainty, in (0, 1).
        orth_reg_weight: weight of the orthogonal regularizer (0 switches it off). 0.5 is Hugging Face PEFT's
            default; the AdaLoRA authors' GLUE scripts use 0.1, which suits short runs (measurements:
            ``docs/adalora.md``).
        total_steps: optimizer steps of the whole run; None uses ``trainer.estimated_stepping_batches``.
        budget: what the budget counts. ``"rank"`` (the paper's and Hugging Face PEFT's): triplets, so ranks moved
            to wide layers (feed-forward matrices) end with more parameters than LoRA ``r=target_r``. ``"params"``:
            parameters (a triplet of an ``in x out`` layer costs ``in + out + 1``), so the final adapter holds at
            most the parameters of rank ``target_r`` everywhere: LoRA ``r=target_r``'s count plus one ``E`` entry
            per triplet.
        alpha: scale numerator, ``s = alpha / init_r``. ``E`` starts at zero, so runs of a few hundred steps need
            a much larger ``alpha`` than LoRA's (about 16 times LoRA's gives LoRA-sized updates at the same
            learning rate); why, and the measured sweep, in ``docs/adalora.md``.
        dropout: dropout on the adapter's input, in [0, 1).
        target_modules: ``"all-linear"``, a regular expression matching whole module names, or a list of names /
            dotted suffixes.
        exclude_modules: modules to leave alone, same forms.
        trainable_modules: base modules trained in full and saved with the adapter, e.g. ``["classifier"]``.
        save_dir: write the pruned adapter there in Hugging Face PEFT's AdaLoRA format at the end of ``fit``.
        log_ranks: log the budget and each layer's rank to the Trainer's loggers after every optimizer step.
        heatmap: at the end of training write ``adalora_ranks.png`` (layers x module types, colour = final rank)
            and ``adalora_ranks.json`` next to the checkpoints (or in the log / root directory).

    Example::

        trainer = L.Trainer(max_steps=1000, callbacks=[AdaLoRA(init_r=12, target_r=8, tinit=100, tfinal=300, delta_t=10)])
    """

    method_name = "adalora"
    not_recorded = ("log_ranks", "heatmap")

    def __init__(
        self,
        init_r: int = 12,
        target_r: int = 8,
        tinit: Union[int, float] = 0,
        tfinal: Union[int, float] = 0,
        delta_t: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
        orth_reg_weight: float = 0.5,
        total_steps: Optional[int] = None,
        budget: Literal["rank", "params"] = "rank",
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: Union[str, list[str]] = "all-linear",
        exclude_modules: Optional[Union[str, list[str]]] = None,
        trainable_modules: Optional[list[str]] = None,
        save_dir: Optional[str] = None,
        log_ranks: bool = True,
        heatmap: bool = True,
    ) -> None:
        for name, v in (("tinit", tinit), ("tfinal", tfinal)):
            fraction = isinstance(v, float) and 0.0 < v < 1.0
            if not fraction and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and float(v).is_integer()):
                raise ValueError(
                    f"AdaLoRA {name}={v!r}: give a number of optimizer steps (an integer >= 0) or a fraction of the run in "
                    f"(0, 1) (e.g. {name}=0.1)."
                )
        check_adalora_args(init_r, target_r, alpha, dropout, beta1, beta2, orth_reg_weight, 0, 0, delta_t, budget)
        if total_steps is not None:
            check_schedule(*_steps(tinit, tfinal, total_steps), total_steps)
        super().__init__(target_modules, exclude_modules, trainable_modules, save_dir)
        self.init_r, self.target_r, self.tinit, self.tfinal, self.delta_t = init_r, target_r, tinit, tfinal, delta_t
        self.beta1, self.beta2, self.orth_reg_weight, self.total_steps = float(beta1), float(beta2), float(orth_reg_weight), total_steps
        self.alpha, self.dropout, self.log_ranks, self.heatmap = float(alpha), float(dropout), log_ranks, heatmap
        self.budget = budget
        self.allocator: Optional[RankAllocator] = None
        self._pending_state: Optional[dict[str, Any]] = None
        self._schedule_known = False  # on_fit_start of the current fit has run
        self._stepped = False
        self._last_reg: Optional[torch.Tensor] = None
        self.final_ranks: dict[str, int] = {}
        self.rank_pattern: dict[str, list[bool]] = {}

    def _inject(self, module: nn.Module) -> list[str]:
        names = inject_adalora(module, self.target_modules, self.exclude_modules, r=self.init_r, alpha=self.alpha, dropout=self.dropout)
        layers = {n: module.get_submodule(n) for n in names}
        tinit, tfinal = _steps(self.tinit, self.tfinal, self.total_steps)
        self.allocator = RankAllocator(layers, self.target_r, tinit, tfinal, self.delta_t, self.beta1, self.beta2, self.total_steps, self.budget)
        self._set_layer_schedule()
        return names

    def _set_layer_schedule(self) -> None:
        # what to_peft writes into the PEFT config besides the layers' own settings
        assert self.allocator is not None
        schedule = {
            "target_r": self.target_r, "tinit": self.allocator.tinit, "tfinal": self.allocator.tfinal, "deltaT": self.delta_t, "beta1": self.beta1,
            "beta2": self.beta2, "orth_reg_weight": self.orth_reg_weight, "total_step": self.allocator.total_steps or self.total_steps or 1,
        }
        for layer in self.allocator.layers.values():
            layer.schedule = schedule

    @property
    def layers(self) -> dict[str, AdaLoRALinear]:
        return self.allocator.layers if self.allocator is not None else {}

    # -- Lightning hooks --------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        name = type(strategy).__name__
        if stage == "fit" and "FSDP" in name and getattr(strategy, "kwargs", {}).get("use_orig_params") is False:
            raise ValueError(
                f"AdaLoRA under the {name} needs use_orig_params=True (Lightning's default): its allocator reads each "
                "adapter tensor's gradient, which FSDP1 with use_orig_params=False only holds inside flat parameters."
            )
        if stage == "fit":
            self._schedule_known = False
        super().setup(trainer, pl_module, stage)

    @staticmethod
    def _access_for(strategy: Any) -> WholeTensors:
        """How the allocator reads whole tensors under ``strategy`` (chosen at fit start, once ``configure_model`` ran)."""
        name = type(strategy).__name__
        if "DeepSpeed" in name or "ModelParallel" in name:
            from lightning_peft.distributed import ShardedTensors

            return ShardedTensors()  # whole tensors gathered from the shards: the same masks on every rank
        if "FSDP" in name:
            from lightning_peft.distributed import FSDP1Tensors

            return FSDP1Tensors(lambda: strategy.model)
        return WholeTensors()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.allocator is not None, "AdaLoRA: setup did not inject the adapters"
        self.allocator.access = self._access_for(getattr(trainer, "strategy", None))
        total = self.total_steps
        if total is None:
            estimated = trainer.estimated_stepping_batches
            if not math.isfinite(estimated):
                raise ValueError(
                    "AdaLoRA needs the number of optimizer steps for its budget schedule, and the Trainer cannot tell it "
                    "(no max_steps and an unsized dataloader). Set Trainer(max_steps=...) or AdaLoRA(total_steps=...)."
                )
            total = int(estimated)
        tinit, tfinal = _steps(self.tinit, self.tfinal, total)
        if tinit + tfinal >= total:
            raise ValueError(
                f"AdaLoRA schedule leaves no budgeting phase: tinit={tinit} + tfinal={tfinal} >= {total} optimizer steps "
                f"({'total_steps' if self.total_steps is not None else 'trainer.estimated_stepping_batches'}). Decrease tinit/tfinal "
                "or train longer; typical choices are tinit ~ 10% and tfinal ~ 20-30% of the steps."
            )
        saved = self.allocator.total_steps
        if self._pending_state is None and saved is not None and saved != total:
            rank_zero_warn(f"AdaLoRA: the previous schedule had {saved} total steps, this run has {total}; the budget schedule follows the new length.")
        self.allocator.tinit, self.allocator.tfinal = tinit, tfinal
        self.allocator.set_total_steps(total)
        self._set_layer_schedule()
        self._schedule_known = True
        self._load_pending_state()
        precision = trainer.precision_plugin
        scaler = getattr(precision, "scaler", None)
        if scaler is not None:
            from lightning.pytorch.plugins.precision.amp import _optimizer_handles_unscaling

            if any(_optimizer_handles_unscaling(opt) for opt in trainer.optimizers):
                raise ValueError(
                    "AdaLoRA with 16-bit AMP needs gradients unscaled before the optimizer step, but this optimizer unscales "
                    "inside step() (fused=True). Use a non-fused optimizer or bf16-mixed precision."
                )

    def _owns(self, trainer: pl.Trainer, optimizer: Any) -> bool:
        if len(trainer.optimizers) == 1:  # (DeepSpeed's optimizer holds flat copies, not the module's parameters)
            return True
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        return any(id(m.adalora_e) in ids for m in self.layers.values())

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.allocator is None or not self._owns(trainer, optimizer):
            return
        access = self.allocator.access
        layers = list(self.layers.values())
        params = [p for m in layers for p in (m.adalora_a, m.adalora_e, m.adalora_b)]
        with access.session(params):  # (sharded parameters: whole tensors, gathered collectively)
            grads = [access.grad(p) for p in params]
            if all(g is None for g in grads):
                return  # backward was skipped (training_step returned None): the optimizer does not step either
            if self.orth_reg_weight > 0:
                self._last_reg = orthogonal_regularization_grads(layers, self.orth_reg_weight, access)
            if not all(torch.isfinite(g).all() for g in grads if g is not None) or (self._last_reg is not None and not torch.isfinite(self._last_reg)):
                return  # the GradScaler skips this step; scores must not see inf/nan
            self.allocator.update_and_allocate(trainer.global_step)
        self._stepped = True

    def _apply_masks(self) -> None:
        assert self.allocator is not None
        with self.allocator.access.session([m.adalora_e for m in self.layers.values()], grads=False):
            self.allocator.apply_masks()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._stepped or self.allocator is None:
            return
        self._stepped = False
        self._apply_masks()
        if self.log_ranks and trainer.loggers:
            metrics = {"adalora/budget": float(self.allocator.budget())}
            if self._last_reg is not None:
                metrics["adalora/orth_reg"] = float(self._last_reg)
            metrics.update({f"adalora/rank/{_short(n)}": float(r) for n, r in self.allocator.ranks().items()})
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, logger=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.allocator is None or self.final_ranks:
            return
        alloc = self.allocator
        if not alloc.finalized and alloc.total_steps is not None:
            final = alloc.total_steps - alloc.tfinal
            rank_zero_warn(
                f"AdaLoRA: training ended at step {alloc.step + 1} before the final allocation (step {final} = total_steps - tfinal); "
                "the budget is cut to the target now, with no fine-tuning after it. Set tfinal > 0 (e.g. 20-30% of the steps)."
            )
            alloc.finalize()
        self._apply_masks()
        self.rank_pattern = {n: m.rank_pattern() for n, m in alloc.layers.items()}
        if not alloc.access.sharded:
            for m in alloc.layers.values():
                m.prune()
        # else the parameters are sharded: the layers keep init_r triplets, the masked ones zero (the same outputs);
        # save_dir and adapter files write the allocated triplets only
        self.final_ranks = {n: m.rank for n, m in alloc.layers.items()}
        unit = "triplets" if alloc.unit == "rank" else "parameters"
        rank_zero_info(
            f"AdaLoRA: {'pruned to' if not alloc.access.sharded else 'allocated'} {sum(self.final_ranks.values())} triplets, budget {alloc.budget():,} of {alloc.target_budget:,} {unit}. "
            f"Ranks: {self.final_ranks}"
        )
        if self.heatmap and trainer.is_global_zero:
            out = self.output_dir(trainer)
            out.mkdir(parents=True, exist_ok=True)
            (out / "adalora_ranks.json").write_text(json.dumps({"ranks": self.final_ranks, "rank_pattern": self.rank_pattern}, indent=1) + "\n")
            save_rank_heatmap(self.final_ranks, out / "adalora_ranks.png", init_r=self.init_r)

    @staticmethod
    def output_dir(trainer: pl.Trainer) -> Path:
        """Where the rank files go: the ModelCheckpoint's directory, else the log directory, else the root directory."""
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return Path(ckpt.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir)

    # -- state for resume -------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.allocator is not None:
            state["allocator"] = self.allocator.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        alloc = state_dict.get("allocator")
        if alloc is None:
            return
        self._pending_state = alloc
        self._load_pending_state()  # now if on_fit_start has run: FSDP and DeepSpeed restore callbacks after it

    def _load_pending_state(self) -> None:
        """Load the checkpoint's allocator state once the schedule's length is known (``on_fit_start``)."""
        if self._pending_state is None or not self._schedule_known or self.allocator is None:
            return
        saved, total = self._pending_state.get("total_steps"), self.allocator.total_steps
        if saved is not None and saved != total:
            rank_zero_warn(f"AdaLoRA: the checkpoint's schedule had {saved} total steps, this run has {total}; the budget schedule follows the new length.")
        self.allocator.load_state_dict(self._pending_state)
        self._pending_state = None


def _short(name: str) -> str:
    """``model.bert.encoder.layer.3.attention.self.query`` -> ``3.attention.self.query`` (the part from the layer index on)."""
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[digits[-1]:]) if digits else name


def rank_grid(ranks: dict[str, int]) -> tuple[list[str], list[str], list[list[Optional[int]]]]:
    """``(layer labels, module-type labels, grid)``: rows = layer index (the last number in the name), columns =
    the name after it (``attention.self.query``); a name without a number is its own row."""
    cells: dict[tuple[str, str], int] = {}
    for name, r in ranks.items():
        parts = name.split(".")
        digits = [i for i, p in enumerate(parts) if p.isdigit()]
        row, col = (parts[digits[-1]], ".".join(parts[digits[-1] + 1:]) or "-") if digits else ("-", name)
        cells[(row, col)] = r
    rows = sorted({k[0] for k in cells}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    cols = list(dict.fromkeys(k[1] for k in cells))
    return rows, cols, [[cells.get((r, c)) for c in cols] for r in rows]


def save_rank_heatmap(ranks: dict[str, int], path: Union[str, Path], init_r: Optional[int] = None) -> Optional[Path]:
    """Write the AdaLoRA paper's figure: layers x module types, colour = final rank. Needs matplotlib (else warns, returns None)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        rank_zero_warn("AdaLoRA: matplotlib is not installed, so no rank heatmap is written (pip install matplotlib).")
        return None
    rows, cols, grid = rank_grid(ranks)
    data = torch.tensor([[float("nan") if v is None else float(v) for v in row] for row in grid]).t().numpy()  # (types, layers)
    fig, ax = plt.subplots(figsize=(max(5.0, 2.5 + 0.6 * len(rows)), 1.5 + 0.45 * len(cols)))
    vmax = init_r or max(ranks.values(), default=1)
    im = ax.imshow(data, cmap="YlGn", vmin=0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(rows)), rows)
    ax.set_yticks(range(len(cols)), [re.sub(r"^attention\.", "attn.", c) for c in cols])
    ax.set_xlabel("layer")
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if data[i, j] == data[i, j]:
                ax.text(j, i, f"{int(data[i, j])}", ha="center", va="center", fontsize=8, color="white" if data[i, j] > 0.6 * vmax else "black")
    fig.colorbar(im, ax=ax, label="final rank")
    ax.set_title("AdaLoRA rank allocation")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
