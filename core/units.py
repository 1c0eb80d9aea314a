"""Unit constants and the one way a fraction is written as a percentage, in tables and text."""

from __future__ import annotations

import math

NS_PER_S = 1e9
MS_PER_S = 1e3
BYTES_PER_MIB = 2**20


def pct(
    value: float | None,
    places: int = 2,
    unit: str = "%",
    *,
    signed: bool = True,
    trim: bool = False,
) -> str:
    """A fraction as a percentage: 0.1234 → "+12.34%"; "-" when there is no value.

    `trim` drops trailing zeros (0.235 → "23.5%" with places=4, signed=False), for numbers a
    user typed, whose precision is theirs rather than a table's.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value * 100:{'+' if signed else ''}.{places}f}"
    if trim and "." in text:
        text = text.rstrip("0").rstrip(".")
    return text + unit


def interval(
    data: dict[str, float] | None, places: int = 2, unit: str = "%", separator: str = " "
) -> str:
    """A point and its CI: "+12.34% [+10.10%, +14.20%]"; "-" when there is none."""
    if not data:
        return "-"
    bounds = f"[{pct(data['lo'], places, unit)}, {pct(data['hi'], places, unit)}]"
    return f"{pct(data['point'], places, unit)}{separator}{bounds}"
