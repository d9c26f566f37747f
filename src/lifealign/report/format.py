"""Text formatting shared by the report's tables: escaping, numbers, intervals, p-values, Markdown tables.

Formatting only: every number shown was computed upstream (``scores.json``, ``comparisons.json``); a missing,
``null`` or non-finite value prints as ``–`` and a missing interval is simply not shown.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "MISSING",
    "escape_markdown",
    "format_estimate",
    "format_interval",
    "format_level",
    "format_number",
    "format_p",
    "format_se",
    "interval",
    "is_number",
    "markdown_table",
]

MISSING = "–"
"""What a missing or undefined value prints as."""

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_MD_SPECIAL = re.compile(r"([|`*_\[\]#!~])")


def escape_markdown(text: Any) -> str:
    """Make arbitrary text inert inside Markdown, including table cells.

    Terminal escape sequences and control characters are removed; ``&``, ``<``, ``>`` become HTML entities (no
    raw HTML); Markdown syntax characters (``\\ | ` * _ [ ] # ! ~``) are backslash-escaped; newlines become
    ``<br>`` so a multi-line completion stays in its table cell.
    """
    s = _CONTROL.sub("", _ANSI_ESCAPE.sub("", str(text))).replace("\r\n", "\n").replace("\r", "\n")
    s = s.replace("\\", "\\\\").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = _MD_SPECIAL.sub(r"\\\1", s)
    return s.replace("\t", " ").replace("\n", "<br>")


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def format_number(value: Any, digits: int = 2) -> str:
    """``f"{value:.2f}"``; ``–`` for a missing or non-finite value."""
    if not is_number(value):
        return MISSING
    return f"{value:.{digits}f}"


def format_se(value: Any, digits: int = 2) -> str:
    """A standard error: ``digits`` decimals, or 2 significant digits when that would print ``0.00``."""
    if not is_number(value):
        return MISSING
    if abs(value) < 1e-12:  # rounding noise of a variance that is zero
        value = 0.0
    if value != 0 and abs(value) < 0.5 * 10**-digits:
        return f"{value:.2g}"
    return f"{value:.{digits}f}"


def interval(value: Any) -> tuple[float, float] | None:
    """``(lo, hi)`` from a ``[lo, hi]`` pair of finite numbers; ``None`` for anything else (absent, null, NaN)."""
    if isinstance(value, list | tuple) and len(value) == 2 and all(is_number(v) for v in value):
        return float(value[0]), float(value[1])
    return None


def format_interval(ci: Any, digits: int = 2) -> str:
    """``[lo, hi]``; empty text when ``ci`` is not a pair of finite numbers."""
    pair = interval(ci)
    return "" if pair is None else f"[{pair[0]:.{digits}f}, {pair[1]:.{digits}f}]"


def format_estimate(value: Any, ci: Any = None, digits: int = 2) -> str:
    """``-5.60 [-9.10, -2.00]``: the value and its interval; the value alone without a usable interval."""
    text = format_number(value, digits)
    bounds = format_interval(ci, digits)
    return f"{text} {bounds}" if bounds and text != MISSING else text


def format_p(p: Any) -> str:
    """A p-value: three decimals, ``<0.001`` below that; ``–`` when missing."""
    if not is_number(p):
        return MISSING
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def format_level(level: Any, default: float = 0.95) -> str:
    """``95%`` for ``0.95`` (``default`` when ``level`` is missing)."""
    value = level if is_number(level) and 0 < level < 1 else default
    return f"{100 * value:g}%"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A pipe table; the cells must already be escaped."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines
