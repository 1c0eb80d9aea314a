"""Attention/FFN overlap across two micro-batches (paper 3.3's asynchronous pipelining).

Each decoder layer splits its batch into two micro-batches, A (the first half of the rows) and
B, and issues, in this order: attention(A), attention(B) on the attention lane; FFN(A) after
attention(A), FFN(B) after attention(B) on the FFN lane. On CUDA the lanes are two streams
ordered by events, so attention(B) can run while FFN(A) does, and, because the next layer's
attention(A) waits only for this layer's FFN(A), that one runs while FFN(B) does: the
two-micro-batch schedule of SGLang's two-batch overlap and NanoFlow's nano-batches, inside one
device. Nothing joins the two halves between layers: a layer writes each half's output into
its rows of one tensor and hands the next layer the per-half events (`OverlapState.pending`).

The KV cache stays one static cache for the whole batch: each micro-batch's attention writes
its rows in place through `RowCache` (a dynamic cache grows by concatenating the whole batch,
so the overlap runs under the static engine only).

`SequentialLanes` runs the same schedule on one thread (any device) and records it: the CPU
test that the split batch gives the unsplit batch's outputs, and that the order is as above.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.errors import CompoundError

LANES = ("main", "attention", "ffn")
_ROW_KWARGS = ("attention_mask", "position_ids")  # tensors with one row per batch row


class SequentialLanes:
    """The schedule without concurrency: work runs where it is issued; the log records
    (kind, lane, label) for every piece of work, mark and wait."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, str]] = []
        self._marked: set[int] = set()

    def on(self, lane: str, label: str) -> AbstractContextManager[Any]:
        self.log.append(("work", lane, label))
        return nullcontext()

    def mark(self, lane: str) -> int:
        token = len(self.log)
        self._marked.add(token)
        self.log.append(("mark", lane, str(token)))
        return token

    def wait(self, lane: str, token: int) -> None:
        if token not in self._marked:
            raise RuntimeError(f"lane {lane} waits for {token}, which was never marked")
        self.log.append(("wait", lane, str(token)))

    def keep_alive(self, tensor: torch.Tensor, lane: str) -> None:
        """Nothing to do: one thread frees nothing early."""

    def finish(self) -> dict[str, float] | None:
        return None


class CudaLanes:
    """Two CUDA streams beside the current one, ordered by events; with `timed`, every piece
    of work is bracketed by timing events so `finish` can say how much the streams overlapped."""

    def __init__(self, device: torch.device, timed: bool) -> None:
        self.streams = {
            "attention": torch.cuda.Stream(device),
            "ffn": torch.cuda.Stream(device),
        }
        self.device = device
        self.timed = timed
        self._spans: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._first: torch.cuda.Event | None = None

    def _stream(self, lane: str) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device) if lane == "main" else self.streams[lane]

    def on(self, lane: str, label: str) -> AbstractContextManager[Any]:
        stream = self._stream(lane)
        if not self.timed:
            return torch.cuda.stream(stream)
        return _TimedStream(self, lane, stream)

    def mark(self, lane: str) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=self.timed)
        event.record(self._stream(lane))
        if self.timed and self._first is None and lane == "main":
            self._first = event
        return event

    def wait(self, lane: str, token: torch.cuda.Event) -> None:
        self._stream(lane).wait_event(token)

    def keep_alive(self, tensor: torch.Tensor, lane: str) -> None:
        """`tensor`, made on another stream, is read on `lane`: the allocator must not reuse
        its memory before that lane is done with it."""
        tensor.record_stream(self._stream(lane))

    def finish(self) -> dict[str, float] | None:
        """Busy time of each stream and the wall time of the forward call, in seconds, and
        busy/wall: 1.0 when nothing overlapped, up to 2.0 when the streams ran side by side."""
        if not self.timed or self._first is None or not self._spans:
            return None
        end = self.mark("main")
        end.synchronize()
        busy = {lane: 0.0 for lane in self.streams}
        for lane, start, stop in self._spans:
            busy[lane] += start.elapsed_time(stop) / 1e3
        wall = self._first.elapsed_time(end) / 1e3
        self._spans, self._first = [], None
        total = sum(busy.values())
        return {
            "overlap_attention_busy_s": busy["attention"],
            "overlap_ffn_busy_s": busy["ffn"],
            "overlap_wall_s": wall,
            "overlap_busy_over_wall": total / wall if wall > 0 else float("nan"),
        }


class _TimedStream:
    def __init__(self, lanes: CudaLanes, lane: str, stream: torch.cuda.Stream) -> None:
        self.lanes, self.lane, self.stream = lanes, lane, stream
        self.context = torch.cuda.stream(stream)

    def __enter__(self) -> None:
        self.context.__enter__()
        self.start = torch.cuda.Event(enable_timing=True)
        self.start.record(self.stream)

    def __exit__(self, *exc: object) -> None:
        stop = torch.cuda.Event(enable_timing=True)
        stop.record(self.stream)
        self.lanes._spans.append((self.lane, self.start, stop))
        self.context.__exit__(*exc)


