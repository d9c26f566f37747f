"""Keyword arguments from a config, checked against a function's signature: the one way losses and plugins are bound.

A config names a component and its hyper-parameters, e.g. ``{name: ewc, lam: 1e-3}``. ``bind_kwargs`` checks that
every key is a parameter of the component's function (a loss function's keyword-only parameters, a plugin's
constructor) and converts each value to the parameter's annotation (``coerce``):

- ``float``: ints and numeric strings are accepted (PyYAML reads ``1e-3`` as the string ``"1e-3"``), booleans,
  other strings and non-finite numbers are not;
- ``int``: integers only (no booleans, no ``2.5``);
- ``bool``: ``true``/``false`` only;
- ``str`` and ``Literal[...]``: a string, one of the listed values for a ``Literal``;
- ``tuple[X, ...]`` / ``tuple[X, Y]``: a list or tuple, each element coerced (a single string is a one-element
  tuple of strings);
- ``X | None``: ``None`` or an ``X``.

Range checks stay with the component: its constructor (or function) raises ``ValueError("<param>: <problem>")`` and
the binder prefixes the key path. This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal

__all__ = [
    "KwargsError",
    "bind_kwargs",
    "check_choice",
    "check_distinct",
    "check_range",
    "coerce",
    "parameters",
    "typed",
]


class KwargsError(ValueError):
    """One or more keyword arguments are wrong; the message lists each problem as ``<path>.<key>: <problem>``."""


def parameters(fn: Callable[..., Any], keyword_only: bool = False) -> dict[str, Any]:
    """The parameters of ``fn`` (a function or a class, whose ``__init__`` is read) mapped to their resolved
    annotations (``Any`` where there is none); ``self`` and ``*args``/``**kwargs`` are left out."""
    target = fn.__init__ if inspect.isclass(fn) else fn  # type: ignore[misc]
    hints = typing.get_type_hints(target)
    kinds = (
        (inspect.Parameter.KEYWORD_ONLY,)
        if keyword_only
        else (
            inspect.Parameter.KEYWORD_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        )
    )
    params = inspect.signature(target).parameters.values()
    return {p.name: hints.get(p.name, Any) for p in params if p.kind in kinds and p.name != "self"}


def _coerce_float(value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise TypeError(f"must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(f"must be a finite number, got {value!r}")
    return float(value)


def _coerce_tuple(value: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    if isinstance(value, str) and args and args[-1] is Ellipsis:
        value = [value]
    if not isinstance(value, list | tuple):
        raise TypeError(f"must be a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(coerce(v, args[0]) for v in value)
    if args and len(value) != len(args):
        raise TypeError(f"must be a list of {len(args)} values, got {value!r}")
    return tuple(coerce(v, a) for v, a in zip(value, args)) if args else tuple(value)


def coerce(value: Any, annotation: Any) -> Any:
    """``value`` converted to ``annotation`` (see the module docstring); ``TypeError`` saying what was expected."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise TypeError(f"must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option)
            except TypeError as err:
                errors.append(str(err))
        raise TypeError(" or ".join(errors))
    if annotation is bool:
        if not isinstance(value, bool):
            raise TypeError(f"must be true or false, got {value!r}")
        return value
    if annotation is float:
        return _coerce_float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"must be an integer, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise TypeError(f"must be a string, got {value!r}")
        return value
    if origin is tuple or annotation is tuple:
        return _coerce_tuple(value, args)
    if origin is list:
        return list(_coerce_tuple(value, (args[0], Ellipsis) if args else ()))
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise TypeError(f"must be a mapping, got {value!r}")
        return value
    return value


def bind_kwargs(
    fn: Callable[..., Any], kwargs: dict[str, Any], path: str, what: str, keyword_only: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """``(coerced kwargs, problems)``: every key of ``kwargs`` checked against ``fn``'s parameters and converted.

    Each problem reads ``<path>.<key>: <problem>``; ``what`` names the component in "not a parameter of ..."."""
    params = parameters(fn, keyword_only=keyword_only)
    out: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in kwargs.items():
        if key not in params:
            accepted = ", ".join(params) or "none"
            problems.append(f"{path}.{key}: not a parameter of {what} (accepted: {accepted})")
            continue
        try:
            out[key] = coerce(value, params[key])
        except TypeError as err:
            problems.append(f"{path}.{key}: {err}")
    return out, problems


def check_range(
    key: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` if it lies in the interval, else ``ValueError("<key>: must be in ...")``."""
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{key}: must be in {left}{lo}, {hi}{right}, got {value!r}")
    return value


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``, else ``ValueError("<key>: must be one of ...")``."""
    allowed = list(choices)
    if value not in allowed:
        raise ValueError(f"{key}: must be one of {allowed}, got {value!r}")
    return value


def check_distinct(key: str, values: Iterable[Any], non_empty: bool = True) -> tuple[Any, ...]:
    """``values`` as a tuple if no value repeats (and, with ``non_empty``, there is one), else ``ValueError``."""
    out = tuple(values)
    if non_empty and not out:
        raise ValueError(f"{key}: must not be empty")
    if len(set(out)) != len(out):
        raise ValueError(f"{key}: repeated value in {list(out)}")
    return out


def typed(key: str, value: Any, annotation: Any) -> Any:
    """``coerce(value, annotation)`` with a ``ValueError("<key>: ...")`` (for objects built outside a config)."""
    try:
        return coerce(value, annotation)
    except TypeError as err:
        raise ValueError(f"{key}: {err}") from None
