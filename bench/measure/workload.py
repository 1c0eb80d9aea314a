"""The workload: a fixed list of requests (image + question, or text only), how it is cut
into batches, and how one batch is timed.

Every configuration serves the same requests with greedy decoding and a fixed number of new
tokens, so each does exactly the same work and only its speed may differ.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from bench.configuration import WorkloadSpec
from bench.measure.trackers.latency import Clock, Mark, RequestTiming
from models.bundle import ModelBundle
from models.dataset import make_examples
from models.generation import generate
from models.prompting import Request


def build_requests(bundle: ModelBundle, spec: WorkloadSpec) -> list[Request]:
    """The block's requests, from the held-out test split, mixed at the requested ratio, with
    `spec.image_reuse` of the image requests showing an earlier request's image again."""
    examples = make_examples(spec.seed, "test", spec.requests_per_block, spec.image_fraction)
    return reuse_images(
        [bundle.prompts.encode(example) for example in examples], spec.image_reuse, spec.seed
    )


def repeat_count(images: int, reuse: float) -> int:
    """How many of `images` image requests repeat an earlier image: round(reuse × images),
    at most all but the first (the first image request has nothing earlier to repeat)."""
    return min(round(reuse * images), max(images - 1, 0))


def reuse_images(requests: list[Request], reuse: float, seed: int) -> list[Request]:
    """`requests` with `repeat_count` of the image requests (chosen at random, never the
    first) given the pixels of an earlier, original image request; questions stay their own."""
    image_positions = [i for i, r in enumerate(requests) if r.pixel_values is not None]
    count = repeat_count(len(image_positions), reuse)
    if count == 0:
        return requests
    rng = random.Random(f"image-reuse:{seed}")
    repeats = set(rng.sample(image_positions[1:], count))
    result = list(requests)
    originals: list[Request] = []
    for position in image_positions:
        if position in repeats:
            source = rng.choice(originals)
            result[position] = replace(requests[position], pixel_values=source.pixel_values)
        else:
            originals.append(requests[position])
    return result


def batches(requests: list[Request], batch_size: int) -> list[list[Request]]:
    """The block's requests cut into batches of `batch_size`, each holding the block's image
    fraction (to the nearest whole request): ceil(len / batch_size) batches, drawn in turn from
    the image and the text requests, so a batch larger than the block repeats requests.

    Batch size 1 serves the requests one by one, in order.
    """
    if batch_size == 1:
        return [[request] for request in requests]
    images = [r for r in requests if r.pixel_values is not None]
    texts = [r for r in requests if r.pixel_values is None]
    per_batch = round(batch_size * len(images) / len(requests))
    image_cycle = itertools.cycle(images) if images else iter(())
    text_cycle = itertools.cycle(texts) if texts else iter(())
    count = -(-len(requests) // batch_size)
    return [
        [next(image_cycle) for _ in range(per_batch)]
        + [next(text_cycle) for _ in range(batch_size - per_batch)]
        for _ in range(count)
    ]


def cache_length(requests: list[Request], new_tokens: int) -> int:
    """One static-cache length every request of the workload fits: the longest prompt plus
    the new tokens (a fixed bucket, so no request re-allocates the cache or re-captures)."""
    return max(len(r.input_ids) for r in requests) + new_tokens


class _TokenClock(LogitsProcessor):
    """Marks the moment each new token's logits exist: the first mark ends prefill."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.marks: list[Mark] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.marks.append(self.clock.mark())
        return scores


def serve_timed(
    bundle: ModelBundle,
    batch: list[Request],
    new_tokens: int,
    clock: Clock,
    *,
    engine: str = "eager",
    cache_length: int | None = None,
) -> RequestTiming:
    """Serve one batch and time its phases: prefill (to first token), each decode step, total.
    Every request of a batch shares these times: they start and finish together.

    Module times are attributed by the per-module hooks in a separate pass, so this path
    carries no hooks of ours.
    """
    tokens = _TokenClock(clock)
    clock.synchronize()
    start = clock.mark()
    generate(
        bundle,
        batch,
        new_tokens,
        LogitsProcessorList([tokens]),
        engine=engine,
        cache_length=cache_length,
    )
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
