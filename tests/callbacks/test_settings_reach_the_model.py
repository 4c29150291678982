"""Every setting a method callback accepts reaches the adapter it builds (issue 22, point 9).

The bug class: a callback takes an argument, records it in ``config()``, and drops it on the way to injection (an
``_inject`` that passes a literal instead of ``self.dropout``, a keyword that never reaches the layer, ...). Nothing
fails: the model simply is not what the settings (and the checkpoint's record of them) say.

One generic test covers every method callback of ``PEFTCallback._registry`` and every argument of its typed
``__init__``: the callback is built with its defaults and with that one argument changed to a valid non-default
value, each is injected into a fresh tiny model (same seeds), then both models are put through the same short
stand-in fit (the callback's own training hooks, a few SGD steps). A fingerprint of each model must differ:

* module names and types; parameter names, shapes, values, ``requires_grad``; buffers;
* plain module attributes (``scaling``, dropout ``p``, ``schedule``, ...);
* the train-mode forward (fixed seed, so dropout masks match) right after injection;
* after the stand-in fit: parameters, optimizer groups (learning rates, members), the forward again and the
  callback's own state (AdaLoRA's allocator, Selective's unfrozen epochs).

A difference that shows only in module attributes does not count: a value stored on a layer but used by nothing
is dropped as surely as one never passed. An adapter layer (or an object the callback built, AdaLoRA's allocator)
with an attribute named like the setting must hold the setting's value: two settings swapped on the way (``beta1``
and ``beta2``, equal by default) each still change something. ``config()`` must record the changed value, and a
callback rebuilt from ``config()`` (as ``load_adapter_checkpoint`` does) must have the same ``config()``.

A few settings only mean something together with another one (``init_text`` needs ``init="text"``); ``CONTEXT``
names the other setting. Changed alone from the defaults, such a setting must be refused (``ValueError`` /
``TypeError``), or change the model: accepting it and ignoring it is the bug. Values are picked from the type
annotation and the default (``bool``: flipped, ``Literal``: another choice, numbers: another valid number);
``VALUES`` gives the rest (module names of the tiny models, optional sizes, patterns).
"""

from __future__ import annotations

import inspect
import math
import typing
from types import SimpleNamespace
from typing import Any, Literal, Union

import pytest
import torch

import lightning_peft.callbacks  # noqa: F401  (fills the registry)
from lightning_peft.callbacks.base import PEFTCallback
from tests.conftest import tiny_llama

#: arguments that do not define the adapter, so no fingerprint can (or should) show them
SKIPPED: dict[Union[str, tuple[str, str]], str] = {
    "save_dir": "says where the adapter is written at the end of fit, not what the adapter is (every callback that has it)",
    ("adalora", "log_ranks"): "logs the budget and ranks to the Trainer's loggers; not part of the adapter (not in config())",
    ("adalora", "heatmap"): "writes a picture and a JSON of the final ranks beside the checkpoints; not part of the adapter (not in config())",
    ("unipelt", "log_gates"): "logs the gates' mean values to the Trainer's loggers; not part of the adapter (not in config())",
    ("lora", "loraplus_lr_ratio"): "an optimizer setting (B's learning rate), not part of the adapter (not in config()); "
    "tests/callbacks/test_loraplus_callback.py checks the groups it makes",
}

#: the tiny model each method is injected into (Llama has no biases, so BitFit takes GPT-2)
MODELS = {"bitfit": "gpt2"}

#: a placeholder for the tokenizer directory the ``tokenizer_dir`` fixture writes
TOKENIZER_DIR = "<tokenizer dir>"

