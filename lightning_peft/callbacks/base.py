"""``PEFTCallback``: the Lightning glue every method callback shares.

What it does, in Lightning's order (``Trainer.fit``):

1. ``setup``: inject the adapters and freeze the base. If the LightningModule builds its model in
   ``configure_model``, injection runs right after that hook instead. Either way it happens before
   the checkpoint restore, the precision plugin, the strategy wrap (DDP/FSDP) and ``configure_optimizers``.
2. Checkpoints hold the adapter only: the LightningModule's ``on_save_checkpoint`` (which Lightning
   calls even with ``save_weights_only=True``) drops base weights from ``checkpoint["state_dict"]``
   and records the adapter's settings under ``checkpoint["lightning_peft"]``.
3. Resume: ``strict_loading`` is turned off for the base weights, and ``on_load_checkpoint`` checks,
   before anything is loaded, that the checkpoint's adapter keys, shapes and settings match this
   model's; a mismatch raises one error naming every bad key.
4. All or nothing: if the Trainer call fails before training starts (another callback's setup, the
   checkpoint restore, ``configure_optimizers``), every adapter the call injected is taken out again
   (``on_exception``), so the user's model is as it was and the call can be retried.
"""

from __future__ import annotations

import inspect
import weakref
from pathlib import Path
from collections.abc import Sequence
from typing import Any, ClassVar, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from typing_extensions import override

from lightning_peft.callbacks._checkpoints import (  # re-exported: the checkpoint logic lives there
    _CKPT_KEY,
    _kept_names,
    adapter_checkpoint_state,
    check_adapter_checkpoint,
    read_checkpoint,
    read_checkpoint_directory,
)
from lightning_peft.callbacks._strategies import support_strategy
from lightning_peft.core import (
    NamedAdapters,
    StructureSnapshot,
    adapter_modules,
    adapter_param_names,
    count_parameters,
    mark_trainable,
    peft_state,
    sharding_of,
    structure_snapshot,
)
from lightning_peft.distributed import save_sharded_adapter
from lightning_peft.io import check_savable, save_adapter
from lightning_peft.module_copies import keep_per_adapter_copies
from lightning_peft.targeting import match_name
from lightning_peft.validation import strict_init

__all__ = [
    "PEFTCallback",
    "adapter_checkpoint_state",
    "check_adapter_checkpoint",
    "load_adapter_checkpoint",
    "peft_state",
    "read_checkpoint",
]

class _CheckpointHook:
    """Wraps a LightningModule's ``on_save_checkpoint``/``on_load_checkpoint`` (picklable, unlike a closure)."""

    def __init__(self, module: pl.LightningModule, original: Any, kind: str) -> None:
        self.module, self.original, self.kind = module, original, kind

    def __call__(self, checkpoint: dict[str, Any]) -> None:
        if self.kind == "load":
            check_adapter_checkpoint(self.module, checkpoint)
            self.original(checkpoint)
        else:
            self.original(checkpoint)
            adapter_checkpoint_state(self.module, checkpoint)


def _install_checkpoint_hooks(module: pl.LightningModule) -> None:
    module.strict_loading = False  # base weights are not in an adapter checkpoint
    if getattr(type(module), "_implements_peft_checkpoint_hooks", False):  # PEFTMixin implements both hooks itself
        return
    for kind, hook in (("save", "on_save_checkpoint"), ("load", "on_load_checkpoint")):
        if not isinstance(getattr(module, hook), _CheckpointHook):
            setattr(module, hook, _CheckpointHook(module, getattr(module, hook), kind))


