"""Train a preset's model on the generated dataset (the "teacher" every transform is compared to).

Each step draws fresh training examples from an endless, seeded stream, in two sub-batches
(image questions and text-only questions) so the short text prompts are not padded to the
length of the image prompts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from models.bundle import ModelBundle
from models.dataset import make_example
from models.presets import TrainingSettings
from models.prompting import Request, stack_pixels

IGNORE = -100


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float


def collate(requests: list[Request], pad_id: int) -> dict[str, torch.Tensor | None]:
    """Right-padded prompt+answer ids, and labels that score only the answer tokens."""
    rows = [r.input_ids + r.answer_ids for r in requests]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (request, row) in enumerate(zip(requests, rows, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        answer_start = len(request.input_ids)
        labels[i, answer_start : len(row)] = torch.tensor(request.answer_ids)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "pixel_values": stack_pixels(requests),
    }


def answer_loss(
    bundle: ModelBundle, batch: dict[str, torch.Tensor | None]
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over answer tokens, and how many tokens were scored."""
    logits = bundle.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
    ).logits
    labels = batch["labels"]
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return loss, int((labels != IGNORE).sum())


def _learning_rate(settings: TrainingSettings, step: int) -> float:
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(
    bundle: ModelBundle,
    settings: TrainingSettings,
    *,
    show_progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train in place; marks the bundle trained. Deterministic for a given seed and thread count.

    `on_step(step, loss)` is called after every optimizer step (for logging or early checks).
    """
    torch.manual_seed(settings.seed)
    model = bundle.model
    model.train()
    vision = [p for p in bundle.vision_encoder.parameters()]
    vision_ids = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in vision_ids]
    groups = [{"params": rest, "scale": 1.0}, {"params": vision, "scale": settings.vision_lr_scale}]
    optimizer = torch.optim.AdamW(
        groups,
        lr=settings.learning_rate,
        weight_decay=settings.weight_decay,
        betas=(0.9, 0.98),
        foreach=True,
    )
    pad_id = bundle.prompts.tokenizer.pad_token_id
    image_count = round(settings.batch_size * settings.image_fraction)
    text_count = settings.batch_size - image_count
    next_index = {"image": 0, "text": 0}
    loss_value = float("nan")
    start = time.perf_counter()
    progress = Progress(
        TextColumn("training {task.fields[preset]}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps  loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not show_progress,
    )
    with progress:
        task = progress.add_task("train", total=settings.steps, preset=bundle.preset, loss="-")
        for step in range(settings.steps):
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(settings, step) * group["scale"]
            total_loss = torch.zeros(())
            total_tokens = 0
            for modality, count in (("image", image_count), ("text", text_count)):
                if count == 0:
                    continue
                first = next_index[modality]
                next_index[modality] += count
                requests = [
                    bundle.prompts.encode(make_example(settings.seed, "train", i, modality))
                    for i in range(first, first + count)
                ]
                loss, tokens = answer_loss(bundle, collate(requests, pad_id))
                total_loss = total_loss + loss
                total_tokens += tokens
            mean_loss = total_loss / max(1, total_tokens)
            optimizer.zero_grad(set_to_none=True)
            mean_loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            loss_value = float(mean_loss.detach())
            progress.update(task, advance=1, loss=f"{loss_value:.3f}")
            if on_step is not None:
                on_step(step, loss_value)
    model.eval()
    bundle.trained = True
    return TrainResult(settings.steps, time.perf_counter() - start, loss_value)