#: valid non-default values where the annotation and default do not give one (module names are the tiny models')
VALUES: dict[tuple[str, str], Any] = {
    ("lora", "init"): "pissa",
    ("adalora", "total_steps"): 10,  # the stand-in fit has 4 optimizer steps: the default takes those
    ("adalora", "target_modules"): ["q_proj", "v_proj"],
    ("adalora", "exclude_modules"): ["o_proj"],
    ("adalora", "trainable_modules"): ["lm_head"],
    ("bitfit", "biases"): ["c_attn"],
    ("bitfit", "exclude_modules"): ["c_attn"],
    ("bitfit", "trainable_modules"): ["ln_f"],
    ("houlsby", "bottleneck_size"): 4,  # default: hidden / 16 = 2
    ("houlsby", "reduction_factor"): 4.0,
    ("houlsby", "target_modules"): ["o_proj"],
    ("houlsby", "exclude_modules"): ["layers.0.mlp.down_proj"],
    ("houlsby", "trainable_modules"): ["lm_head"],
    ("ia3", "target_modules"): ["q_proj"],
    ("ia3", "feedforward_modules"): ["down_proj"],
    ("ia3", "exclude_modules"): ["layers.0.self_attn.k_proj"],
    ("ia3", "trainable_modules"): ["lm_head"],
    ("llama_adapter", "adapter_layers"): 1,  # of 2
    ("llama_adapter", "trainable_modules"): ["lm_head"],
    ("lora", "target_modules"): ["q_proj", "v_proj"],
    ("lora", "exclude_modules"): ["o_proj"],
    ("lora", "trainable_modules"): ["lm_head"],
    ("lora", "adapter_name"): "other",
    ("lora", "rank_pattern"): {"q_proj": 4},
    ("lora", "alpha_pattern"): {"q_proj": 4.0},
    ("p_tuning", "adapter_name"): "other",
    ("prefix_tuning", "adapter_name"): "other",
    ("prompt_tuning", "adapter_name"): "other",
    ("mam_adapter", "prefix_hidden_size"): 8,
    ("mam_adapter", "bottleneck_size"): 4,  # default: hidden / 2 = 16
    ("mam_adapter", "reduction_factor"): 4.0,  # not 2.0, which is the default's bottleneck
    ("mam_adapter", "ffn_target_modules"): ["layers.0.mlp"],
    ("mam_adapter", "trainable_modules"): ["lm_head"],
    ("parallel_adapter", "bottleneck_size"): 4,
    ("parallel_adapter", "reduction_factor"): 4.0,
    ("parallel_adapter", "target_modules"): ["layers.0.mlp"],
    ("parallel_adapter", "exclude_modules"): ["layers.0.mlp"],
    ("parallel_adapter", "trainable_modules"): ["lm_head"],
    ("p_tuning", "encoder_hidden_size"): 8,
    ("p_tuning", "trainable_modules"): ["lm_head"],
    ("p_tuning_v2", "trainable_modules"): ["lm_head"],
    ("prefix_tuning", "encoder_hidden_size"): 8,
    ("prefix_tuning", "trainable_modules"): ["lm_head"],
    ("prompt_tuning", "init_text"): "world",
    ("prompt_tuning", "tokenizer"): TOKENIZER_DIR,
    ("prompt_tuning", "trainable_modules"): ["lm_head"],
    ("selective", "train"): ["top:1"],
    ("selective", "unfreeze_schedule"): {1: ["embed_tokens"]},  # not blocks: the default trains both of the 2 blocks
    ("unipelt", "lora_target_modules"): ["q_proj"],
    ("unipelt", "prefix_hidden_size"): 8,
    ("unipelt", "bottleneck_size"): 4,
    ("unipelt", "reduction_factor"): 4.0,
    ("unipelt", "adapter_target_modules"): ["layers.0.mlp.down_proj"],
    ("unipelt", "trainable_modules"): ["lm_head"],
}

#: settings that act only together with another one: (the other settings, why)
CONTEXT: dict[tuple[str, str], tuple[dict[str, Any], str]] = {
    ("ia3", "feedforward_modules"): ({"target_modules": ["k_proj", "v_proj", "down_proj"]}, "a subset of explicit target_modules"),
    ("prompt_tuning", "init_text"): ({"init": "text", "init_text": "hello"}, "the text of init='text'"),
    ("prompt_tuning", "tokenizer"): ({"init": "text", "init_text": "hello"}, "tokenizes init_text for init='text'"),
    ("selective", "unfreeze_lr_factor"): ({"unfreeze_schedule": {1: ["embed_tokens"]}}, "the learning rate of the groups unfreeze_schedule adds"),
}

EPOCHS, STEPS = 2, 2  # the stand-in fit


# -- picking values ----------------------------------------------------------------------------------
def init_arguments(cls: type[PEFTCallback]) -> dict[str, tuple[Any, Any]]:
    """``{name: (annotation, default)}`` of ``cls.__init__`` (annotations resolved)."""
    hints = typing.get_type_hints(cls.__init__)
    params = inspect.signature(cls.__init__).parameters
    return {n: (hints.get(n), p.default) for n, p in params.items() if n != "self"}


