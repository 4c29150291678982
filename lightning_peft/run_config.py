"""Run configs: the configs shipped in the package, how a config's relative input paths resolve, and rebuilding a
run's model from its config (``export``, ``generate``, ``chat``). Used by the CLI and the generation commands;
imports nothing of theirs."""

from __future__ import annotations

import importlib
import inspect
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

__all__ = [
    "CONFIG_INPUT_KEYS", "SHIPPED_CONFIGS", "build_model", "find_run_config", "resolve_config_arg", "resolve_config_paths",
    "shipped_configs",
]

#: The folder of the configs shipped in the package (``lightning-peft fit --config quickstart``).
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"
#: The ``init_args`` keys of ``model`` and ``data`` that name inputs: relative values are read from the config's folder.
CONFIG_INPUT_KEYS = (
    "model_name_or_path", "tokenizer_name_or_path", "train_file", "val_file", "test_file", "predict_file", "chat_template", "data_dir",
)


def shipped_configs() -> list[str]:
    """The names of the configs shipped in ``lightning_peft/configs`` (``quickstart``, ``lora_causal_lm``, ...)."""
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def resolve_config_arg(value: str) -> str:
    """The file a ``--config`` value stands for: a shipped config's path for a bare name, else ``value`` unchanged.

    A bare name (``quickstart`` or ``quickstart.yaml``: no path separator, and no such file in the working directory)
    is ``lightning_peft/configs/<name>.yaml``. Paths, existing files and inline YAML (which jsonargparse also accepts
    for ``--config``) pass through.

    Raises:
        ValueError: For a bare name that is neither a file here nor a shipped config; the message lists the shipped ones.
    """
    if not re.fullmatch(r"[\w.-]+", value) or Path(value).is_file():
        return value
    shipped = SHIPPED_CONFIGS / (value if value.endswith(".yaml") else f"{value}.yaml")
    if shipped.is_file():
        return str(shipped)
    raise ValueError(
        f"--config {value!r}: there is no file of that name in the working directory ({os.getcwd()}) and no shipped "
        f"config of that name. Shipped configs: {', '.join(shipped_configs())} (`lightning-peft configs` says what each "
        "trains). Pass one of those names or the path of a YAML file."
    )


def resolve_config_paths(init_args: Mapping[str, Any], config_dir: Union[str, Path]) -> dict[str, Any]:
    """``init_args`` with each relative input path that exists in ``config_dir`` made absolute against it.

    The rule of ``lightning-peft`` configs, for the keys in :data:`CONFIG_INPUT_KEYS`: a relative string value that
    names an existing file or folder relative to ``config_dir`` (the config file's folder) becomes that absolute path;
    any other value (absolute, ``~/...``, an alias such as ``all-MiniLM-L6-v2``, a path that exists only relative to the
    working directory) is kept as written. Other keys (outputs such as ``save_dir``) are never changed.

    Example::

        resolve_config_paths({"train_file": "../data/train.tsv", "model_name_or_path": "all-MiniLM-L6-v2"}, "/x/configs")
        # {"train_file": "/x/data/train.tsv", "model_name_or_path": "all-MiniLM-L6-v2"}   (if /x/data/train.tsv exists)
    """
    config_dir = Path(config_dir)
    resolved = dict(init_args)
    for key in CONFIG_INPUT_KEYS:
        value = resolved.get(key)
        if not isinstance(value, str) or not value or value.startswith("~") or Path(value).is_absolute():
            continue
        candidate = config_dir / value
        if not candidate.exists():
            continue
        # `..` is followed as the file system does (through a symlinked config folder, as the repository's
        # configs -> lightning_peft/configs), but the last part is kept as named: a data file that is a symlink
        # (Hugging Face's cache) keeps its name and extension
        name = candidate.name
        if name in ("", ".", ".."):
            resolved[key] = os.path.realpath(candidate)
        else:
            resolved[key] = os.path.join(os.path.realpath(candidate.parent), name)
    return resolved


def find_run_config(ckpt_path: Path) -> Path:
    """The ``config.yaml`` LightningCLI saved for the run that wrote ``ckpt_path`` (its log directory)."""
    for folder in [ckpt_path.parent, *list(ckpt_path.parents)[1:3]]:
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise FileNotFoundError(
        f"No config.yaml found beside {ckpt_path} or in its two parent folders (LightningCLI saves one in the run's log "
        "directory). Pass the run's config with --config."
    )


def build_model(config_path: Path) -> Any:
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
    init_args = resolve_config_paths(init_args, config_path.resolve().parent)  # a training config read from anywhere
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
