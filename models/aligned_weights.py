"""Page-aligned safetensors: every tensor's bytes start on a page boundary.

transformers loads a safetensors file as views of one memory mapping. In an ordinary file,
tensors sit back to back at 8-byte offsets, so one page can hold the end of one tensor and the
start of the next: faulting one in reads part of its neighbour. Here every tensor starts on a
4 KiB page (the header is padded with spaces, as the format allows, and the gaps between
tensors are filled by `__pad__.N` byte tensors, because the format allows no holes). Each
tensor owns its pages, so it can be paged in, advised or evicted alone, and the file still
loads with any safetensors reader.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

PAGE = mmap.PAGESIZE
PAD_PREFIX = "__pad__."
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _layout(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict], list[tuple[int, str]]]:
    """Header entries with page-aligned offsets, pads included, and where each tensor goes."""
    entries: dict[str, dict] = {}
    placed: list[tuple[int, str]] = []
    offset = 0
    for name in sorted(tensors):
        start = _round_up(offset, PAGE)
        if start > offset:
            entries[f"{PAD_PREFIX}{len(placed)}"] = {
                "dtype": "U8",
                "shape": [start - offset],
                "data_offsets": [offset, start],
            }
        tensor = tensors[name]
        end = start + tensor.numel() * tensor.element_size()
        entries[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [start, end],
        }
        placed.append((start, name))
        offset = end
    return entries, placed


def write_aligned(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write `tensors` (CPU) as a page-aligned safetensors file, atomically."""
    entries, placed = _layout(tensors)
    header = json.dumps({"__metadata__": {"format": "pt", "alignment": str(PAGE)}, **entries})
    header_bytes = header.encode()
    # The data starts right after the 8-byte length and the header: pad to a page.
    padded = _round_up(8 + len(header_bytes), PAGE) - 8
    header_bytes += b" " * (padded - len(header_bytes))
    staging = path.with_name(f".{path.name}.pid{os.getpid()}")
    with open(staging, "wb") as out:
        out.write(struct.pack("<Q", len(header_bytes)))
        out.write(header_bytes)
        data_start = out.tell()
        for start, name in placed:
            out.seek(data_start + start)
            out.write(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
        out.truncate(out.tell())
    os.replace(staging, path)


def data_offsets(path: Path) -> dict[str, int]:
    """Each tensor's absolute byte offset in the file (pads left out)."""
    with open(path, "rb") as source:
        (length,) = struct.unpack("<Q", source.read(8))
        header = json.loads(source.read(length))
    start = 8 + length
    return {
        name: start + entry["data_offsets"][0]
        for name, entry in header.items()
        if name != "__metadata__" and not name.startswith(PAD_PREFIX)
    }


def read_tensors(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (pads left out), floats cast to `dtype` if given."""
    tensors = {}
    with safe_open(path, framework="pt") as source:
        for name in source.keys():  # noqa: SIM118 (safe_open has no __iter__)
            if name.startswith(PAD_PREFIX):
                continue
            tensor = source.get_tensor(name)
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            tensors[name] = tensor
    return tensors


def _source_digest(weights: Path, dtype: torch.dtype) -> str:
    """What the aligned copy depends on: the file's path, size and modification time, and
    the dtype it is written in."""
    import hashlib

    status = weights.stat()
    key = f"{weights.resolve()}:{status.st_size}:{status.st_mtime_ns}:{dtype}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def ensure_aligned(directory: Path, dtype: torch.dtype, root: Path) -> Path:
    """A directory under `root` holding `directory`'s weights page-aligned, in `dtype`, beside
    a copy of its config (written once, reused while the source file is unchanged)."""
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"{directory} has no single model.safetensors (sharded or missing weights)"
        )
    name = str(dtype).removeprefix("torch.")
    target = root / f"{directory.name}-{name}-{_source_digest(weights, dtype)}"
    if (target / "model.safetensors").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{target.name}.pid{os.getpid()}"
    staging.mkdir(exist_ok=True)
    write_aligned(read_tensors(weights, dtype), staging / "model.safetensors")
    for extra in ("config.json", "generation_config.json"):
        if (directory / extra).is_file():
            (staging / extra).write_bytes((directory / extra).read_bytes())
    os.replace(staging, target)
    return target