def skip_reason(method: str, arg: str) -> str | None:
    return SKIPPED.get((method, arg)) or SKIPPED.get(arg)


def alternative(method: str, arg: str, annotation: Any, default: Any) -> Any:
    """A valid value of ``arg`` other than ``default``: from ``VALUES``, else from the annotation and the default."""
    if (method, arg) in VALUES:
        return VALUES[(method, arg)]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(default, bool):
        return not default
    if origin is Literal:
        return next(c for c in args if c != default)
    if origin is list and args and typing.get_origin(args[0]) is Literal and isinstance(default, list):
        others = [c for c in typing.get_args(args[0]) if c not in default]
        return others[:1] or default[:1]
    if isinstance(default, int):  # int, or Union[int, float] with an int default (steps)
        return default + 1
    if isinstance(default, float):  # 0 -> 0.25 (dropout), (0, 1) -> half (betas, factors), else double (alpha, scaling)
        return 0.25 if default == 0 else default / 2 if 0 < default < 1 else default * 2
    pytest.fail(f"{method}: no non-default value for {arg} ({annotation}, default {default!r}): add one to VALUES, or a reason to SKIPPED")


def method_callbacks() -> dict[str, type[PEFTCallback]]:
    """The registry's callbacks of this package (a test's own subclass would register too)."""
    return {m: c for m, c in sorted(PEFTCallback._registry.items()) if c.__module__.startswith("lightning_peft.callbacks.")}


def cases() -> list[tuple[str, str]]:
    return [(method, arg) for method, cls in method_callbacks().items() for arg in init_arguments(cls) if skip_reason(method, arg) is None]


# -- the fingerprint ---------------------------------------------------------------------------------
class CharTokenizer:
    """The module's own tokenizer for ``init="text"``: one id per character."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 128 for c in text]}


def make_model(method: str) -> torch.nn.Module:
    if MODELS.get(method) == "gpt2":
        from tests.methods.sst2_helpers import tiny_decoder

        model = tiny_decoder("gpt2", seed=0)
    else:
        model = tiny_llama(seed=0)
    if method == "prompt_tuning":
        model.tokenizer = CharTokenizer()
    return model


def token_ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(seed))


def _plain(value: Any) -> Any:
    """``value`` if it is plain data (numbers, strings, containers of them), else ``NotImplemented``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return NotImplemented if any(v is NotImplemented for v in items) else tuple(items)
    if isinstance(value, dict):
        items = {k: _plain(v) for k, v in value.items()}
        return NotImplemented if any(v is NotImplemented for v in items.values()) else items
    return NotImplemented


