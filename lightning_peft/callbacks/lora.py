"""The ``LoRA`` callback: :mod:`lightning_peft.methods.lora` on a Lightning model."""

from __future__ import annotations

from typing import Optional, Union

from torch import nn

from lightning_peft.callbacks.base import PEFTCallback
from lightning_peft.methods.lora import check_lora_args, inject_lora

__all__ = ["LoRA"]


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

    Example::

        trainer = L.Trainer(callbacks=[LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"])])
    """

    method_name = "lora"
    recorded_when_set = ("adapter_name", "rank_pattern", "alpha_pattern", "gate", "use_dora")

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
    ) -> None:
        check_lora_args(r, alpha, dropout, init)
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
