"""The ``lightning-peft`` command: LightningCLI over the ready task modules and the PEFT callbacks.

Examples::

    lightning-peft fit --config configs/quickstart.yaml
    lightning-peft fit --config configs/quickstart.yaml --trainer.callbacks.init_args.r=16
    lightning-peft fit --config configs/quickstart.yaml --print_config > my.yaml
    lightning-peft export --ckpt_path runs/last.ckpt --out my_adapter            # PEFT-format adapter
    lightning-peft export --ckpt_path runs/last.ckpt --out merged_model --merged # plain HF model
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from torch.optim import Optimizer

__all__ = ["PEFTCLI", "main"]


class PEFTCLI(LightningCLI):
    """``LightningCLI`` whose top-level ``optimizer:`` (e.g. ``bitsandbytes.optim.PagedAdamW8bit``) trains the adapters.

    LightningCLI instantiates that optimizer over ``model.parameters()`` while it parses the config, before a PEFT
    callback has injected the adapters and frozen the base: as is, it would hold only frozen base weights and
    train nothing. Here its (single, still stateless) parameter group is pointed at the parameters that train
    when Lightning calls ``configure_optimizers``; the class and its settings stay as configured.
    """

    @staticmethod
    def configure_optimizers(lightning_module: LightningModule, optimizer: Optimizer, lr_scheduler=None):
        if len(optimizer.param_groups) == 1 and not optimizer.state:
            optimizer.param_groups[0]["params"] = [p for p in lightning_module.parameters() if p.requires_grad]
        return LightningCLI.configure_optimizers(lightning_module, optimizer, lr_scheduler)

    def _check_the_checkpoint_has_its_adapter(self) -> None:
        """An adapter-only checkpoint given to a model that neither has a PEFT callback nor ``PEFTMixin`` would meet
        torch's list of every missing base weight: say what is missing instead, before Lightning loads it."""
        from lightning_peft.callbacks.base import _CKPT_KEY, PEFTCallback, recorded_methods
        from lightning_peft.mixin import PEFTMixin

        ckpt_path = self.config.get(str(self.subcommand), {}).get("ckpt_path")
        if not ckpt_path or isinstance(self.model, PEFTMixin) or any(isinstance(c, PEFTCallback) for c in self.trainer.callbacks):
            return
        path = Path(str(ckpt_path)).expanduser()
        if not path.is_file():
            return  # "last", "best", a missing file: Lightning resolves or reports them
        try:  # tensors memory-mapped, not read: only the record is looked at
            record = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(_CKPT_KEY)
        except Exception:  # noqa: BLE001  (an unreadable file is Lightning's to report)
            return
        if isinstance(record, dict):
            raise ValueError(
                f"{path} holds only a lightning-peft adapter ({', '.join(recorded_methods(record))}), and this run has no PEFT "
                f"callback and {type(self.model).__name__} no PEFTMixin, so the base weights would be reported missing. "
                "Add the callback the checkpoint was trained with (the same --config, or --trainer.callbacks+=...), or "
                "load it in Python with lightning_peft.load_adapter_checkpoint(model, path)."
            )

    def before_fit(self) -> None:
        self._check_the_checkpoint_has_its_adapter()

    before_validate = before_test = before_predict = before_fit


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``lightning-peft`` console script (offline: no model hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # `--model mymodule.MyLit` for a module in the working directory, as `python -m` would find it; appended, so a
    # file there cannot shadow an installed package
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    import lightning_peft.tasks  # noqa: F401  (registers the task classes for short class_path names)

    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "export":
        export_main(argv[1:])
        return
    if argv and argv[0] == "bench":
        bench_main(argv[1:])
        return
    PEFTCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"epilog": _COMMANDS},
        args=args,
    )


_BENCHES = {
    "speed": ("speed", "trainable parameters, memory and step time of methods side by side (and HF PEFT's)"),
    "quality": ("quality", "dev accuracy of methods on a GLUE task (SST-2, MRPC, RTE, CoLA), several seeds"),
    "saved-bytes": ("saved_bytes", "bytes saved for backward per token, ours and HF PEFT's"),
    "precision": ("precision", "LoRA over bf16, int8 and NF4 bases: memory, speed, agreement"),
    "inference": ("inference", "inference overhead of unmerged adapters"),
}

_COMMANDS = (
    "More sub-commands: export (a checkpoint's adapter in Hugging Face PEFT's format, or a merged model: lightning-peft "
    "export --help); bench (side-by-side measurements: speed, quality, saved-bytes, precision, inference: lightning-peft "
    "bench --help)."
)


def bench_main(args: list[str]) -> None:
    """``lightning-peft bench speed|quality|saved-bytes|precision|inference ...``: the side-by-side measurements in ``lightning_peft.bench``."""
    if not args or args[0] not in _BENCHES:
        names = "|".join(_BENCHES)
        listed = "\n".join(f"  {name:<13} {what}" for name, (_, what) in _BENCHES.items())
        asked = bool(args) and args[0] in ("-h", "--help")
        unknown = "" if asked or not args else f"lightning-peft bench: unknown benchmark {args[0]!r}\n"
        print(f"{unknown}usage: lightning-peft bench {{{names}}} [--help]\n\nbenchmarks:\n{listed}", file=sys.stdout if asked else sys.stderr)
        raise SystemExit(0 if asked else 2)
    importlib.import_module(f"lightning_peft.bench.{_BENCHES[args[0]][0]}").main(args[1:])


