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
from models.dataset import COLOURS, GRID, SHAPES, Example, make_example
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


def _cell_labels(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per grid cell: shape index + 1 and colour index + 1 (0 = empty cell)."""
    shapes = torch.zeros((len(examples), GRID * GRID), dtype=torch.long)
    colours = torch.zeros_like(shapes)
    colour_names = list(COLOURS)
    for i, example in enumerate(examples):
        for obj in example.scene or ():
            cell = obj.row * GRID + obj.col
            shapes[i, cell] = SHAPES.index(obj.shape) + 1
            colours[i, cell] = colour_names.index(obj.colour) + 1
    return shapes, colours


def pretrain_vision(
    bundle: ModelBundle, settings: TrainingSettings, *, show_progress: bool = True
) -> float:
    """Teach the vision tower what is in each grid cell, with throwaway linear heads.

    Trained inside the VLM loss from random init, the tower either collapsed (full learning
    rate) or learned shape too slowly (a tenth of it) for a 10-minute CPU budget (measured).
    Real LLaVA models start from a pretrained CLIP; this stage is our small stand-in for it.
    Returns the final loss.
    """
    if settings.vision_pretrain_steps <= 0:
        return float("nan")
    tower = bundle.vision_encoder
    hidden = tower.config.hidden_size
    patches = tower.config.image_size // tower.config.patch_size
    per_cell = patches // GRID
    shape_head = torch.nn.Linear(hidden, len(SHAPES) + 1)
    colour_head = torch.nn.Linear(hidden, len(COLOURS) + 1)
    # Where each cell is, too: position questions need it to survive in the features.
    row_head = torch.nn.Linear(hidden, GRID)
    col_head = torch.nn.Linear(hidden, GRID)
    heads = (shape_head, colour_head, row_head, col_head)
    parameters = [*tower.parameters(), *(p for head in heads for p in head.parameters())]
    rows = torch.arange(GRID).repeat_interleave(GRID)
    cols = torch.arange(GRID).repeat(GRID)
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, foreach=True)
    tower.train()
    loss_value = float("nan")
    progress = Progress(
        TextColumn("pretraining vision"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps  loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        disable=not show_progress,
    )
    with progress:
        task = progress.add_task("vision", total=settings.vision_pretrain_steps, loss="-")
        for step in range(settings.vision_pretrain_steps):
            first = step * settings.batch_size
            examples = [
                make_example(settings.seed + 1, "train", i, "image")
                for i in range(first, first + settings.batch_size)
            ]
            pixels = torch.stack([bundle.prompts.pixels(e) for e in examples])
            tokens = tower(pixels).last_hidden_state[:, -patches * patches :]
            grid = tokens.reshape(len(examples), GRID, per_cell, GRID, per_cell, hidden)
            cells = grid.mean(dim=(2, 4)).reshape(len(examples), GRID * GRID, hidden)
            shapes, colours = _cell_labels(examples)
            loss = (
                F.cross_entropy(shape_head(cells).flatten(0, 1), shapes.flatten())
                + F.cross_entropy(colour_head(cells).flatten(0, 1), colours.flatten())
                + F.cross_entropy(row_head(cells).flatten(0, 1), rows.repeat(len(examples)))
                + F.cross_entropy(col_head(cells).flatten(0, 1), cols.repeat(len(examples)))
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())
            progress.update(task, advance=1, loss=f"{loss_value:.3f}")
    return loss_value


def step_progress(label: str, show: bool) -> Progress:
    """A progress bar over optimizer steps with the last loss (update it with `loss=`)."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps  loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not show,
    )


def cosine_schedule(peak: float, warmup_steps: int, steps: int, step: int) -> float:
    """Linear warm-up to `peak`, then a cosine decay to 0 at `steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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
    start = time.perf_counter()
    pretrain_vision(bundle, settings, show_progress=show_progress)
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
    kind_weights = dict(settings.kind_weights)
    loss_value = float("nan")
    progress = step_progress(f"training {bundle.preset}", show_progress)
    with progress:
        task = progress.add_task("train", total=settings.steps, loss="-")
        for step in range(settings.steps):
            for group in optimizer.param_groups:
                group["lr"] = (
                    cosine_schedule(
                        settings.learning_rate, settings.warmup_steps, settings.steps, step
                    )
                    * group["scale"]
                )
            total_loss = torch.zeros(())
            total_tokens = 0
            for modality, count in (("image", image_count), ("text", text_count)):
                if count == 0:
                    continue
                first = next_index[modality]
                next_index[modality] += count
                requests = [
                    bundle.prompts.encode(
                        make_example(settings.seed, "train", i, modality, kind_weights)
                    )
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