def _forward(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    model.train()
    ids = token_ids(1)
    torch.manual_seed(4321)  # the same dropout masks in both models
    out = model(input_ids=ids, labels=ids)
    return {"logits": out.logits.detach().clone(), "loss": out.loss.detach().clone()}


def _parameters(model: torch.nn.Module) -> dict[str, Any]:
    return {n: {"requires_grad": p.requires_grad, "value": p.detach().clone()} for n, p in model.named_parameters()}


def _state(value: Any) -> Any:
    """The callback's state dict with tensors cloned (plain data otherwise)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_state(v) for v in value]
    plain = _plain(value)
    return repr(value) if plain is NotImplemented else plain


def stand_in_fit(callback: PEFTCallback, model: torch.nn.Module) -> dict[str, Any]:
    """``EPOCHS`` x ``STEPS`` SGD steps through the callback's own training hooks, with a stand-in Trainer."""
    torch.manual_seed(99)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    trainer = SimpleNamespace(
        optimizers=[optimizer], lr_scheduler_configs=[], estimated_stepping_batches=EPOCHS * STEPS, max_epochs=EPOCHS,
        precision_plugin=SimpleNamespace(scaler=None), global_step=0, current_epoch=0, loggers=[], callbacks=[callback],
        is_global_zero=False,  # no files written at the end (AdaLoRA's heatmap)
    )
    model.train()
    callback.on_fit_start(trainer, model)
    callback.on_train_start(trainer, model)
    for epoch in range(EPOCHS):
        trainer.current_epoch = epoch
        callback.on_train_epoch_start(trainer, model)
        for step in range(STEPS):
            ids = token_ids(100 + trainer.global_step)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            callback.on_before_optimizer_step(trainer, model, optimizer)
            optimizer.step()
            callback.on_train_batch_end(trainer, model, {"loss": loss}, (ids,), step)
            optimizer.zero_grad(set_to_none=True)
            trainer.global_step += 1
        callback.on_train_epoch_end(trainer, model)
    # config() is checked on its own; the state before the end is what a checkpoint during the run holds
    before_end = _state({k: v for k, v in callback.state_dict().items() if k != "config"})
    callback.on_train_end(trainer, model)
    state = {k: v for k, v in callback.state_dict().items() if k != "config"}
    return {
        "parameters": _parameters(model),
        "optimizer": [{"lr": g["lr"], "params": [names.get(id(p), "?") for p in g["params"]]} for g in optimizer.param_groups],
        "forward": _forward(model),
        "callback_state_before_end": before_end,
        "callback_state": _state(state),
    }


def holders(model: torch.nn.Module, callback: PEFTCallback) -> dict[str, dict[str, Any]]:
    """``{where: plain attributes}`` of the adapter layers and of the objects the callback built (AdaLoRA's allocator)."""
    from lightning_peft.core import adapter_modules

    found = {name: vars(layer) for name, layer in adapter_modules(model)}
    for key, obj in vars(callback).items():
        if type(obj).__module__.startswith("lightning_peft.") and not isinstance(obj, torch.nn.Module) and hasattr(obj, "__dict__"):
            found[f"callback.{key}"] = vars(obj)
    return {w: {k: p for k, v in attrs.items() if not k.startswith("_") and (p := _plain(v)) is not NotImplemented} for w, attrs in found.items()}


def fingerprint(method: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any], PEFTCallback]:
    model = make_model(method)
    callback = PEFTCallback._registry[method](**kwargs)
    torch.manual_seed(1234)
    callback.inject(model)
    fp = {
        "modules": [(n, type(m).__qualname__) for n, m in model.named_modules()],
        "parameters": _parameters(model),
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "attributes": {
            f"{n}.{k}": plain
            for n, m in model.named_modules()
            for k, v in vars(m).items()
            if not k.startswith("_") and k != "training" and (plain := _plain(v)) is not NotImplemented
        },
        "forward": _forward(model),
    }
    fp["after_fit"] = stand_in_fit(callback, model)
    fp["holders"] = holders(model, callback)  # read by the name check only, not compared
    return fp, callback


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """The paths at which ``a`` and ``b`` differ (tensors: shape, dtype or any value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}" for k in sorted(set(a) ^ set(b), key=str)]
        for k in a.keys() & b.keys():
            out += differences(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [path]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [path]


_BASE: dict[tuple[str, str], dict[str, Any]] = {}


def base_fingerprint(method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    key = (method, repr(sorted(kwargs.items())))
    if key not in _BASE:
        _BASE[key] = fingerprint(method, kwargs)[0]
    return _BASE[key]


def check_reaches_the_model(method: str, arg: str, value: Any, base_kwargs: dict[str, Any]) -> None:
    base = base_fingerprint(method, base_kwargs)
    changed, callback = fingerprint(method, {**base_kwargs, arg: value})
    where = differences({k: v for k, v in base.items() if k != "holders"}, {k: v for k, v in changed.items() if k != "holders"})
    setting = f"{PEFTCallback._registry[method].__name__}({', '.join(f'{k}={v!r}' for k, v in {**base_kwargs, arg: value}.items())})"
    assert where, f"{setting}: the injected model is identical to the one without {arg}={value!r}: the setting is dropped on the way to injection"
    used = [d for d in where if not d.startswith(".attributes")]
    assert used, (
        f"{setting}: only module attributes differ ({where[:5]}); structure, parameters, trainability and outputs are "
        f"the same, so {arg} is recorded but not used"
    )
    # an adapter layer (or the callback's allocator) with an attribute of the setting's name holds the setting's value:
    # catches two settings swapped on the way (beta1 <-> beta2, both 0.85 by default), which each still change something
    wrong = {w: attrs[arg] for w, attrs in changed["holders"].items() if arg in attrs and attrs[arg] != _plain(value)}
    assert not wrong, f"{setting}: {len(wrong)} holder(s) of an attribute {arg!r} have another value, e.g. {next(iter(wrong.items()))}"
    cfg = callback.config()
    assert arg in cfg and cfg[arg] == value, f"{setting}: config() records {arg}={cfg.get(arg, '<missing>')!r}, not {value!r}"
    rebuilt = type(callback)(**{k: v for k, v in cfg.items() if k != "method"})
    assert rebuilt.config() == cfg, f"{setting}: a callback rebuilt from config() has config {rebuilt.config()}, not {cfg}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second thread only waits for the first (and is 10x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    """A word-level tokenizer directory whose ids differ from ``CharTokenizer``'s."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 5, "world": 9}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(path))
    return str(path)


