"""Declared types and ranges of settings, checked the same way at every entry point.

A numeric dataclass field declares its range with ``ranged`` (``lr: float = ranged(1e-5,
gt=0, le=1)``); ``check_fields`` checks a whole dataclass (every float must be finite, ranged
fields must lie in their range) and ``coerce`` turns a value read from TOML, YAML, JSON or
``--set`` into the field's type. Command-line flags take ``number(int, ge=1)`` as their argparse
type. Each refusal is one line naming the key (or flag), the value and what would be accepted.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from types import UnionType
from typing import Any

from ccalign.errors import shorten

#: seeds and other integers a setting stores: torch takes seeds below 2**63
MAX_SEED = 2**63 - 1
#: CPU threads a --threads flag may ask for
MAX_THREADS = 4096


@dataclass(frozen=True)
class Range:
    """An interval of numbers; an open end excludes its bound, ``None`` leaves a side unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        """``>= 1``, ``> 0``, ``in [0, 1)``, ``at most 10``: as a message says it."""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_show(self.low)}, {_show(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_show(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_show(self.high)}"
        return "a finite number"


def _show(bound: float) -> str:
    """A bound as a person writes it: 0.5, 1e+09, 100,000, 2**24, 2**63 - 1."""
    if isinstance(bound, int) and bound > 1_000_000:
        for power, rest in ((bound.bit_length() - 1, ""), (bound.bit_length(), " - 1")):
            if 2**power - (1 if rest else 0) == bound:
                return f"2**{power}{rest}"
    if isinstance(bound, int) and abs(bound) >= 100_000:
        return f"{bound:,}"
    return f"{bound:g}"


def bounds(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Range:
    """The range ``ge``/``gt`` .. ``le``/``lt`` (one bound per side at most)."""
    if (ge is not None and gt is not None) or (le is not None and lt is not None):
        raise TypeError("give one lower bound (ge or gt) and one upper bound (le or lt)")
    return Range(
        low=gt if gt is not None else ge,
        high=lt if lt is not None else le,
        low_open=gt is not None,
        high_open=lt is not None,
    )


def ranged(
    default: Any = dataclasses.MISSING, *, ge=None, gt=None, le=None, lt=None, **field_options: Any
) -> Any:
    """A dataclass field whose numbers (a number, or each item of a tuple or list) must lie in
    the declared range."""
    metadata = {"range": bounds(ge=ge, gt=gt, le=le, lt=lt)}
    return dataclasses.field(default=default, metadata=metadata, **field_options)


def check_number(key: str, value: Any, declared: Range | None = None) -> None:
    """Refuse a non-finite float, or a number outside ``declared``, naming ``key``."""
    refusal = _refusal(value, declared)
    if refusal:
        raise ValueError(f"{key} {refusal}")


def _refusal(value: Any, declared: Range | None) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if declared is not None and not declared.allows(value):
        return f"must be {declared.describe()}, got {shorten(value)}"
    return None


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check every number of the dataclass ``obj`` (nested dataclasses, tuples and lists too)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{prefix}{f.name}.")
        else:
            _check_value(prefix + f.name, value, f.metadata.get("range"))


def _check_value(key: str, value: Any, declared: Range | None) -> None:
    """A field's value: a number, or each number of a tuple or list."""
    for item in value if isinstance(value, tuple | list) else (value,):
        check_number(key, item, declared)


def declared_range(cls: type, name: str) -> Range | None:
    """The range the dataclass ``cls`` declares for its field ``name``."""
    return next(f.metadata.get("range") for f in dataclasses.fields(cls) if f.name == name)


# ---- values from files and --set, as the field's type ----


def coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` (ints widen to floats, lists become tuples, tables become
    their dataclass); a wrong type is refused naming key and value."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, UnionType) else ()
    if options:  # X | None: None from a dict (TOML has no null), else an X
        if value is None:
            return None
        hint = next(o for o in options if o is not type(None))
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return build_table(key, value, hint)
    if origin is list and isinstance(value, list):
        return [coerce(key, v, typing.get_args(hint)[0]) for v in value]
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if origin is tuple and isinstance(value, list | tuple):
        items = typing.get_args(hint)
        if len(items) == 2 and items[1] is Ellipsis:
            return tuple(coerce(key, v, items[0]) for v in value)
        if len(value) == len(items):
            return tuple(coerce(key, v, t) for v, t in zip(value, items, strict=True))
    elif isinstance(value, origin or hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ValueError(
        f"{key} = {shorten(repr(value))} must be {_type_name(hint)}, not {type(value).__name__}"
    )


def build_table(key: str, values: dict, table_type: type) -> Any:
    """A table as its dataclass: unknown keys refused by name, each value coerced to its type
    and its numbers checked against the field's range, named with ``key`` as prefix (before the
    dataclass's own checks, which do not know the prefix). Defaults are the dataclass's."""
    ranges = {f.name: f.metadata.get("range") for f in dataclasses.fields(table_type) if f.init}
    unknown = sorted(set(values) - set(ranges))
    if unknown:
        where = f"[{key}]" if key else table_type.__name__
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(ranges)}")
    hints = typing.get_type_hints(table_type)
    prefix = f"{key}." if key else ""
    typed = {k: coerce(prefix + k, v, hints[k]) for k, v in values.items()}
    for name, value in typed.items():
        _check_value(prefix + name, value, ranges[name])
    return table_type(**typed)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        items = typing.get_args(hint)
        size = "" if len(items) == 2 and items[1] is Ellipsis else f"{len(items)} "
        return f"a list of {size}numbers"
    if typing.get_origin(hint) is list:
        return "a list of strings"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    table = hint is dict or dataclasses.is_dataclass(hint)
    return names.get(hint, "a table {...}" if table else str(hint))


# ---- command-line flags ----


def number(
    kind: type, *, ge=None, gt=None, le=None, lt=None, within: Range | None = None
) -> Callable[[str], Any]:
    """An argparse ``type`` reading an ``int`` or ``float`` in a range (the bounds, or
    ``within``: a field's declared range, for a flag that sets that field); its refusals are
    argparse's one-line usage errors (exit code 2). The range is ``.range`` for tests."""
    declared = within or bounds(ge=ge, gt=gt, le=le, lt=lt)

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(
                f"expected {_type_name(kind)}, got {shorten(repr(text))}"
            ) from None
        refusal = _refusal(value, declared)
        if refusal:
            raise argparse.ArgumentTypeError(refusal)
        return value

    parse.__name__ = kind.__name__
    parse.range = declared  # type: ignore[attr-defined]
    return parse


def numbers(
    kind: type, *, ge=None, gt=None, le=None, lt=None, within: Range | None = None
) -> Callable[[str], tuple]:
    """An argparse ``type`` for a comma-separated list of numbers, each in the range."""
    one = number(kind, ge=ge, gt=gt, le=le, lt=lt, within=within)

    def parse(text: str) -> tuple:
        items = [part.strip() for part in text.split(",") if part.strip()]
        if not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list, got {shorten(repr(text))}"
            )
        return tuple(one(item) for item in items)

    parse.__name__ = f"list of {kind.__name__}"
    parse.range = one.range  # type: ignore[attr-defined]
    return parse
