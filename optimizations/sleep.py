"""Modality-aware vision-encoder sleep (paper 3.5): the vision weights are resident only while
an image is being encoded.

Text-only requests never run the vision tower or the projector (LLaVA encodes images only when
pixel values are given; transformers 5.x generate() even encodes them once, before prefill), so
they never wake it. An image request wakes the weights in a forward pre-hook on the tower, and
each module goes back to sleep in a forward hook right after its own forward: generate() uses
the image features it already has for prefill and every decode step.

Where the weights go while asleep (the `mode` parameter; "auto" picks the first that applies):
- cuda-pinned: a pinned host copy made once at apply; sleeping drops the device storage, waking
  copies it back (host→device). Device bytes freed: all vision weights (returned to PyTorch's
  caching allocator, so `memory_allocated` drops, `memory_reserved` need not).
- checkpoint: the storage is dropped; waking reads the tensors back from the model's
  safetensors checkpoint on disk (memory-mapped by `safe_open`). Only used after verifying the
  checkpoint holds exactly the in-memory weights. Host bytes freed: all vision weights.
- cpu-copy: for bundles without a checkpoint (built in memory): the weights are detached from
  the model but kept in host memory, so on a CPU model nothing is freed; the record says so.
While asleep each parameter has an empty (0-element) tensor of its dtype on its device, so
`bundle.device`/`bundle.dtype` still answer correctly; parameter counts see fewer elements.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from core.errors import CompoundError
from models.bundle import ModelBundle
from models.events import Events
from optimizations.base import Figure, Transform, register
from optimizations.params import Param

MODES = ("auto", "cuda-pinned", "checkpoint", "cpu-copy")


@dataclass
class _Slot:
    """One parameter that sleeps: where it lives in the model and what it looks like awake."""

    module: nn.Module
    attr: str
    name: str  # full name in the model
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    @property
    def parameter(self) -> nn.Parameter:
        return getattr(self.module, self.attr)

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * torch.empty((), dtype=self.dtype).element_size()


def _slots(bundle: ModelBundle, modules: list[nn.Module]) -> list[_Slot]:
    names = {id(p): n for n, p in bundle.model.named_parameters()}
    slots = []
    for module in modules:
        for owner in module.modules():
            for attr, parameter in owner.named_parameters(recurse=False):
                slots.append(
                    _Slot(
                        owner,
                        attr,
                        names[id(parameter)],
                        parameter.shape,
                        parameter.dtype,
                        parameter.device,
                    )
                )
    return slots


class _HostStore:
    """Weights kept in host memory while asleep (pinned when they come back to a GPU)."""

    def __init__(self, slots: list[_Slot], copy_to_pinned: bool) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        for slot in slots:
            data = slot.parameter.data
            if copy_to_pinned:
                host = torch.empty(slot.shape, dtype=slot.dtype, pin_memory=True)
                self.tensors[slot.name] = host.copy_(data)
            else:
                self.tensors[slot.name] = data.to("cpu")  # on CPU the very tensor, not a copy

    def load(self, slots: list[_Slot]) -> list[torch.Tensor]:
        return [self.tensors[s.name].to(s.device, non_blocking=True) for s in slots]


class _CheckpointStore:
    """Weights read back from safetensors files: `files` maps checkpoint key → file."""

    def __init__(self, files: dict[str, Path], keys: dict[str, str]) -> None:
        self.files = files
        self.keys = keys  # parameter name → checkpoint key

    def load(self, slots: list[_Slot]) -> list[torch.Tensor]:
        by_file: dict[Path, list[int]] = {}
        for i, slot in enumerate(slots):
            by_file.setdefault(self.files[self.keys[slot.name]], []).append(i)
        loaded: list[Any] = [None] * len(slots)
        for path, indices in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for i in indices:
                    tensor = handle.get_tensor(self.keys[slots[i].name])
                    loaded[i] = tensor.to(slots[i].device, slots[i].dtype)
        return loaded


def checkpoint_files(source: str) -> dict[str, Path] | None:
    """Checkpoint key → safetensors file for a checkpoint directory (single or sharded)."""
    directory = Path(source)
    if source == "preset" or not directory.is_dir():
        return None
    single = directory / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt", device="cpu") as handle:
            return {key: single for key in handle.keys()}
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: directory / file for key, file in weight_map.items()}
    return None


def _checkpoint_store(bundle: ModelBundle, slots: list[_Slot]) -> tuple[Any, str | None]:
    """A store reading from the bundle's checkpoint, or (None, why it cannot be used)."""
    files = checkpoint_files(bundle.source)
    if files is None:
        return None, f"no safetensors checkpoint at source {bundle.source!r}"
    keys: dict[str, str] = {}
    for slot in slots:
        # transformers 5.x saves LLaVA with its legacy key names, without the leading "model."
        candidates = (slot.name, slot.name.removeprefix("model."))
        found = next((k for k in candidates if k in files), None)
        if found is None:
            return None, f"checkpoint has no tensor for {slot.name}"
        keys[slot.name] = found
    store = _CheckpointStore(files, keys)
    for slot, tensor in zip(slots, store.load(slots), strict=True):
        if not torch.equal(tensor, slot.parameter.data):
            return None, f"in-memory {slot.name} differs from the checkpoint"
    return store, None


