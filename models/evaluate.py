"""Greedy answering and exact-match accuracy by modality and question kind."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from itertools import groupby

import torch

from models.bundle import ModelBundle
from models.dataset import Example, Split, make_examples
from models.generation import model_inputs
from models.prompting import Request


@dataclass
class EvalResult:
    accuracy: dict[str, float]  # by modality: "image", "text"
    by_kind: dict[str, float]
    counts: dict[str, int]
    correct: list[bool] = field(default_factory=list)  # per example, in workload order


@torch.inference_mode()
def greedy_answers(
    bundle: ModelBundle, requests: list[Request], max_new_tokens: int = 4, batch_size: int = 64
) -> list[str]:
    """Greedy answers, batched only among prompts of equal length so no padding is ever needed."""
    answers: dict[int, str] = {}
    tokenizer = bundle.prompts.tokenizer
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].input_ids))
    for _, group in groupby(order, key=lambda i: len(requests[i].input_ids)):
        indices = list(group)
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = [requests[i] for i in chunk]
            output = bundle.model.generate(
                **model_inputs(bundle, batch),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            prompt_length = len(batch[0].input_ids)
            for i, row in zip(chunk, output[:, prompt_length:].tolist(), strict=True):
                answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return [answers[i] for i in range(len(requests))]


def score(examples: list[Example], answers: list[str]) -> EvalResult:
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    kinds: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    correct = []
    for example, answer in zip(examples, answers, strict=True):
        hit = answer == example.answer
        correct.append(hit)
        for table, key in ((totals, example.modality), (kinds, example.kind)):
            table[key][0] += hit
            table[key][1] += 1
    return EvalResult(
        accuracy={k: c / n for k, (c, n) in sorted(totals.items())},
        by_kind={k: c / n for k, (c, n) in sorted(kinds.items())},
        counts={k: n for k, (_, n) in sorted(totals.items())},
        correct=correct,
    )


def evaluate(
    bundle: ModelBundle,
    split: Split = "test",
    count: int = 400,
    seed: int = 0,
    image_fraction: float = 0.5,
) -> EvalResult:
    """Exact-match accuracy on `count` held-out examples (half image, half text by default)."""
    examples = make_examples(seed, split, count, image_fraction)
    requests = [bundle.prompts.encode(e) for e in examples]
    return score(examples, greedy_answers(bundle, requests))
