"""Strict JSON for every file and `--json` output: NaN and infinity are written as null."""

from __future__ import annotations

import json
import math
from typing import Any


def json_safe(value: Any) -> Any:
    """The value with every non-finite float (at any depth) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def json_text(data: Any) -> str:
    """Strict JSON (NaN and infinity as null), indented, with a final newline."""
    return (
        json.dumps(json_safe(data), indent=2, default=str, allow_nan=False, ensure_ascii=False)
        + "\n"
    )
