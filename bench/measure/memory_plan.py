"""A memory plan checked before any worker starts: does every worker alive at once fit?

All configurations of an epoch run in their own worker process at the same time, each holding
its own copy of the weights. Running out of memory half-way through an epoch loses the work
done so far and shows up as an opaque OOM kill, so the run estimates one worker's needs up
front and stops with one line saying what to change when they do not fit.

Every figure here is an estimate: weights and KV cache follow from the model's shapes exactly;
activations are a stated upper bound; per-process overhead is a declared constant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from torch import nn

from core.errors import CompoundError
from models.bundle import count_parameters

BYTES_PER_GIB = 2**30
BYTES_PER_MIB = 2**20

# Declared, not measured per run: a CUDA context plus cuBLAS/cuDNN handles and workspaces, as
# nvidia-smi shows for a PyTorch process that has run one matmul (about 0.3-0.6 GiB on recent
# GPUs and drivers with lazy module loading); 500 MiB sits at the upper middle of that range.
CUDA_CONTEXT_BYTES = 500 * BYTES_PER_MIB
# Declared: resident memory of a worker's Python runtime before any model is loaded. Measured
# once at 240 MiB RSS after `import torch, transformers, psutil` (torch 2.13 CPU, transformers
# 5.24, Linux x86-64), rounded up for the harness's own modules and allocator slack.
CPU_RUNTIME_BYTES = 300 * BYTES_PER_MIB
# Activation bound, per layer (inference under no_grad frees a layer's buffers before the
# next): hidden-width buffers = residual stream, normalized input, attention query and output;
# intermediate-width buffers = the MLP's gate, up and their activated product.
ACTIVATION_HIDDEN_BUFFERS = 4
ACTIVATION_INTERMEDIATE_BUFFERS = 3
# Logits of the last position are kept in float32 for sampling/argmax.
LOGITS_BYTES_PER_ELEMENT = 4
# Share of the free memory the plan may use: the rest absorbs allocator fragmentation and
# whatever else starts on the machine meanwhile.
DEFAULT_HEADROOM = 0.9


def format_bytes(count: float) -> str:
    """GiB with one decimal, MiB below 1 GiB, so small and large figures both stay readable."""
    if abs(count) >= BYTES_PER_GIB:
        return f"{count / BYTES_PER_GIB:.1f} GiB"
    return f"{count / BYTES_PER_MIB:.1f} MiB"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class WorkerEstimate:
    """What one worker process is expected to hold at its peak, by component, in bytes."""

    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    overhead_bytes: int
    dtype: str
    batch_size: int
    sequence_length: int
    device_type: str
    parameters: int
    # How each figure was derived, for describe(); not part of equality.
    derivation: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def total(self) -> int:
        return (
            self.weights_bytes + self.kv_cache_bytes + self.activation_bytes + self.overhead_bytes
        )

    @property
    def overhead_label(self) -> str:
        return "CUDA context" if self.device_type == "cuda" else "Python/torch runtime"

    def summary(self) -> str:
        """The breakdown in one phrase, for the error line."""
        return (
            f"{format_bytes(self.weights_bytes)} weights in {self.dtype}, "
            f"{format_bytes(self.kv_cache_bytes)} KV cache, "
            f"{format_bytes(self.activation_bytes)} activations, "
            f"{format_bytes(self.overhead_bytes)} {self.overhead_label}"
        )

    def describe(self) -> dict[str, Any]:
        """JSON-ready figures, each marked as an estimate with how it was derived."""

        def item(count: int, key: str) -> dict[str, Any]:
            return {"estimated_bytes": count, "how": self.derivation.get(key, "")}

        return {
            "estimated": True,
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "sequence_length": self.sequence_length,
            "device_type": self.device_type,
            "parameters": self.parameters,
            "weights": item(self.weights_bytes, "weights"),
            "kv_cache": item(self.kv_cache_bytes, "kv_cache"),
            "activations": item(self.activation_bytes, "activations"),
            "overhead": item(self.overhead_bytes, "overhead"),
            "total": {
                "estimated_bytes": self.total,
                "how": "weights + KV cache + activations + overhead",
            },
        }


def _head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def _kv_heads(config: Any) -> int:
    kv_heads = getattr(config, "num_key_value_heads", None)
    return int(kv_heads) if kv_heads else int(config.num_attention_heads)


def _layer_activations(config: Any, batch: int, tokens: int, element: int) -> int:
    """One transformer layer's buffers: hidden, intermediate and attention-score tensors."""
    hidden = ACTIVATION_HIDDEN_BUFFERS * config.hidden_size
    intermediate = ACTIVATION_INTERMEDIATE_BUFFERS * config.intermediate_size
    scores = config.num_attention_heads * tokens  # eager attention's full score matrix
    return batch * tokens * (hidden + intermediate + scores) * element