class RowCache:
    """One micro-batch's view of a static KV cache: `update` writes its rows in place.

    The first micro-batch's update puts the layer's write counter (transformers 5.2x keeps
    one) back where it was, so the second writes the same positions and advances it once.
    Everything else is the whole cache's.
    """

    def __init__(self, cache: Any, rows: slice, batch: int, first: bool) -> None:
        self.cache, self.rows, self.batch, self.first = cache, rows, batch, first

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ):  # noqa: ANN201
        layer = self.cache.layers[layer_idx]
        if not hasattr(layer, "max_cache_len"):
            raise CompoundError(
                "attention/FFN overlap needs a static KV cache (the static engine): a dynamic "
                "cache grows by concatenating the whole batch"
            )
        if getattr(layer, "keys", None) is None:  # allocate for the whole batch, not half
            layer.lazy_initialization(
                key_states.new_zeros((self.batch, *key_states.shape[1:])),
                value_states.new_zeros((self.batch, *value_states.shape[1:])),
            )
        keys, values = layer.keys, layer.values
        counter = getattr(layer, "cumulative_length", None)
        before = counter.clone() if self.first and isinstance(counter, torch.Tensor) else None
        layer.keys, layer.values = keys[self.rows], values[self.rows]
        try:
            return layer.update(key_states, value_states, *args, **kwargs)
        finally:
            layer.keys, layer.values = keys, values
            if before is not None:
                counter.copy_(before)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)


@dataclass
class OverlapState:
    """What the layers of one model share: the lanes and each half's pending event."""

    lanes: Any  # SequentialLanes or CudaLanes
    pending: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    report: Callable[[dict[str, float]], None] = lambda _figures: None

    def finish_call(self, *_args: Any) -> None:
        """After the language model's forward: forget this call's events, report overlap."""
        self.pending.clear()
        figures = self.lanes.finish()
        if figures is not None:
            self.report(figures)


def _halves(batch: int) -> tuple[slice, slice]:
    middle = (batch + 1) // 2
    return slice(0, middle), slice(middle, batch)


def _rows_of(value: Any, rows: slice, batch: int) -> Any:
    """`value` for these rows: tensors with a row per batch row are sliced, others shared."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, tuple):
        return tuple(_rows_of(part, rows, batch) for part in value)
    return value


def _half_kwargs(kwargs: dict[str, Any], rows: slice, batch: int, first: bool) -> dict[str, Any]:
    half = dict(kwargs)
    for name in _ROW_KWARGS:
        if name in half:
            half[name] = _rows_of(half[name], rows, batch)
    if "position_embeddings" in half:
        half["position_embeddings"] = _rows_of(half["position_embeddings"], rows, batch)
    for name in (
        "cache",
        "past_key_values",
    ):  # transformers 5.2x says cache, earlier releases past_key_values
        if half.get(name) is not None:
            half[name] = RowCache(half[name], rows, batch, first)
    return half


def overlapped_forward(
    layer: nn.Module, state: OverlapState, hidden_states: torch.Tensor, **kwargs: Any
) -> torch.Tensor:
    """A Llama decoder layer's forward, two micro-batches on two lanes (see the module doc)."""
    batch = hidden_states.shape[0]
    if batch < 2:  # nothing to split
        return type(layer).forward(layer, hidden_states, **kwargs)
    lanes = state.lanes
    tokens = state.pending.pop(id(hidden_states), None)
    if tokens is None:  # the input comes from outside the pipeline: wait for all of it
        entry = lanes.mark("main")
        tokens = (entry, entry)
    output = torch.empty_like(hidden_states)
    after_attention = []
    for half, rows in enumerate(_halves(batch)):
        with lanes.on("attention", f"attention {'AB'[half]}"):
            lanes.wait("attention", tokens[half])
            residual = hidden_states[rows]
            attended, _ = layer.self_attn(
                hidden_states=layer.input_layernorm(residual),
                **_half_kwargs(kwargs, rows, batch, first=half == 0),
            )
            middle = residual + attended
            after_attention.append((middle, lanes.mark("attention")))
    done = []
    for half, rows in enumerate(_halves(batch)):
        middle, ready = after_attention[half]
        with lanes.on("ffn", f"ffn {'AB'[half]}"):
            lanes.wait("ffn", ready)
            lanes.keep_alive(middle, "ffn")
            output[rows] = middle + layer.mlp(layer.post_attention_layernorm(middle))
            done.append(lanes.mark("ffn"))
    for token in done:  # work issued on the main lane later sees the whole output
        lanes.wait("main", token)
    state.pending[id(output)] = (done[0], done[1])
    return output


def install(language_model: nn.Module, layers: nn.ModuleList, state: OverlapState) -> None:
    """Run every layer of `layers` through `overlapped_forward` with `state` (in place)."""
    for layer in layers:
        layer.forward = types.MethodType(
            lambda self, hidden_states, **kwargs: overlapped_forward(
                self, state, hidden_states, **kwargs
            ),
            layer,
        )
    language_model.register_forward_hook(state.finish_call)
