"""Typed transform parameters: a default, help text and the values allowed, checked in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from core.errors import CompoundError


@dataclass(frozen=True)
class Param:
    """One typed parameter: its default, help text and allowed values."""

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: `low` itself is not allowed
    high_open: bool = False
    nullable: bool = False  # None is a valid value
    choices: tuple[Any, ...] | None = None

    @property
    def type_name(self) -> str:
        return self.type.__name__ + (" | None" if self.nullable else "")

    def range_text(self) -> str | None:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.low is None and self.high is None:
            return None
        left = "-inf" if self.low is None else f"{self.low:g}"
        right = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{left}, {right}" + (
            ")" if self.high_open or self.high is None else "]"
        )

    def validate(self, owner: str, value: Any) -> Any:
        """The value, converted where harmless (int → float); CompoundError when it is wrong."""
        where = f"transform {owner}: parameter {self.name!r}"
        if value is None:
            if self.nullable:
                return None
            raise CompoundError(f"{where} must be {self.type_name}, got None")
        value = self._coerce(where, value)
        if self.choices is not None and value not in self.choices:
            raise CompoundError(f"{where} must be {self.range_text()}, got {value!r}")
        if not self._in_range(value):
            raise CompoundError(f"{where} must be in {self.range_text()}, got {value!r}")
        return value

    def _coerce(self, where: str, value: Any) -> Any:
        # bool is an int subclass: True must not pass as 1, nor 1 as True.
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise CompoundError(f"{where} must be a finite number, got {value!r}")
        if isinstance(value, bool) != (self.type is bool) or not isinstance(value, self.type):
            raise CompoundError(
                f"{where} must be {self.type_name}, got {type(value).__name__} {value!r}"
            )
        return value

    def _in_range(self, value: Any) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (
            value > self.high or (self.high_open and value == self.high)
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type_name,
            "default": self.default,
            "help": self.help,
            "range": self.range_text(),
        }