@pytest.mark.filterwarnings("ignore:.*before the final allocation")  # AdaLoRA's 4-step stand-in fit ends before it
@pytest.mark.parametrize(("method", "arg"), cases(), ids=lambda x: x)
def test_setting_reaches_the_injected_model(method, arg, tokenizer_dir):
    cls = PEFTCallback._registry[method]
    annotation, default = init_arguments(cls)[arg]
    value = alternative(method, arg, annotation, default)
    if value == TOKENIZER_DIR:
        value = tokenizer_dir
    assert value != default, f"{method}.{arg}: the 'changed' value {value!r} is the default"
    if (method, arg) in CONTEXT:
        # alone, it must be refused or act; accepted and ignored is the bug
        try:
            alone, _ = fingerprint(method, {arg: value})
        except (ValueError, TypeError):
            pass
        else:
            where = [d for d in differences(base_fingerprint(method, {}), alone) if not d.startswith((".attributes", ".holders"))]
            assert where, (
                f"{cls.__name__}({arg}={value!r}) is accepted without {sorted(CONTEXT[(method, arg)][0])} but changes nothing: "
                f"it is silently ignored there (refuse it, as init_text without init='text' is)"
            )
        base_kwargs = CONTEXT[(method, arg)][0]
    else:
        base_kwargs = {}
    check_reaches_the_model(method, arg, value, base_kwargs)


def test_the_tables_name_real_arguments():
    """A stale entry (an argument renamed or removed) would hide a setting from the test above."""
    arguments = {(m, a) for m, cls in method_callbacks().items() for a in init_arguments(cls)}
    names = {a for _, a in arguments}
    stale = [k for k in [*VALUES, *CONTEXT, *(k for k in SKIPPED if isinstance(k, tuple))] if k not in arguments]
    stale += [k for k in SKIPPED if isinstance(k, str) and k not in names]
    stale += [m for m in MODELS if m not in method_callbacks()]
    assert not stale, stale
    assert len(method_callbacks()) >= 14 and cases()


def test_a_setting_that_would_be_ignored_is_refused_with_the_fix():
    from lightning_peft import PromptTuning, Selective

    with pytest.raises(ValueError, match=r"tokenizer='tok' is only used with init='text' .* Set init='text' or drop tokenizer"):
        PromptTuning(tokenizer="tok")
    with pytest.raises(ValueError, match=r"unfreeze_lr_factor=0.5 .* there is no unfreeze_schedule.* Give unfreeze_schedule"):
        Selective(unfreeze_lr_factor=0.5)


def test_the_adapter_settings_reach_the_loggers_hparams(tmp_path):
    """The settings of every injected method are logged as hyperparameters (``hparams.yaml`` beside the metrics)."""
    import lightning as L
    import yaml
    from lightning.pytorch.loggers import CSVLogger

    from lightning_peft import LoRA
    from tests.callbacks.helpers import TinyLM

    logger = CSVLogger(tmp_path, name="run")
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=logger, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[LoRA(r=4, alpha=8, target_modules=["q_proj"], rank_pattern={"q_proj": 2})],
    )
    trainer.fit(TinyLM())
    hparams = yaml.safe_load((tmp_path / "run" / "version_0" / "hparams.yaml").read_text())
    (lora,) = hparams["lightning_peft"]
    assert (lora["method"], lora["r"], lora["alpha"], lora["target_modules"], lora["rank_pattern"]) == ("lora", 4, 8.0, ["q_proj"], {"q_proj": 2})
