"""Strict checks of typed arguments: a string is not a bool, ``inf`` is not a scale.

The callbacks' ``__init__`` arguments are typed (LightningCLI turns them into YAML and ``--help``), but a Python
caller can pass anything: ``LoRA(use_rslora="no")`` is truthy and turned rsLoRA on. :func:`check_arguments` holds
every argument to its annotation, strictly:

* ``bool``: ``True`` / ``False`` only (not ``"false"``, not ``0``);
* ``int``: an integer, not a bool;
* ``float``: a finite real number (an integer is fine), not a bool, not ``inf`` / ``nan``;
* ``str`` (a string or a ``pathlib.Path``), ``Literal[...]``, ``Optional[...]`` / ``Union[...]``, ``list[...]`` / ``Sequence[...]`` (a list or tuple
  whose items match), ``dict[K, V]``; anything else (``Any``, classes) is not checked here.

Nothing here imports Lightning or transformers.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import math
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, Callable, Literal, Union

__all__ = ["check_arguments", "check_value", "check_values", "strict_init"]

_UNCHECKED = object()


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is bool:
        return "True or False"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a finite number"
    if tp is str:
        return "a string"
    if tp is type(None):
        return "None"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple, collections.abc.Sequence):
        args = typing.get_args(tp)
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin in (dict, collections.abc.Mapping):
        args = typing.get_args(tp)
        return f"a mapping of {_plural(args[0])} to {_plural(args[1])}" if args else "a mapping"
    return getattr(tp, "__name__", str(tp))


def _plural(tp: Any) -> str:
    names = {str: "strings", int: "integers", float: "finite numbers", bool: "bools"}
    return names.get(tp, f"({_describe(tp)})")


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` satisfies ``tp`` strictly; types this module does not know are accepted."""
    if tp is Any or tp is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(tp)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, (str, os.PathLike))  # a path is as good as its string
    if tp is type(None):
        return value is None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(tp)
        item = args[0] if args else None
        return item is None or all(_matches(v, item) for v in value)
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            return False
        args = typing.get_args(tp)
        return not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    return True


def check_value(owner: str, name: str, value: Any, tp: Any) -> None:
    """Raise ``TypeError`` (``ValueError`` for a non-finite number) when ``value`` does not satisfy ``tp``."""
    if _matches(value, tp):
        return
    if isinstance(value, float) and not math.isfinite(value):
        expected = _describe(tp)
        raise ValueError(f"{owner}: {name}={value!r} is not a finite number" + ("." if expected == "a finite number" else f" (it must be {expected})."))
    hint = ""
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off", "0", "1"):
        hint = f" (the string {value!r} is not a bool: write {value.strip().lower() in ('true', 'yes', 'on', '1')} without quotes)"
    raise TypeError(f"{owner}: {name}={value!r} ({type(value).__name__}) must be {_describe(tp)}{hint}.")


def check_arguments(fn: Callable[..., Any], owner: str, bound: inspect.BoundArguments) -> None:
    """Check every bound argument of ``fn`` against its annotation (see the module docstring)."""
    check_values(fn, owner, bound.arguments)


def check_values(fn: Callable[..., Any], owner: str, values: Mapping[str, Any]) -> None:
    """Check each ``name: value`` of ``values`` against the annotation of ``fn``'s argument of that name."""
    hints = typing.get_type_hints(fn)
    for name, value in values.items():
        if name in hints and name not in ("self", "cls"):
            check_value(owner, name, value, hints[name])


def strict_init(cls: type) -> type:
    """Wrap ``cls.__init__`` (if the class defines one) so that its arguments are checked when it has run (its own,
    more specific checks come first); the new object is then never returned with a mistyped argument. The signature
    is kept (``functools.wraps``), so LightningCLI and ``inspect.signature`` see the original one."""
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "_strict", False):
        return cls
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        # the class's own checks first (their messages know the method); then every argument against its type, so a
        # value the class would coerce silently (bool("no") is True) is refused before the object is used
        init(self, *args, **kwargs)
        check_arguments(init, type(self).__name__, bound)

    __init__._strict = True  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls
