"""The workload: a fixed list of requests (image + question, or text only) and how one is served.

Every configuration serves the same requests with greedy decoding and a fixed number of new
tokens, so each does exactly the same work and only its speed may differ.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from bench.measure.trackers.latency import RequestTiming, Stopwatch, synchronize
from models.bundle import ModelBundle
from models.dataset import make_examples
from models.prompting import Request, model_inputs


@dataclass(frozen=True)
class WorkloadSpec:
    """What each timed block serves."""

    requests_per_block: int = 8
    image_fraction: float = 0.5
    new_tokens: int = 8
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_requests(bundle: ModelBundle, spec: WorkloadSpec) -> list[Request]:
    """The block's requests, from the held-out test split, mixed at the requested ratio."""
    examples = make_examples(spec.seed, "test", spec.requests_per_block, spec.image_fraction)
    return [bundle.prompts.encode(example) for example in examples]


class _TokenClock(LogitsProcessor):
    """Marks the moment each new token's logits exist: the first mark ends prefill."""

    def __init__(self, stopwatch: Stopwatch) -> None:
        self.stopwatch = stopwatch
        self.marks: list[Any] = []
        self._cuda = stopwatch.device.type == "cuda"

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter_ns())
        return scores


def _seconds_between(start: Any, end: Any) -> float:
    if isinstance(start, int):
        return (end - start) / 1e9
    return start.elapsed_time(end) / 1e3


@torch.inference_mode()
def generate(
    bundle: ModelBundle,
    request: Request,
    new_tokens: int,
    processors: LogitsProcessorList | None = None,
) -> torch.Tensor:
    """Greedy generation of exactly `new_tokens` tokens (end-of-sequence suppressed until then)."""
    tokenizer = bundle.prompts.tokenizer
    return bundle.model.generate(
        **model_inputs(bundle, [request]),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=processors,
    )


def serve_timed(bundle: ModelBundle, request: Request, new_tokens: int) -> RequestTiming:
    """Serve one request and time its phases: prefill (to first token), each decode step, total.

    Vision and projector time are attributed by the per-module hooks in a separate pass, so this
    path carries no hooks at all.
    """
    device = bundle.device
    stopwatch = Stopwatch(device)
    clock = _TokenClock(stopwatch)
    synchronize(device)
    if device.type == "cuda":
        start: Any = torch.cuda.Event(enable_timing=True)
        start.record()
    else:
        start = time.perf_counter_ns()
    generate(bundle, request, new_tokens, LogitsProcessorList([clock]))
    if device.type == "cuda":
        end: Any = torch.cuda.Event(enable_timing=True)
        end.record()
        synchronize(device)
    else:
        end = time.perf_counter_ns()
    marks = clock.marks
    steps = [_seconds_between(a, b) for a, b in zip(marks, marks[1:], strict=False)]
    return RequestTiming.from_token_times(
        prefill=_seconds_between(start, marks[0]),
        token_times=steps,
        end_to_end=_seconds_between(start, end),
    )
