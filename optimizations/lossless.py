"""Does a transformed bundle answer exactly as the baseline did? The check behind "lossless"."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from models.bundle import ModelBundle
from models.generation import generate, model_inputs
from models.prompting import Request


class LosslessResult(NamedTuple):
    ok: bool
    max_abs_diff: float
    detail: str


def declared_tolerance(bundle: ModelBundle) -> float:
    """Sum of the applied transforms' recorded tolerances (lossy ones count as 0)."""
    applied = bundle.metadata.get("transforms", [])
    return float(sum(entry["tolerance"] or 0.0 for entry in applied))


def _prefill_logits(bundle: ModelBundle, request: Request) -> torch.Tensor:
    return bundle.model(**model_inputs(bundle, [request])).logits.float().cpu()


@torch.inference_mode()
def check_lossless(
    baseline: ModelBundle,
    transformed: ModelBundle,
    requests: Sequence[Request],
    new_tokens: int,
    tolerance: float | None = None,
) -> LosslessResult:
    """Compare prefill logits (every prompt position) and greedy tokens on each request.

    OK means every request gives the same greedy tokens and every logit is within `tolerance`
    (default: what the transformed bundle's applied transforms declared). A transform that
    changes the prompt's length (token pruning) cannot pass: then only the last position's
    logits are compared, for the figure.
    """
    limit = declared_tolerance(transformed) if tolerance is None else tolerance
    worst, worst_request, token_mismatches, shape_mismatches = 0.0, -1, [], []
    for index, request in enumerate(requests):
        expected = _prefill_logits(baseline, request)
        actual = _prefill_logits(transformed, request)
        if expected.shape != actual.shape:
            shape_mismatches.append(index)
            expected, actual = expected[:, -1], actual[:, -1]
        diff = float((expected - actual).abs().max())
        if diff > worst:
            worst, worst_request = diff, index
        reference = generate(baseline, request, new_tokens).cpu()
        if not torch.equal(reference, generate(transformed, request, new_tokens).cpu()):
            token_mismatches.append(index)
    ok = worst <= limit and not token_mismatches and not shape_mismatches
    where = f" (request {worst_request})" if worst_request >= 0 else ""
    detail = (
        f"{len(requests)} requests: greedy tokens differ in {len(token_mismatches)} "
        f"{token_mismatches[:5]}; max |Δlogit| {worst:.3g}{where} vs tolerance {limit:.3g}"
    )
    if shape_mismatches:
        detail += f"; logit shapes differ in {len(shape_mismatches)} (last position compared)"
    return LosslessResult(ok, worst, detail)