def estimate_worker(
    model: nn.Module,
    dtype: torch.dtype,
    batch_size: int,
    sequence_length: int,
    device_type: str,
) -> WorkerEstimate:
    """One worker's peak memory, from shapes alone (the model may sit on the meta device).

    - weights: unique parameters × bytes per element of `dtype` (the run casts all of them);
    - KV cache: 2 (K and V) × layers × KV heads × head dim × batch × sequence × element size;
      `sequence_length` is the longest request: prompt (image tokens included) + new tokens;
    - activations: an upper bound for one layer at prefill, the larger of the decoder's and the
      vision tower's: batch × tokens × (4 × hidden + 3 × intermediate + heads × tokens) ×
      element size (the last term is eager attention's score matrix; SDPA kernels need less),
      plus the last position's logits, batch × vocabulary in float32;
    - overhead: a declared per-process constant (CUDA context, or the CPU Python runtime).
    """
    if batch_size < 1 or sequence_length < 1:
        raise ValueError(
            f"batch_size and sequence_length must be ≥ 1: {batch_size}, {sequence_length}"
        )
    element = dtype.itemsize
    name = _dtype_name(dtype)
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    parameters = count_parameters(model)
    weights = parameters * element

    layers = int(text.num_hidden_layers)
    kv_heads = _kv_heads(text)
    head_dim = _head_dim(text)
    kv_cache = 2 * layers * kv_heads * head_dim * batch_size * sequence_length * element

    decoder = _layer_activations(text, batch_size, sequence_length, element)
    vision_config = getattr(config, "vision_config", None)
    vision = 0
    if vision_config is not None:
        patches = (vision_config.image_size // vision_config.patch_size) ** 2 + 1  # + CLS
        vision = _layer_activations(vision_config, batch_size, patches, element)
    logits = batch_size * int(text.vocab_size) * LOGITS_BYTES_PER_ELEMENT
    activations = max(decoder, vision) + logits

    cuda = device_type == "cuda"
    overhead = CUDA_CONTEXT_BYTES if cuda else CPU_RUNTIME_BYTES

    derivation = {
        "weights": f"{parameters:,} parameters × {element} bytes ({name})",
        "kv_cache": f"2 × {layers} layers × {kv_heads} KV heads × {head_dim} head dim × "
        f"batch {batch_size} × sequence {sequence_length} × {element} bytes ({name})",
        "activations": f"upper bound: the larger per-layer prefill buffer set (decoder "
        f"{format_bytes(decoder)}, vision tower {format_bytes(vision)}) as batch × tokens × "
        f"({ACTIVATION_HIDDEN_BUFFERS} × hidden + {ACTIVATION_INTERMEDIATE_BUFFERS} × "
        f"intermediate + heads × tokens) × {element} bytes, plus last-position logits "
        f"batch {batch_size} × vocabulary {text.vocab_size} × {LOGITS_BYTES_PER_ELEMENT} bytes",
        "overhead": (
            f"declared constant: {format_bytes(overhead)} per process for the "
            + ("CUDA context and library handles" if cuda else "Python and torch runtime")
        ),
    }
    return WorkerEstimate(
        weights_bytes=weights,
        kv_cache_bytes=kv_cache,
        activation_bytes=activations,
        overhead_bytes=overhead,
        dtype=name,
        batch_size=batch_size,
        sequence_length=sequence_length,
        device_type=device_type,
        parameters=parameters,
        derivation=derivation,
    )


def free_bytes(device: torch.device | str) -> int:
    """Memory free for new workers now: the GPU's free memory, or the host's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        return int(psutil.virtual_memory().available)
    raise ValueError(f"no free-memory reading for device type {device.type!r}")


def _check_headroom(headroom: float) -> None:
    if not 0 < headroom <= 1:
        raise ValueError(f"headroom must lie in (0, 1]: {headroom}")


def workers_that_fit(
    estimate: WorkerEstimate, free: int, headroom: float = DEFAULT_HEADROOM
) -> int:
    """The most workers alive at once that fit `headroom × free` (0 when not even one does)."""
    _check_headroom(headroom)
    usable = headroom * free
    count = max(int(usable // estimate.total), 0)
    # Guard the float division at an exact boundary so this agrees with check_fits.
    while count > 0 and estimate.total * count > usable:
        count -= 1
    while estimate.total * (count + 1) <= usable:
        count += 1
    return count


def _advice(estimate: WorkerEstimate, workers: int, fit: int) -> str:
    """What to change, only the options that would help in this situation."""
    options: list[str] = []
    if workers > 1 and fit >= 1:
        options.append(
            f"fewer configurations (at most {fit} fit: --design singles, fewer --transforms "
            "or --no-aa-control)"
        )
    if estimate.batch_size > 1:
        options.append(f"a smaller --batch-size (now {estimate.batch_size})")
    if estimate.dtype == "float32":
        options.append("--dtype bfloat16 (halves the weights)")
    if not options:
        options.append("a smaller model or a device with more free memory")
    prefix = "not even one worker fits; " if fit == 0 else ""
    if len(options) == 1:
        return f"{prefix}use {options[0]}"
    return f"{prefix}use {', '.join(options[:-1])}, or {options[-1]}"


def check_fits(
    estimate: WorkerEstimate,
    workers: int,
    free: int,
    *,
    device: str,
    headroom: float = DEFAULT_HEADROOM,
) -> None:
    """Stop before any worker starts when `workers` copies of `estimate` exceed the free memory.

    Raises CompoundError with one line: what the run needs, what is free, and what to change.
    """
    if workers < 1:
        raise ValueError(f"workers must be ≥ 1: {workers}")
    fit = workers_that_fit(estimate, free, headroom)
    if workers <= fit:
        return
    needed = estimate.total * workers
    alive = f"{workers} worker{'s' if workers != 1 else ''} alive at once"
    usable = (
        ""
        if headroom >= 1
        else f" (the plan uses at most {headroom:.0%}: {format_bytes(headroom * free)})"
    )
    raise CompoundError(
        f"the run needs about {format_bytes(needed)} on {device} ({alive} × "
        f"{format_bytes(estimate.total)} each: {estimate.summary()}), but "
        f"{format_bytes(free)} is free{usable}; {_advice(estimate, workers, fit)}"
    )