class PEFTCallback(Callback):
    """Base class of the method callbacks: inject, freeze, and keep checkpoints adapter-only.

    Subclasses set ``method_name``, take their settings as typed ``__init__`` arguments stored under the same
    names, and implement :meth:`_inject` (the pure-PyTorch injection rule of their ``methods/`` file).
    :meth:`config` (what checkpoints record and ``load_adapter_checkpoint`` rebuilds the callback from) is derived
    from the signature; defining the class registers it under ``method_name``.

    Args:
        target_modules: modules to adapt: ``"all-linear"``, a regular expression matching whole
            qualified names, or a list of names / dotted suffixes (see :mod:`lightning_peft.targeting`).
        exclude_modules: modules to leave alone, in the same forms.
        trainable_modules: base modules trained in full and saved with the adapter (Hugging Face PEFT's
            ``modules_to_save``), e.g. ``["classifier"]`` for a new classification head.
        save_dir: if set, the adapter is written there in Hugging Face PEFT's format at the end of ``fit``.
    """

    method_name: ClassVar[str] = "adapter"
    #: ``__init__`` arguments that do not define the adapter (logging, output files): left out of :meth:`config`
    not_recorded: ClassVar[tuple[str, ...]] = ()
    #: arguments recorded only when set, so that checkpoints made before they existed still match
    recorded_when_set: ClassVar[tuple[str, ...]] = ()
    _registry: ClassVar[dict[str, type[PEFTCallback]]] = {}

    def __init__(
        self,
        target_modules: Union[str, list[str]] = "all-linear",
        exclude_modules: Optional[Union[str, list[str]]] = None,
        trainable_modules: Optional[list[str]] = None,
        save_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        for arg, value in (("target_modules", target_modules), ("exclude_modules", exclude_modules)):
            if value is not None and not isinstance(value, (str, list, tuple)):
                raise TypeError(f"{arg} must be a string or a list of strings, got {type(value).__name__}: {value!r}.")
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.exclude_modules = exclude_modules if exclude_modules is None or isinstance(exclude_modules, str) else list(exclude_modules)
        self.trainable_modules = list(trainable_modules or [])
        # "~/adapters/x" means the home folder; a value of another type is refused by the strict argument check
        self.save_dir = str(Path(save_dir).expanduser()) if isinstance(save_dir, (str, Path)) and str(save_dir) else save_dir
        self.injected: list[str] = []
        self._injected_into: Optional[weakref.ref] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        PEFTCallback._registry[cls.method_name] = cls
        strict_init(cls)  # every typed __init__ argument is checked strictly (a string is not a bool, inf no scale)

    @property
    @override
    def state_key(self) -> str:
        # unique per configuration, so that two callbacks of one type reach our own, clearer error in setup; a named
        # adapter other than "default" adds its name (a default one keeps the key it always had)
        name = getattr(self, "adapter_name", "default")
        named = {} if name == "default" else {"name": name}
        return self._generate_state_key(targets=repr(self.target_modules), exclude=repr(self.exclude_modules), **named)

    # -- what a method provides -------------------------------------------------------------------
    def _inject(self, module: nn.Module) -> list[str]:
        """Inject the method's layers into ``module`` (all-or-nothing); return the wrapped module names."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The settings that define the adapter (saved in checkpoints, checked on resume): every argument of the
        class's ``__init__``, read back from the attribute of the same name, except ``save_dir`` and
        :attr:`not_recorded`; the :attr:`recorded_when_set` ones only when set. Derived from the signature, so that
        ``type(self)(**config-without-method)`` rebuilds this callback (``load_adapter_checkpoint`` does that)."""
        cfg: dict[str, Any] = {"method": self.method_name}
        for name, param in inspect.signature(type(self).__init__).parameters.items():
            if name in ("self", "save_dir") or name in self.not_recorded or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            value = getattr(self, name)
            if name in self.recorded_when_set and (not value or value == param.default):
                continue
            cfg[name] = value
        return cfg

    # -- usable without a Trainer -----------------------------------------------------------------
    def inject(self, module: nn.Module) -> nn.Module:
        """Add this callback's adapters to ``module`` and freeze everything else; returns ``module``.

        Works on any ``nn.Module`` with no Trainer. All checks run before the model is touched, so an
        error leaves ``module`` unchanged.

        Example::

            model = LoRA(r=8, target_modules=["q_proj", "v_proj"]).inject(model)
        """
        if self.injected:
            raise RuntimeError(
                f"This {type(self).__name__} callback already injected adapters into another model "
                f"({len(self.injected)} modules). Create one callback per model."
            )
        trained_modules = self._trainable_module_names(module)
        with structure_snapshot(module):
            names = self._inject(module)
            # a module another adapter already trains in full becomes one copy per adapter (module_copies)
            trainable = keep_per_adapter_copies(module, trained_modules, getattr(self, "adapter_name", "default"))
        state = peft_state(module)
        state["methods"].append(self.config())
        state["trainable"] = sorted(set(state["trainable"]) | set(trainable))
        mark_trainable(module, extra=state["trainable"])
        self.injected = names
        self._injected_into = weakref.ref(module)
        return module

    def _trainable_module_names(self, module: nn.Module) -> list[str]:
        """The modules ``trainable_modules`` names (outermost only), checked."""
        if not self.trainable_modules:
            return []
        names = [n for n, _ in module.named_modules() if n and match_name(n, self.trainable_modules)]
        if not names:
            candidates = sorted({n.split(".")[-1] for n, m in module.named_modules() if n and not list(m.children())})
            raise ValueError(
                f"trainable_modules={self.trainable_modules!r} matched no module of {type(module).__name__}. "
                f"Candidates: {candidates[:20]}."
            )
        unmatched = [t for t in self.trainable_modules if not any(match_name(n, [t]) for n in names)]
        if unmatched:
            raise ValueError(
                f"trainable_modules entries {unmatched} match no module of {type(module).__name__} (a typo?); the others "
                f"matched {names[:5]}. Every entry must name a module (its name or a dotted suffix)."
            )
        return [n for n in names if not any(n.startswith(o + ".") for o in names)]

    # -- Lightning hooks --------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        mine = getattr(self, "adapter_name", None)
        for cb in trainer.callbacks:
            # several callbacks of one method are several named adapters (one per adapter_name)
            if cb is not self and type(cb) is type(self) and (mine is None or getattr(cb, "adapter_name", None) == mine):
                raise ValueError(
                    f"Two {type(self).__name__} callbacks are attached to this Trainer"
                    + (f", both for the adapter named {mine!r}" if mine is not None else "")
                    + f". One model takes one {type(self).__name__} per adapter: merge their target_modules into one "
                    "callback" + (", or give each its own adapter_name." if mine is not None else ".")
                )
        if stage == "fit" and self.save_dir:
            check_writable_dir(self.save_dir, f"{type(self).__name__}(save_dir=...)")  # before training, not after it
        if self._injected_into is not None and self._injected_into() is pl_module:
            return  # a second stage (validate after fit, ...) on the same module
        # (a callback already used on another module raises in inject(): one callback per model)
        support_strategy(trainer)
        call = _TrainerCallInjection.of(pl_module)
        if is_overridden("configure_model", pl_module) and not _shards_in_configure_model(trainer, pl_module):
            call.defer(self)  # the model exists only after configure_model: inject right after it
        else:
            call.inject(self)

    def _inject_lightning(self, pl_module: pl.LightningModule) -> None:
        self.inject(pl_module)
        if self.save_dir:  # before training, not at its end: a method without a file format would lose the run
            try:
                check_savable(pl_module)
            except NotImplementedError as err:
                raise NotImplementedError(
                    f"{type(self).__name__}(save_dir={self.save_dir!r}) cannot write this adapter: {err} Training was not "
                    "started. Drop save_dir and keep the adapter in checkpoints (load_adapter_checkpoint reads them)."
                ) from None
        _install_checkpoint_hooks(pl_module)
        rank_zero_info(f"{type(self).__name__}: adapted {len(self.injected)} modules. {count_parameters(pl_module)}")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # the Trainer call failed before training started (in another callback's setup, in configure_optimizers, in the
        # checkpoint restore, ...): take out what this call injected, so the model is as it was and a retry works
        _TrainerCallInjection.roll_back(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _TrainerCallInjection.commit(pl_module)  # the call ended without an error: its adapters stay

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._refuse_training_merged_adapters(pl_module)
        # training starts: from here on the adapters hold trained values, which a later error must not take away
        _TrainerCallInjection.commit(pl_module)
        # the adapter's settings beside the module's hyperparameters (hparams.yaml, TensorBoard's hparams)
        methods = [dict(m) for m in peft_state(pl_module)["methods"]]
        for logger in trainer.loggers:
            logger.log_hyperparams({"lightning_peft": methods})

    @staticmethod
    def _refuse_training_merged_adapters(pl_module: pl.LightningModule) -> None:
        def merged_and_trained(m) -> bool:
            if not m.merged:
                return False
            params = dict(m.named_parameters())
            names = m.merged_adapters if isinstance(m, NamedAdapters) else None  # named adapters: only those merged
            trained = [n for n in m.adapter_params() if params[n].requires_grad]
            return any(names is None or any(a in n.split(".") for a in names) for n in trained)

        # a merged adapter that is still trainable learns nothing (merging another, frozen one and training a new
        # adapter on top is fine)
        merged = [n for n, m in adapter_modules(pl_module) if merged_and_trained(m)]
        if merged:
            raise RuntimeError(
                f"{len(merged)} adapter layer(s) are merged into the base weights (e.g. {merged[0]!r}): training now would "
                "update adapter parameters that the forward does not use, so nothing would be learned. Call "
                "lightning_peft.unmerge_adapters(model) before fit, and merge again after training."
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.save_dir:
            return
        if sharding_of(pl_module) is not None:  # every rank gathers the adapter (not the base); rank 0 writes
            path = save_sharded_adapter(pl_module, self.save_dir, root=trainer.strategy.model)
        elif trainer.is_global_zero:
            path = save_adapter(pl_module, self.save_dir)
        else:
            return
        rank_zero_info(f"{type(self).__name__}: adapter written to {path}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config(), "injected": list(self.injected)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("config")
        if saved is not None and saved != self.config():
            diff = {k: (saved.get(k), self.config().get(k)) for k in set(saved) | set(self.config()) if saved.get(k) != self.config().get(k)}
            raise ValueError(f"{type(self).__name__} settings differ from the checkpoint's (checkpoint, now): {diff}.")


strict_init(PEFTCallback)


def _shards_in_configure_model(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Under ``ModelParallelStrategy`` the LightningModule shards its model in ``configure_model`` (``fully_shard``):
    a model that already exists at ``setup`` gets its adapters then, before it is sharded."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(trainer.strategy, ModelParallelStrategy) and any(True for _ in pl_module.parameters())


class _TrainerCallInjection:
    """The adapters that the PEFT callbacks of one Trainer call inject into one module, as one unit.

    Several callbacks inject one after the other in ``setup`` (or right after ``configure_model``). If the call fails
    before training starts (a later callback's targets match nothing, ``configure_optimizers`` raises, the checkpoint
    does not fit, ...), :meth:`roll_back` puts the module back as it was before the first injection, so that the
    user's model is unchanged and the same call can simply be retried. Once training starts (or the call ends
    without an error) the injection is committed: an error during training keeps the trained adapters.
    """

    _open: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module
        self.before: Optional[StructureSnapshot] = None  # taken just before the first injection
        self.callbacks: list[PEFTCallback] = []
        self.deferred: list[PEFTCallback] = []

    @classmethod
    def of(cls, module: pl.LightningModule) -> _TrainerCallInjection:
        if module not in cls._open:
            cls._open[module] = cls(module)
        return cls._open[module]

    def inject(self, callback: PEFTCallback) -> None:
        if self.before is None:
            self.before = StructureSnapshot(self.module)
        self.callbacks.append(callback)
        callback._inject_lightning(self.module)

    def defer(self, callback: PEFTCallback) -> None:
        self.deferred.append(callback)
        if len(self.deferred) == 1:  # one wrapper, whatever the number of callbacks
            self.module.configure_model = self._configure_model_then_inject

    def _configure_model_then_inject(self) -> None:
        del self.module.configure_model  # back to the class's own method
        self.module.configure_model()
        kind = sharding_of(self.module)
        if kind is not None:
            names = ", ".join(type(c).__name__ for c in self.deferred)
            raise RuntimeError(
                f"{type(self.module).__name__}.configure_model sharded the model ({kind}) before {names} could add "
                "adapters: adapters are added before sharding. Either build the model in __init__ (the callback then "
                "adds them at setup, before configure_model shards), or call self.apply_peft(...) (PEFTMixin) in "
                "configure_model before fully_shard."
            )
        for callback in self.deferred:
            if not callback.injected:
                self.inject(callback)

    @classmethod
    def commit(cls, module: pl.LightningModule) -> None:
        call = cls._open.pop(module, None)
        if call is not None and module.__dict__.get("configure_model") == call._configure_model_then_inject:
            del module.configure_model  # configure_model never ran (e.g. a stage that does not call it)

    @classmethod
    def roll_back(cls, module: pl.LightningModule) -> None:
        call = cls._open.get(module)
        if call is None:
            return
        cls.commit(module)
        if call.before is not None:
            call.before.restore()
        for callback in call.callbacks:
            callback.injected = []
            callback._injected_into = None
        if call.callbacks:
            rank_zero_info(
                f"lightning-peft: the Trainer call failed before training started; the adapters it injected "
                f"({', '.join(type(c).__name__ for c in call.callbacks)}) were taken out, so the model is as it was."
            )


def check_writable_dir(directory: Union[str, Path], what: str) -> Path:
    """Raise ``PermissionError`` / ``NotADirectoryError`` unless ``directory`` can be created (or exists) and written,
    without creating anything: called at ``setup``, so an unwritable path fails before training, not after it."""
    import os

    path = Path(directory).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what}: {path} exists and is not a directory; the adapter is a directory of files. Choose another path.")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{what}: {existing} (on the way to {path}) is a file, so {path} cannot be created. Choose another path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{what}: cannot write to {path} ({existing} is not writable). Training was not started, so nothing is lost: "
            "choose a writable save_dir."
        )
    return path


def inject_recorded_adapters(module: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Inject into ``module`` the adapters a checkpoint's ``lightning_peft`` record describes, with their settings."""
    for cfg in record["methods"]:
        cfg = dict(cfg) if isinstance(cfg, dict) else {"method": cfg}
        method = cfg.pop("method", None)
        if method not in PEFTCallback._registry:
            raise ValueError(
                f"The checkpoint records an adapter of method {method!r}, which this lightning-peft does not have "
                f"(known: {sorted(PEFTCallback._registry)}). Load it with the lightning-peft version that wrote it."
            )
        PEFTCallback._registry[method](**cfg).inject(module)
    return module


def recorded_methods(record: dict[str, Any]) -> list[str]:
    """The method names a checkpoint's ``lightning_peft`` record lists (for messages)."""
    return [str(m.get("method") if isinstance(m, dict) else m) for m in record.get("methods", [])]


def fit_checkpoint_adapters(module: nn.Module, checkpoint: dict[str, Any], record: dict[str, Any]) -> None:
    """All or nothing: when ``module`` carries no adapter, inject the ones ``record`` describes; then check that the
    checkpoint's adapter keys, shapes, values and settings fit ``module``. A misfit leaves ``module`` as it was."""
    with structure_snapshot(module):
        if not peft_state(module)["methods"]:
            inject_recorded_adapters(module, record)
        check_adapter_checkpoint(module, checkpoint)  # every adapter key present, with the right shape and finite values


def load_adapter_checkpoint(module: nn.Module, checkpoint: Union[str, Path, dict[str, Any]], allow_types: Sequence[Any] = ()) -> nn.Module:
    """Load the adapter of a Lightning checkpoint made with lightning-peft into ``module``.

    ``module`` is the base (built from its own source) with or without adapters: when it has none, the
    adapters the checkpoint records are injected first. Returns ``module``. A checkpoint file is read with
    :func:`read_checkpoint` (``weights_only=True``: it cannot run code); ``allow_types`` names further types you trust.
    A checkpoint directory written by a sharding strategy (FSDP2/FSDP1 distributed, DeepSpeed ZeRO-1/2) is read
    the same way, in this one process (:func:`~lightning_peft.callbacks._checkpoints.read_checkpoint_directory`).

    Example::

        model = MyLightningModule()            # base weights from their own source
        load_adapter_checkpoint(model, "last.ckpt")
    """
    if not isinstance(checkpoint, dict):
        if Path(checkpoint).expanduser().is_dir():  # written by a sharding strategy (FSDP, DeepSpeed)
            checkpoint = read_checkpoint_directory(checkpoint, allow_types)
        else:
            checkpoint = read_checkpoint(checkpoint, allow_types)
    record = checkpoint.get(_CKPT_KEY)
    if not isinstance(record, dict) or not isinstance(record.get("methods"), list):
        raise ValueError("This checkpoint has no 'lightning_peft' record: it was not saved with a lightning-peft callback or PEFTMixin.")
    fit_checkpoint_adapters(module, checkpoint, record)  # a checkpoint that does not fit leaves no adapter injected for it
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    if isinstance(module, pl.LightningModule):
        _install_checkpoint_hooks(module)
    return module