def _find_run_config(ckpt_path: Path) -> Path:
    """The ``config.yaml`` LightningCLI saved for the run that wrote ``ckpt_path`` (its log directory)."""
    for folder in [ckpt_path.parent, *list(ckpt_path.parents)[1:3]]:
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise FileNotFoundError(
        f"No config.yaml found beside {ckpt_path} or in its two parent folders (LightningCLI saves one in the run's log "
        "directory). Pass the run's config with --config."
    )


def _build_model(config_path: Path) -> Any:
    import yaml
    from lightning.pytorch import LightningModule

    config = yaml.safe_load(config_path.read_text()) or {}
    spec = config.get("model")
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"{config_path} has no model.class_path: pass the config of a `lightning-peft fit` run.")
    class_path = spec["class_path"]
    if not isinstance(class_path, str) or not class_path:
        raise ValueError(f"{config_path}: model.class_path must be a class name, found {class_path!r}.")
    if "." not in class_path:
        class_path = f"lightning_peft.tasks.{class_path}"
    module_name, _, cls_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{config_path}: model.class_path {class_path} cannot be found ({err}).") from None
    # checked before anything is called: a config must not be able to run an arbitrary callable
    if not (inspect.isclass(cls) and issubclass(cls, LightningModule)):
        raise TypeError(
            f"{config_path}: model.class_path {class_path} is not a LightningModule subclass ({type(cls).__name__}); "
            "nothing was called. Pass the config.yaml of a `lightning-peft fit` run with --config."
        )
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise ValueError(f"{config_path}: model.init_args must be a mapping, found {type(init_args).__name__}.")
    if init_args.get("from_config") is True:
        # a base with random weights: rebuilt only from the run's seed, as LightningCLI seeded before building it
        seed = config.get("seed_everything")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(
                f"{config_path}: the model was built with from_config=True (random weights) and the run has no integer "
                f"seed_everything (found {seed!r}), so its base cannot be rebuilt: an export would hold other weights than "
                "training used. Train with seed_everything: <int> (or from a saved model directory, from_config: false)."
            )
        from lightning.fabric.utilities.seed import seed_everything

        seed_everything(seed, verbose=False)
    model = cls(**init_args)
    model.configure_model()
    return model


def export_main(args: list[str]) -> Path:
    """``lightning-peft export``: a Lightning checkpoint's adapter to Hugging Face PEFT's format, or a merged model."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="lightning-peft export",
        description="Write the adapter of a lightning-peft checkpoint in Hugging Face PEFT's format (adapter_config.json + "
        "adapter_model.safetensors), or with --merged a plain Hugging Face model with the adapter merged into it.",
    )
    parser.add_argument("--ckpt_path", type=str, required=True, help="Lightning checkpoint written during a lightning-peft run (a file, or the directory a sharding strategy writes).")
    parser.add_argument("--out", type=str, required=True, help="Output directory.")
    parser.add_argument("--config", type=Optional[str], default=None, help="The run's config (default: the config.yaml LightningCLI saved beside the checkpoint).")
    parser.add_argument("--merged", type=bool, default=False, help="Merge the adapter and save a plain Hugging Face model (save_pretrained) with its tokenizer.")
    cfg = parser.parse_args(args)

    from lightning_peft.callbacks.base import load_adapter_checkpoint, read_checkpoint, read_checkpoint_directory
    from lightning_peft.core import unload
    from lightning_peft.io import find_base_model, save_adapter

    ckpt = Path(cfg.ckpt_path)
    if not ckpt.exists():
        raise FileNotFoundError(f"Checkpoint {ckpt} does not exist.")
    # weights_only: a checkpoint cannot run code; read before building anything (a directory: written by FSDP/DeepSpeed)
    checkpoint = read_checkpoint_directory(ckpt) if ckpt.is_dir() else read_checkpoint(ckpt)
    config_path = Path(cfg.config) if cfg.config else _find_run_config(ckpt)
    print(f"model built from {config_path}")
    model = _build_model(config_path)
    load_adapter_checkpoint(model, checkpoint)
    out = Path(cfg.out)
    if not cfg.merged:
        save_adapter(model, out)
        print(f"adapter written to {out} (Hugging Face PEFT format)")
        return out
    _, base = find_base_model(model)
    if not hasattr(base, "save_pretrained"):
        raise TypeError(f"--merged needs a Hugging Face model inside {type(model).__name__}; found none.")
    unload(base, merge=True)
    base.save_pretrained(out)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    print(f"merged model written to {out} (transformers save_pretrained)")
    return out


if __name__ == "__main__":
    main()
