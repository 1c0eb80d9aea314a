"""What a transform needs from the machine and the model, and why it is unmet here."""

from __future__ import annotations

import importlib.metadata
import re

from packaging.version import InvalidVersion, Version

from models.bundle import ModelBundle
from models.sparse_attention import flex_problem

_VERSION_REQUIREMENT = re.compile(r"^([A-Za-z0-9_.\-]+)\s*(>=|<=|==|>|<)\s*([0-9][\w.+]*)$")
_COMPARE = {
    ">=": Version.__ge__,
    "<=": Version.__le__,
    "==": Version.__eq__,
    ">": Version.__gt__,
    "<": Version.__lt__,
}


def unmet_requirement(requirement: str, bundle: ModelBundle) -> str | None:
    """Why one requirement is not met here, or None.

    Understood: "cuda" (the bundle runs on a CUDA device), "materialized" (real weights, not
    the meta device), "flex_attention" (FlexAttention compiles for the bundle's device; a
    bundle on meta runs nothing, so it passes) and "<package><op><version>", e.g. "torch>=2.5".
    """
    if requirement == "cuda":
        if bundle.device.type != "cuda":
            return f"needs a CUDA device (the model is on {bundle.device.type})"
        return None
    if requirement == "materialized":
        return None if bundle.is_materialized else "needs real weights (the model is on meta)"
    if requirement == "flex_attention":
        return flex_problem(bundle.device) if bundle.is_materialized else None
    match = _VERSION_REQUIREMENT.match(requirement)
    if match is None:
        raise ValueError(f"unknown requirement {requirement!r}")
    package, op, wanted = match.groups()
    try:
        installed = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return f"needs {requirement} ({package} is not installed)"
    try:
        if _COMPARE[op](Version(installed), Version(wanted)):
            return None
    except InvalidVersion:
        return f"needs {requirement} (cannot read installed version {installed!r})"
    return f"needs {requirement} ({package} {installed} is installed)"
