"""How the dashboard writes amounts and times: integers only, UTC only."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jinja2

_SIGNED = re.compile(r"-?[0-9]{1,78}")


def whole_units(value: int, decimals: int) -> str:
    """``value`` base units as whole units with ``decimals`` places, trailing zeros dropped."""
    sign = "-" if value < 0 else ""
    units, fraction = divmod(abs(value), 10**decimals)
    digits = f"{fraction:0{decimals}d}".rstrip("0") if decimals else ""
    return f"{sign}{units}.{digits}" if digits else f"{sign}{units}"


def _integer(value: int | str) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _SIGNED.fullmatch(value):
        return int(value)
    return None


def utc(moment: datetime | None) -> str:
    """``2026-11-23 16:45:23 UTC``, whatever zone the database session answered in."""
    if moment is None:
        return "—"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(seconds: int) -> str:
    """A short age: ``45s``, ``12m 03s``, ``3h 07m``, ``2d 04h``."""
    seconds = max(seconds, 0)
    minutes, secs = divmod(seconds, 60)
    hours, mins = divmod(minutes, 60)
    days, hrs = divmod(hours, 24)
    if days:
        return f"{days}d {hrs:02d}h"
    if hours:
        return f"{hours}h {mins:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def since(moment: datetime, now: datetime) -> str:
    """How long ago ``moment`` was, seen from ``now``."""
    return duration((now - moment) // timedelta(seconds=1))


def environment(directory: Path, decimals: Mapping[str, int]) -> jinja2.Environment:
    """The templates' environment: escaping on, undefined names an error, our filters."""

    def whole(value: int | str, currency: str | None) -> str:
        """The amount in whole units when OES_CURRENCY_DECIMALS knows the currency, else ""."""
        places = decimals.get(currency or "")
        number = _integer(value)
        if places is None or number is None:
            return ""
        return whole_units(number, places)

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(whole=whole, utc=utc, duration=duration)
    env.globals.update(since=since)
    return env
