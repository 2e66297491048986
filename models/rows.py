"""One way to turn a database row into a frozen record: by field name, converting by type."""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy import Row

R = TypeVar("R")


Converters = tuple[tuple[str, Callable[[Any], Any] | None], ...]
_known: dict[type[Any], Converters] = {}


def _converters(cls: type[Any]) -> Converters:
    """Per field of ``cls``: its name and how a column value becomes the field's type."""
    if cls in _known:
        return _known[cls]
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, Callable[[Any], Any] | None]] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        convert: Callable[[Any], Any] | None = None
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            convert = hint
        elif hint is int:
            # NUMERIC(78,0) arrives as Decimal; amounts are int end to end.
            convert = _integer
        out.append((f.name, convert))
    _known[cls] = tuple(out)
    return _known[cls]


def _integer(value: Any) -> int:
    if isinstance(value, Decimal):
        if value != value.to_integral_value():
            raise ValueError(f"{value} is not a whole number")
        return int(value)
    return int(value)


def as_record(cls: type[R], row: Row[Any] | Mapping[str, Any], **columns: str) -> R:
    """``cls`` from ``row``: each field from the column of its name, or ``columns[field]``."""
    mapping: Mapping[str, Any] = row._mapping if isinstance(row, Row) else row  # type: ignore[assignment]
    values = {}
    for name, convert in _converters(cls):
        value = mapping[columns.get(name, name)]
        values[name] = value if convert is None or value is None else convert(value)
    return cls(**values)
