"""The value checks of the configs (QuantConfig, its stages, TrainConfig): each knows what it accepts and says so
in words, so that every error names the field and the allowed range the same way."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple


class Check(NamedTuple):
    ok: Callable[[Any], bool]
    allowed: str  # completes "<field> must be ..."
    choices: tuple | None = None


def choice(options: tuple, optional: bool = False) -> Check:
    return Check(lambda v: (optional and v is None) or v in options,
                 f"{'None or ' if optional else ''}one of {options}", options)


def integer(low: int, high: int | None = None) -> Check:
    return Check(lambda v: type(v) is int and low <= v and (high is None or v <= high),
                 f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]")


def real(low: float, high: float | None = None, *, strict: bool = False, optional: bool = False,
         closed: bool = False) -> Check:
    """A finite number >= low (> low when strict), below high when given (up to high itself when closed: a
    share such as a fraction of the data, where both ends mean something)."""
    def ok(v: Any) -> bool:
        if optional and v is None:
            return True
        real = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return real and (v > low if strict else v >= low) and (high is None or (v <= high if closed else v < high))
    text = (f"in {'(' if strict else '['}{low:g}, {high:g}{']' if closed else ')'}" if high is not None
            else f"a finite number {'>' if strict else '>='} {low:g}")
    return Check(ok, ("None or " if optional else "") + text)


def first_error(values: dict[str, Any], checks: dict[str, Check], name: Callable[[str], str] = str) -> str | None:
    """``"<name> must be <allowed>, got <value>"`` for the first of ``values`` its check refuses, else None; ``name``
    spells the field as the caller's user knows it (a CLI flag, ``--top-p`` for ``top_p``)."""
    for field, check in checks.items():
        if not check.ok(values[field]):
            return f"{name(field)} must be {check.allowed}, got {values[field]!r}"
    return None


BOOL = Check(lambda v: isinstance(v, bool), "True or False")
PATTERNS = Check(lambda v: isinstance(v, tuple) and all(isinstance(p, str) and compiles(p) for p in v),
                  "a list or tuple of regular expressions, e.g. ['mlp'] (a single string is not accepted)")


def compiles(pattern: str) -> bool:
    """Whether ``pattern`` is a valid regular expression (checked at construction, not at the first match)."""
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True
