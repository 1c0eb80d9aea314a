"""The workload: a fixed list of requests (image + question, or text only) and how one is timed.

Every configuration serves the same requests with greedy decoding and a fixed number of new
tokens, so each does exactly the same work and only its speed may differ.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from bench.configuration import WorkloadSpec
from bench.measure.trackers.latency import Clock, Mark, RequestTiming
from models.bundle import ModelBundle
from models.dataset import make_examples
from models.generation import generate
from models.prompting import Request


def build_requests(bundle: ModelBundle, spec: WorkloadSpec) -> list[Request]:
    """The block's requests, from the held-out test split, mixed at the requested ratio."""
    examples = make_examples(spec.seed, "test", spec.requests_per_block, spec.image_fraction)
    return [bundle.prompts.encode(example) for example in examples]


class _TokenClock(LogitsProcessor):
    """Marks the moment each new token's logits exist: the first mark ends prefill."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.marks: list[Mark] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.marks.append(self.clock.mark())
        return scores


def serve_timed(
    bundle: ModelBundle, request: Request, new_tokens: int, clock: Clock
) -> RequestTiming:
    """Serve one request and time its phases: prefill (to first token), each decode step, total.

    Module times are attributed by the per-module hooks in a separate pass, so this path
    carries no hooks of ours.
    """
    tokens = _TokenClock(clock)
    clock.synchronize()
    start = clock.mark()
    generate(bundle, request, new_tokens, LogitsProcessorList([tokens]))
    end = clock.mark()
    clock.synchronize()
    marks = tokens.marks
    steps = [clock.seconds(a, b) for a, b in zip(marks, marks[1:], strict=False)]
    timing = RequestTiming.from_token_times(
        prefill=clock.seconds(start, marks[0]),
        token_times=steps,
        end_to_end=clock.seconds(start, end),
    )
    clock.release([start, *marks, end])
    return timing
