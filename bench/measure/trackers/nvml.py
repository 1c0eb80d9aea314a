"""NVML access shared by the energy and memory trackers and the environment record."""

from __future__ import annotations

import os
from typing import Any


def nvml_text(value: str | bytes) -> str:
    """NVML strings arrive as bytes from older pynvml releases and as str from newer ones."""
    return value.decode() if isinstance(value, bytes) else value


def nvml_handle(device_index: int) -> Any:
    """The NVML handle of torch's CUDA device `device_index`.

    NVML numbers every GPU in the machine, while torch numbers only those in
    CUDA_VISIBLE_DEVICES, so the index is translated the same way torch does.
    Raises pynvml.NVMLError (or ImportError) when NVML is unusable.
    """
    import pynvml

    pynvml.nvmlInit()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    visible = [v for v in visible if v]
    if device_index < len(visible):
        entry = visible[device_index]
        if entry.isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
        return pynvml.nvmlDeviceGetHandleByUUID(entry)
    return pynvml.nvmlDeviceGetHandleByIndex(device_index)
