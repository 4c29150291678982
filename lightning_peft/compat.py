"""The one place that knows how a Hugging Face model takes its key/value cache.

transformers 5.24 renamed the models' ``past_key_values`` forward argument (and output field) to ``cache``; the
old name survives for a while as a deprecated alias inside ``**kwargs``. Every soft-prompt path (prompt tuning at
prefill only, key/value prefixes, gated prefixes, generation) asks this module instead of spelling either name, and
the answer is read from the forward's own signature (``inspect.signature`` follows the decorators' ``__wrapped__``),
never from a version string: a model class keeps working whichever name its forward uses.

Nothing here imports transformers.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

__all__ = ["CACHE_ARG_NAMES", "cache_arg", "get_cache", "output_cache", "set_cache", "signature_names"]

#: The names a forward has taken its key/value cache under, newest first.
CACHE_ARG_NAMES: tuple[str, ...] = ("cache", "past_key_values")


def signature_names(fn: Callable[..., Any]) -> list[str]:
    """The parameter names of ``fn`` (a bound method or function), in order."""
    return list(inspect.signature(fn).parameters)


def cache_arg(fn_or_names: Any) -> Optional[str]:
    """The name under which a forward takes its key/value cache: ``"cache"`` (transformers >= 5.24),
    ``"past_key_values"`` (before), or None when it takes none.

    Args:
        fn_or_names: a forward (function or bound method) or the list of its parameter names.
    """
    names = fn_or_names if isinstance(fn_or_names, (list, tuple)) else signature_names(fn_or_names)
    for name in CACHE_ARG_NAMES:
        if name in names:
            return name
    return None


def get_cache(kwargs: dict[str, Any]) -> Any:
    """The cache passed in ``kwargs`` under either name (None if none)."""
    for name in CACHE_ARG_NAMES:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def set_cache(kwargs: dict[str, Any], cache: Any, name: str) -> None:
    """Put ``cache`` into ``kwargs`` under ``name`` (the forward's own name) and drop the other spelling, so a
    deprecated alias given by the caller cannot override it."""
    for other in CACHE_ARG_NAMES:
        if other != name:
            kwargs.pop(other, None)
    kwargs[name] = cache


def output_cache(outputs: Any) -> Any:
    """The cache a model returned: ``outputs.cache`` (transformers >= 5.24) or ``outputs.past_key_values``."""
    for name in CACHE_ARG_NAMES:
        value = getattr(outputs, name, None)
        if value is not None:
            return value
    return None