class _Sleeper:
    """Owns the sleeping weights; its bound methods are the hooks (so clones stay consistent)."""

    def __init__(
        self, groups: dict[str, list[_Slot]], store: Any, record: dict[str, Any], events: Events
    ):
        self.groups = groups  # handle name → its slots
        self.store = store
        self.record = record
        self.events = events
        self.asleep: set[str] = set()

    def sleep(self, group: str) -> None:
        if group in self.asleep:
            return
        with torch.inference_mode(False):
            for slot in self.groups[group]:
                slot.parameter.data = torch.empty(0, dtype=slot.dtype, device=slot.device)
        self.asleep.add(group)
        self.record["asleep"] = sorted(self.asleep)

    def wake(self, groups: set[str]) -> None:
        """Bring the sleeping ones of `groups` back, as one span the harness may time."""
        waking = sorted(self.asleep & groups)
        if not waking:
            return
        slots = [s for g in waking for s in self.groups[g]]
        with self.events.span(WAKE.metric, WAKE.module), torch.inference_mode(False):
            for slot, tensor in zip(slots, self.store.load(slots), strict=True):
                slot.parameter.data = tensor
        self.record["wakes"] += 1
        self.asleep -= set(waking)
        self.record["asleep"] = sorted(self.asleep)

    def before_vision(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        # The projector runs right after the tower: wake both in one go.
        self.wake(set(self.groups))

    def before_projector(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.wake({"projector"})

    def after_vision(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.sleep("vision_encoder")

    def after_projector(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.sleep("projector")


WAKE = Figure("sleep_wake_s", "vision-encoder wake latency", "s", "span", "vision_encoder")
FREED = Figure(
    "sleep_bytes_freed", "bytes freed while asleep", "bytes", "applied", "vision_encoder"
)


@register
class VisionSleep(Transform):
    name = "vision_sleep"
    description = (
        "modality-aware vision-encoder sleep (paper 3.5): vision weights leave the device "
        "between image requests and wake on the next one"
    )
    targets = ("vision_encoder", "projector")
    lossless = True
    tolerance = 0.0  # the same weights come back bit for bit
    requires = frozenset({"materialized"})
    figures = (WAKE, FREED)
    params = (
        Param(
            "keep_projector_awake",
            bool,
            False,
            "leave the projector's weights resident; only the vision tower sleeps",
        ),
        Param(
            "mode",
            str,
            "auto",
            "where asleep weights go: cuda-pinned (GPU), checkpoint (reload from disk), "
            "cpu-copy (kept in host memory); auto picks the first that applies",
            choices=MODES,
        ),
    )

    def target_handles(self, bundle: ModelBundle) -> list[str]:
        return ["vision_encoder"] + ([] if self.values["keep_projector_awake"] else ["projector"])

    def validate_for(self, bundle: ModelBundle) -> None:
        super().validate_for(bundle)
        # A meta-device bundle is a shape without a place: its device is checked when it has one.
        if self.values["mode"] == "cuda-pinned" and bundle.device.type not in ("cuda", "meta"):
            raise CompoundError(
                f"transform {self.name}: mode 'cuda-pinned' needs the model on a CUDA device "
                f"(it is on {bundle.device.type})"
            )

    def _store(self, bundle: ModelBundle, slots: list[_Slot]) -> tuple[Any, str, str]:
        mode = self.values["mode"]
        if mode == "cuda-pinned" or (mode == "auto" and bundle.device.type == "cuda"):
            return _HostStore(slots, copy_to_pinned=True), "cuda-pinned", "pinned host copy"
        if mode in ("auto", "checkpoint"):
            store, reason = _checkpoint_store(bundle, slots)
            if store is not None:
                return store, "checkpoint", f"reloaded from {bundle.source}"
            if mode == "checkpoint":
                raise CompoundError(f"transform {self.name}: mode 'checkpoint' unusable: {reason}")
            note = f"{reason}: weights kept in host memory"
            return _HostStore(slots, copy_to_pinned=False), "cpu-copy", note
        return _HostStore(slots, False), "cpu-copy", "weights kept in host memory"

    def apply_in_place(self, bundle: ModelBundle) -> dict[str, float]:
        handles = {name: bundle.handles()[name] for name in self.target_handles(bundle)}
        groups = {name: _slots(bundle, [module]) for name, module in handles.items()}
        every = [s for slots in groups.values() for s in slots]
        store, mode, note = self._store(bundle, every)
        offloaded = sum(s.nbytes for s in every)
        # On the model's device; a CPU model keeping a host copy frees nothing.
        freed = 0 if mode == "cpu-copy" and bundle.device.type == "cpu" else offloaded
        record: dict[str, Any] = {
            "mode": mode,
            "note": note,
            "modules": list(groups),
            "parameters": len(every),
            "bytes_offloaded": offloaded,  # leave the model while asleep
            "bytes_freed": freed,
            "asleep": [],
            "wakes": 0,
        }
        bundle.metadata["sleep"] = record
        sleeper = _Sleeper(groups, store, record, bundle.events)
        bundle.vision_encoder.register_forward_pre_hook(sleeper.before_vision)
        bundle.vision_encoder.register_forward_hook(sleeper.after_vision)
        if "projector" in groups:
            bundle.projector.register_forward_pre_hook(sleeper.before_projector)
            bundle.projector.register_forward_hook(sleeper.after_projector)
        for group in groups:
            sleeper.sleep(group)
        return {FREED.metric: freed}  # summed from the sleeping tensors' sizes
