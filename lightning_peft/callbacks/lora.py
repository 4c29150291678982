"""The ``LoRA`` callback: :mod:`lightning_peft.methods.lora` on a Lightning model."""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_peft.callbacks.base import PEFTCallback
from lightning_peft.methods.lora import check_lora_args, inject_lora
from lightning_peft.methods.loraplus import apply_loraplus, check_loraplus_ratio

__all__ = ["LoRA"]

_NOT_RESUMED = object()  # no checkpoint was loaded into the callback for this fit


class LoRA(PEFTCallback):
    """Low-Rank Adaptation of the base model's linear layers; the base is frozen.

    Args:
        r: rank of each update ``B A``.
        alpha: scale numerator, ``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``). Default 16, so ``s = 2`` at
            the default ``r=8`` (peft's ``lora_alpha`` defaults to 8: pass ``alpha=8`` for its ``s = 1``).
        dropout: dropout on the adapter's input, in [0, 1).
        target_modules: ``"all-linear"``, a regular expression matching whole module names, or a list of
            names / dotted suffixes (``["q_proj", "v_proj"]``, ``["query", "value"]`` for BERT).
        exclude_modules: modules to leave alone, same forms.
        use_rslora: rank-stabilized scaling ``alpha / sqrt(r)``.
        init: initialisation: ``"kaiming"`` (``A`` uniform, the default) or ``"gaussian"``, both with ``B = 0``; or, from the
            base weight, ``"pissa"`` (principal singular vectors, Meng et al., 2024), ``"pissa_niter_K"`` (the same from a
            randomized SVD with ``K`` subspace iterations: faster on large layers) or ``"olora"`` (QR, Büyükakyüz, 2024).
            PiSSA/OLoRA start ``A, B`` at a part of ``W`` and train the base's residual; the base weights are not
            changed (the initial product is kept and subtracted), and the export is plain LoRA that loads on the
            original base.
        trainable_modules: base modules trained in full and saved with the adapter, e.g. ``["classifier"]``.
        save_dir: write the adapter there in Hugging Face PEFT's format at the end of ``fit``.
        adapter_name: name of this adapter; a model that already carries LoRA adapters gets it as an
            additional named adapter (the others stay as they are, frozen ones stay frozen).
        rank_pattern: per-module ranks overriding ``r``, e.g. ``{"q_proj": 16}`` (keys are regular
            expressions matched against the end of module names, as in Hugging Face PEFT).
        alpha_pattern: per-module alphas overriding ``alpha``, same keys.
        gate: put each update behind a learned gate ``sigmoid(W_g x + b_g)`` read from the layer's input (UniPELT);
            a gated update cannot be merged or exported in PEFT's format.
        use_dora: DoRA (Liu et al., 2024): a trained magnitude per output row rescales the direction ``W + s B A``
            (``W' = m (W + s B A) / ||W + s B A||``); merges exactly and reads/writes PEFT's ``use_dora`` format.
        loraplus_lr_ratio: LoRA+ (Hayou et al., 2024): the ``B`` matrices (and, as in Hugging Face PEFT, every trainable
            1-D parameter) train at this many times the learning rate of the rest, e.g. 4-16 (the larger, the smaller the
            learning rate must be: at the quickstart's 1e-3, 16 diverged and 4 trained). At fit start the first
            optimizer's parameter groups are split (:func:`~lightning_peft.methods.loraplus.apply_loraplus`: same
            settings, ``lr`` times the ratio) and its LR schedulers follow. None (the default): one learning rate.
            An optimizer setting, not part of the adapter: not recorded with it, but a resume must use the same value.
            Under DeepSpeed build the groups in ``configure_optimizers`` with ``loraplus_param_groups`` instead.

    Example::

        trainer = L.Trainer(callbacks=[LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"])])
        trainer = L.Trainer(callbacks=[LoRA(r=8, loraplus_lr_ratio=16)])  # LoRA+
    """

    method_name = "lora"
    recorded_when_set = ("adapter_name", "rank_pattern", "alpha_pattern", "gate", "use_dora")
    # the optimizer's setting, not the adapter's: a checkpoint's record rebuilds the adapter without it, and adapters
    # trained with and without LoRA+ are the same kind of file
    not_recorded = ("loraplus_lr_ratio",)

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: Union[str, list[str]] = "all-linear",
        exclude_modules: Optional[Union[str, list[str]]] = None,
        use_rslora: bool = False,
        init: str = "kaiming",
        trainable_modules: Optional[list[str]] = None,
        save_dir: Optional[str] = None,
        adapter_name: str = "default",
        rank_pattern: Optional[dict[str, int]] = None,
        alpha_pattern: Optional[dict[str, float]] = None,
        gate: bool = False,
        use_dora: bool = False,
        loraplus_lr_ratio: Optional[float] = None,
    ) -> None:
        check_lora_args(r, alpha, dropout, init)
        if loraplus_lr_ratio is not None:
            check_loraplus_ratio(loraplus_lr_ratio, "LoRA")
        for value in (rank_pattern or {}).values():
            check_lora_args(value, alpha, dropout, init)
        for value in (alpha_pattern or {}).values():
            check_lora_args(r, value, dropout, init)
        super().__init__(target_modules, exclude_modules, trainable_modules, save_dir)
        self.r, self.alpha, self.dropout, self.use_rslora, self.init = r, float(alpha), float(dropout), use_rslora, init
        self.adapter_name = adapter_name
        self.rank_pattern = dict(rank_pattern or {})
        self.alpha_pattern = {k: float(v) for k, v in (alpha_pattern or {}).items()}
        self.gate = bool(gate)
        self.use_dora = use_dora
        self.loraplus_lr_ratio = None if loraplus_lr_ratio is None else float(loraplus_lr_ratio)
        self._resumed_ratio: Any = _NOT_RESUMED  # the ratio of the checkpoint a fit resumes from
        if gate is True and use_dora is True:
            raise ValueError("LoRA: gate=True (UniPELT) gates plain LoRA updates; it cannot be combined with use_dora=True. Choose one.")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(targets=repr(self.target_modules), exclude=repr(self.exclude_modules), name=self.adapter_name)

    def _inject(self, module: nn.Module) -> list[str]:
        return inject_lora(
            module, self.target_modules, self.exclude_modules, r=self.r, alpha=self.alpha, dropout=self.dropout,
            use_rslora=self.use_rslora, init=self.init, adapter_name=self.adapter_name,
            rank_pattern=self.rank_pattern, alpha_pattern=self.alpha_pattern, gate=self.gate, use_dora=self.use_dora,
        )

    # -- LoRA+ ------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.loraplus_lr_ratio is not None and "DeepSpeed" in type(trainer.strategy).__name__:
            raise RuntimeError(
                f"LoRA(loraplus_lr_ratio={self.loraplus_lr_ratio}) does not support the DeepSpeed strategy: its engine wraps "
                "the optimizer before the callback could split the parameter groups. Drop loraplus_lr_ratio and build the "
                "groups in configure_optimizers: torch.optim.AdamW(lightning_peft.loraplus_param_groups(self, lr=..., "
                f"loraplus_lr_ratio={self.loraplus_lr_ratio}))."
            )
        super().setup(trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        resumed, self._resumed_ratio = self._resumed_ratio, _NOT_RESUMED
        if resumed is not _NOT_RESUMED and resumed != self.loraplus_lr_ratio:
            # the optimizer state restored after this hook holds the checkpoint's groups and learning rates
            def name(ratio: Optional[float]) -> str:
                return "without LoRA+" if ratio is None else f"with loraplus_lr_ratio={ratio}"

            raise ValueError(
                f"LoRA: the checkpoint was trained {name(resumed)}, and this callback has loraplus_lr_ratio="
                f"{self.loraplus_lr_ratio}; its optimizer state (parameter groups and learning rates) belongs to the former. "
                f"Resume with loraplus_lr_ratio={resumed}, or start a new fit from the adapter (load_adapter_checkpoint) to change it."
            )
        if self.loraplus_lr_ratio is None:
            return
        if not trainer.optimizers:
            raise RuntimeError(f"LoRA(loraplus_lr_ratio={self.loraplus_lr_ratio}): the Trainer has no optimizer to split; configure_optimizers must return one.")
        if len(trainer.optimizers) > 1:
            rank_zero_warn(f"LoRA: {len(trainer.optimizers)} optimizers; loraplus_lr_ratio splits the groups of the first one only.")
        optimizer = trainer.optimizers[0]
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs if getattr(c.scheduler, "optimizer", None) is optimizer]
        groups = apply_loraplus(optimizer, pl_module, self.loraplus_lr_ratio, schedulers)
        rank_zero_info(f"LoRA+: parameter groups {groups} of {len(optimizer.param_groups)} train at {self.loraplus_lr_ratio} x the learning rate.")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "loraplus_lr_ratio": self.loraplus_lr_ratio}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._resumed_ratio = state_dict.get("loraplus_lr_ratio")  # checked at fit start: validate/test do not care
