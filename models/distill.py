"""Knowledge distillation (paper §2.1): a smaller student of the teacher's family, trained from it.

The student is a LLaVA model like the teacher with fewer decoder and vision layers (and, when
asked, a narrower decoder). Where shapes agree its weights start from the teacher's, layer i from
the teacher layer it is aligned with, as DistilBERT initialised from every other layer.

Its loss, per training example (each term switchable, all recorded with the checkpoint):
- hard: cross-entropy on the answer tokens, weighted 1 − α;
- soft: Hinton's soft targets, T² · KL(teacher ‖ student) of the temperature-T softmaxes on the
  answer tokens, weighted α;
- attention: KL(teacher ‖ student) between the attention distributions of aligned decoder
  layers, averaged over heads (over head means when the head counts differ) and query positions;
- hidden: mean squared error between aligned layers' hidden states, through a learned linear
  projection when the widths differ.

The differentially private variant runs DP-SGD over a fixed private set: every step samples each
of its examples with probability q (Poisson), clips each sampled example's gradient to L2 norm C,
adds Gaussian noise of standard deviation σ·C to the sum and divides by the expected batch q·N.
σ is the smallest noise that keeps ε (RDP accountant, `models.privacy`) at the target after all
steps. The guarantee covers membership of an example in the student's private set; the teacher
is treated as public (it was trained on another stream of the generated data).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaForConditionalGeneration

from models.bundle import ModelBundle
from models.dataset import make_example
from models.privacy import PrivacySpent, noise_for_epsilon, privacy_spent
from models.prompting import Request
from models.train import IGNORE, collate, cosine_schedule, step_progress

# A stream of the training split the teacher never drew from (it used seeds 0 and 1).
DISTILL_SEED = 2


@dataclass(frozen=True)
class StudentShape:
    """How the student is smaller: None keeps the teacher's value."""

    decoder_layers: int
    vision_layers: int
    text_hidden: int | None = None
    text_intermediate: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PrivacySettings:
    """DP-SGD's target and mechanism; the noise multiplier is derived from them."""

    target_epsilon: float
    delta: float = 1e-5
    clip_norm: float = 1.0
    private_examples: int = 20_000  # the private set: the first N examples of the stream

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DistillRecipe:
    """Everything that changes the student's weights; part of its cache key."""

    steps: int = 500
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 25
    image_fraction: float = 0.65
    kind_weights: tuple[tuple[str, float], ...] = ()
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the soft-target loss; the hard labels get 1 − alpha
    attention_weight: float = 0.0
    hidden_weight: float = 0.0
    privacy: PrivacySettings | None = None
    seed: int = DISTILL_SEED

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["privacy"] = self.privacy.to_dict() if self.privacy else None
        return data


@dataclass(frozen=True)
class StudentSpec:
    """A named student: its shape and recipe."""

    name: str
    description: str
    shape: StudentShape
    recipe: DistillRecipe

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "shape": self.shape.to_dict(),
            "recipe": self.recipe.to_dict(),
        }


@dataclass
class DistillResult:
    steps: int
    seconds: float
    final_loss: float
    losses: dict[str, float]  # the last step's terms
    privacy: PrivacySpent | None = None


# --- shapes --------------------------------------------------------------------------------


def aligned_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher layer each student layer stands for: evenly spaced, first and last kept
    (the first reads the embeddings, the last feeds the head)."""
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"a student needs 1..{teacher_layers} layers, got {student_layers}")
    if student_layers == 1:
        return [teacher_layers - 1]
    step = (teacher_layers - 1) / (student_layers - 1)
    return [round(i * step) for i in range(student_layers)]


def _copy_matching(target: nn.Module, source: nn.Module) -> None:
    """Copy every tensor of `source` whose name and shape match one of `target`'s."""
    own = target.state_dict()
    copied = {k: v for k, v in source.state_dict().items() if k in own and own[k].shape == v.shape}
    target.load_state_dict(copied, strict=False)


def build_student(teacher: ModelBundle, shape: StudentShape) -> ModelBundle:
    """An untrained student: the teacher's config made smaller, initialised from the teacher
    wherever a tensor's shape agrees (embeddings, head, aligned layers, projector)."""
    config = teacher.model.config.__class__.from_dict(teacher.model.config.to_dict())
    text, vision = config.text_config, config.vision_config
    teacher_text_layers = text.num_hidden_layers
    teacher_vision_layers = vision.num_hidden_layers
    text.num_hidden_layers = shape.decoder_layers
    vision.num_hidden_layers = shape.vision_layers
    if shape.text_hidden is not None:
        text.hidden_size = shape.text_hidden
        text.head_dim = shape.text_hidden // text.num_attention_heads
    if shape.text_intermediate is not None:
        text.intermediate_size = shape.text_intermediate
    student = LlavaForConditionalGeneration._from_config(config, dtype=teacher.dtype)
    student.to(teacher.device)
    # Whole modules first (names and shapes that agree), then each aligned layer.
    _copy_matching(student, teacher.model)
    text_map = aligned_layers(teacher_text_layers, shape.decoder_layers)
    vision_map = aligned_layers(teacher_vision_layers, shape.vision_layers)
    student_text = student.model.language_model.layers
    for i, t in enumerate(text_map):
        _copy_matching(student_text[i], teacher.decoder_layers[t])
    student_vision = student.model.vision_tower.encoder.layers
    teacher_vision = teacher.vision_encoder.encoder.layers
    for i, t in enumerate(vision_map):
        _copy_matching(student_vision[i], teacher_vision[t])
    student.eval()
    return ModelBundle(
        student,
        replace(teacher.prompts),
        teacher.preset,
        trained=False,
        source="preset",
        metadata={"student": {"shape": shape.to_dict(), "text_layers_from": text_map}},
    )


# --- losses --------------------------------------------------------------------------------


def soft_target_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over positions (rows of the last dim)."""
    teacher_log = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student_log = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (teacher_log.exp() * (teacher_log - student_log)).sum(-1)
    return temperature**2 * kl.mean()


def attention_alignment(
    student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """KL(teacher ‖ student) between attention distributions (batch, heads, query, key), over
    the valid query positions (batch, query), averaged over heads and positions. With
    different head counts both sides are averaged over heads first. Zero when they agree."""
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    tiny = torch.finfo(torch.float32).tiny
    teacher, student = teacher.float(), student.float()
    kl = (teacher * (teacher.clamp_min(tiny).log() - student.clamp_min(tiny).log())).sum(-1)
    weights = valid[:, None, :].to(kl.dtype).expand_as(kl)
    return (kl * weights).sum() / weights.sum().clamp_min(1)


def hidden_alignment(
    student: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor,
    projection: nn.Module | None = None,
) -> torch.Tensor:
    """Mean squared error between hidden states (batch, seq, width) at valid positions, the
    student's through `projection` when its width differs."""
    if projection is not None:
        student = projection(student)
    error = (student.float() - teacher.float()).pow(2).mean(-1)
    weights = valid.to(error.dtype)
    return (error * weights).sum() / weights.sum().clamp_min(1)


@dataclass
class Terms:
    """The loss terms of one batch, each a scalar tensor (zero when switched off)."""

    hard: torch.Tensor
    soft: torch.Tensor
    attention: torch.Tensor
    hidden: torch.Tensor

    def total(self, recipe: DistillRecipe) -> torch.Tensor:
        return (
            (1 - recipe.alpha) * self.hard
            + recipe.alpha * self.soft
            + recipe.attention_weight * self.attention
            + recipe.hidden_weight * self.hidden
        )

    def values(self) -> dict[str, float]:
        return {
            "hard": float(self.hard.detach()),
            "soft": float(self.soft.detach()),
            "attention": float(self.attention.detach()),
            "hidden": float(self.hidden.detach()),
        }


@dataclass
class TeacherOutputs:
    """What the student is aligned with: logits, and attention maps and hidden states of every
    layer when the recipe aligns them (else None)."""

    logits: torch.Tensor
    attentions: Sequence[torch.Tensor] | None
    hidden_states: Sequence[torch.Tensor] | None

    def row(self, i: int, length: int) -> TeacherOutputs:
        """Row i's outputs over its first `length` positions."""
        return TeacherOutputs(
            self.logits[i : i + 1, :length],
            None
            if self.attentions is None
            else [a[i : i + 1, :, :length, :length] for a in self.attentions],
            None
            if self.hidden_states is None
            else [h[i : i + 1, :length] for h in self.hidden_states],
        )


class Distiller:
    """Runs teacher and student on a batch and computes the recipe's loss terms."""

    def __init__(self, teacher: ModelBundle, student: ModelBundle, recipe: DistillRecipe):
        self.teacher, self.student, self.recipe = teacher, student, recipe
        self.text_map = aligned_layers(len(teacher.decoder_layers), len(student.decoder_layers))
        width = student.model.config.text_config.hidden_size
        teacher_width = teacher.model.config.text_config.hidden_size
        self.projection: nn.Module | None = None
        if recipe.hidden_weight and width != teacher_width:
            self.projection = nn.Linear(width, teacher_width, device=student.device)
        self.needs_attention = recipe.attention_weight > 0
        self.needs_hidden = recipe.hidden_weight > 0
        if self.needs_attention:  # attention probabilities exist only in eager attention
            self.kernels = {
                model: model.config._attn_implementation for model in (teacher.model, student.model)
            }
            for model in self.kernels:
                model.set_attn_implementation("eager")

    def parameters(self) -> list[nn.Parameter]:
        extra = list(self.projection.parameters()) if self.projection is not None else []
        return [*self.student.model.parameters(), *extra]

    def _forward(self, model: nn.Module, batch: dict[str, Any]) -> Any:
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            output_attentions=self.needs_attention,
            output_hidden_states=self.needs_hidden,
        )

    @torch.no_grad()
    def teacher_outputs(self, batch: dict[str, Any]) -> TeacherOutputs:
        out = self._forward(self.teacher.model, batch)
        return TeacherOutputs(out.logits, out.attentions, out.hidden_states)

    def terms(self, batch: dict[str, Any], teacher: TeacherOutputs) -> Terms:
        """The loss terms of the student on `batch`, against the teacher's outputs on it."""
        out = self._forward(self.student.model, batch)
        labels = batch["labels"][:, 1:]
        answer = labels != IGNORE
        logits = out.logits[:, :-1]
        hard = F.cross_entropy(logits[answer].float(), labels[answer])
        zero = hard.new_zeros(())
        soft = (
            soft_target_loss(
                logits[answer], teacher.logits[:, :-1][answer], self.recipe.temperature
            )
            if self.recipe.alpha
            else zero
        )
        valid = batch["attention_mask"].bool()
        attention = zero
        if self.needs_attention:
            attention = torch.stack(
                [
                    attention_alignment(out.attentions[i], teacher.attentions[t], valid)
                    for i, t in enumerate(self.text_map)
                ]
            ).mean()
        hidden = zero
        if self.needs_hidden:
            hidden = torch.stack(
                [
                    hidden_alignment(
                        out.hidden_states[i + 1],
                        teacher.hidden_states[t + 1],
                        valid,
                        self.projection,
                    )
                    for i, t in enumerate(self.text_map)
                ]
            ).mean()
        return Terms(hard, soft, attention, hidden)

    def finish(self) -> None:
        """Back to the attention kernels the models had, for serving."""
        if self.needs_attention:
            for model, kernel in self.kernels.items():
                model.set_attn_implementation(kernel)


# --- DP-SGD --------------------------------------------------------------------------------


def clip_gradient(
    gradient: list[torch.Tensor], clip_norm: float
) -> tuple[list[torch.Tensor], float]:
    """One example's gradient scaled to L2 norm at most `clip_norm`, and its norm before."""
    norm = float(torch.sqrt(sum(g.pow(2).sum() for g in gradient)))
    scale = min(1.0, clip_norm / (norm + 1e-12))
    return [g * scale for g in gradient], norm


def noisy_mean(
    summed: list[torch.Tensor],
    noise_multiplier: float,
    clip_norm: float,
    expected_batch: float,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """The sum of clipped gradients plus N(0, (σC)²) noise per entry, over the expected batch."""
    return [
        (
            s
            + torch.randn(s.shape, generator=generator, dtype=s.dtype, device=s.device)
            * (noise_multiplier * clip_norm)
        )
        / expected_batch
        for s in summed
    ]


def poisson_sample(rng: np.random.Generator, population: int, rate: float) -> np.ndarray:
    """Indices of the examples in this step's batch: each independently with probability q."""
    return np.flatnonzero(rng.random(population) < rate)


def _row(
    batch: dict[str, Any], outputs: TeacherOutputs, i: int
) -> tuple[dict[str, Any], TeacherOutputs]:
    """Row i of a right-padded batch and of the teacher's outputs on it, trimmed to its length
    (causal attention: a row's positions never see the padding after them)."""
    length = int(batch["attention_mask"][i].sum())
    pixels = batch["pixel_values"]
    row = {
        "input_ids": batch["input_ids"][i : i + 1, :length],
        "attention_mask": batch["attention_mask"][i : i + 1, :length],
        "labels": batch["labels"][i : i + 1, :length],
        "pixel_values": None if pixels is None else pixels[i : i + 1],
    }
    return row, outputs.row(i, length)


# --- training ------------------------------------------------------------------------------


def _requests(
    student: ModelBundle, recipe: DistillRecipe, modality: str, indices: Sequence[int]
) -> list[Request]:
    weights = dict(recipe.kind_weights)
    return [
        student.prompts.encode(make_example(recipe.seed, "train", int(i), modality, weights))
        for i in indices
    ]


def _sub_batches(student: ModelBundle, recipe: DistillRecipe, step: int) -> list[list[Request]]:
    """Fresh examples for one plain step: an image and a text sub-batch (no cross padding)."""
    images = round(recipe.batch_size * recipe.image_fraction)
    texts = recipe.batch_size - images
    batches = []
    for modality, count in (("image", images), ("text", texts)):
        if count:
            batches.append(
                _requests(student, recipe, modality, range(step * count, (step + 1) * count))
            )
    return batches


def _private_sub_batches(
    student: ModelBundle, recipe: DistillRecipe, chosen: np.ndarray
) -> list[list[Request]]:
    """The Poisson-sampled private examples: index k < N·image_fraction is an image question."""
    privacy = recipe.privacy
    assert privacy is not None
    images = int(privacy.private_examples * recipe.image_fraction)
    image_ids = [int(k) for k in chosen if k < images]
    text_ids = [int(k) - images for k in chosen if k >= images]
    batches = []
    for modality, ids in (("image", image_ids), ("text", text_ids)):
        if ids:
            batches.append(_requests(student, recipe, modality, ids))
    return batches


def noise_multiplier(recipe: DistillRecipe) -> tuple[float, float]:
    """σ for the recipe's privacy target, and the sampling rate q."""
    privacy = recipe.privacy
    assert privacy is not None
    rate = recipe.batch_size / privacy.private_examples
    sigma = noise_for_epsilon(privacy.target_epsilon, rate, recipe.steps, privacy.delta)
    return sigma, rate


def distill(
    teacher: ModelBundle,
    student: ModelBundle,
    recipe: DistillRecipe,
    *,
    show_progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> DistillResult:
    """Train `student` in place from `teacher` (left unchanged); marks the student trained."""
    torch.manual_seed(recipe.seed)
    start = time.perf_counter()
    distiller = Distiller(teacher, student, recipe)
    parameters = distiller.parameters()
    optimizer = torch.optim.AdamW(parameters, lr=recipe.learning_rate, foreach=True)
    pad = student.prompts.tokenizer.pad_token_id
    private = recipe.privacy
    sigma, rate = noise_multiplier(recipe) if private else (0.0, 0.0)
    rng = np.random.default_rng(recipe.seed)
    generator = torch.Generator(device=student.device).manual_seed(recipe.seed)
    teacher.model.eval()
    student.model.train()
    loss = float("nan")
    values: dict[str, float] = {}
    progress = step_progress(f"distilling a student of {student.preset}", show_progress)
    with progress:
        task = progress.add_task("distill", total=recipe.steps, loss="-")
        for step in range(recipe.steps):
            for group in optimizer.param_groups:
                group["lr"] = cosine_schedule(
                    recipe.learning_rate, recipe.warmup_steps, recipe.steps, step
                )
            optimizer.zero_grad(set_to_none=True)
            if private:
                chosen = poisson_sample(rng, private.private_examples, rate)
                sub_batches = _private_sub_batches(student, recipe, chosen)
                loss, values = private_step(
                    distiller, sub_batches, parameters, pad, sigma, rate, generator
                )
            else:
                loss, values = _plain_step(distiller, _sub_batches(student, recipe, step), pad)
                torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            progress.update(task, advance=1, loss=f"{loss:.3f}")
            if on_step is not None:
                on_step(step, loss)
    distiller.finish()
    student.model.eval()
    student.trained = True
    spent = privacy_spent(sigma, rate, recipe.steps, private.delta) if private is not None else None
    return DistillResult(recipe.steps, time.perf_counter() - start, loss, values, spent)


def _plain_step(
    distiller: Distiller, sub_batches: list[list[Request]], pad: int
) -> tuple[float, dict[str, float]]:
    """Backward of the mean loss over the sub-batches (weighted by their sizes)."""
    total = sum(len(b) for b in sub_batches)
    loss_value = 0.0
    sums: dict[str, float] = {}
    for requests in sub_batches:
        batch = collate(requests, pad)
        terms = distiller.terms(batch, distiller.teacher_outputs(batch))
        loss = terms.total(distiller.recipe) * (len(requests) / total)
        loss.backward()
        loss_value += float(loss.detach())
        for key, value in terms.values().items():
            sums[key] = sums.get(key, 0.0) + value * len(requests) / total
    return loss_value, sums


def private_step(
    distiller: Distiller,
    sub_batches: list[list[Request]],
    parameters: list[nn.Parameter],
    pad: int,
    sigma: float,
    rate: float,
    generator: torch.Generator,
) -> tuple[float, dict[str, float]]:
    """DP-SGD: each example's gradient clipped alone, summed, noised, over the expected batch;
    the result is left in each parameter's .grad for the optimizer."""
    privacy = distiller.recipe.privacy
    assert privacy is not None
    summed = [torch.zeros_like(p) for p in parameters]
    losses: list[float] = []
    for requests in sub_batches:
        batch = collate(requests, pad)
        outputs = distiller.teacher_outputs(batch)
        for i in range(len(requests)):
            row, teacher_row = _row(batch, outputs, i)
            loss = distiller.terms(row, teacher_row).total(distiller.recipe)
            gradient = torch.autograd.grad(loss, parameters, allow_unused=True)
            gradient = [
                torch.zeros_like(p) if g is None else g
                for g, p in zip(gradient, parameters, strict=True)
            ]
            clipped, _ = clip_gradient(gradient, privacy.clip_norm)
            for s, g in zip(summed, clipped, strict=True):
                s.add_(g)
            losses.append(float(loss.detach()))
    expected = rate * privacy.private_examples
    for parameter, noisy in zip(
        parameters, noisy_mean(summed, sigma, privacy.clip_norm, expected, generator), strict=True
    ):
        parameter.grad = noisy
    mean = float(np.mean(losses)) if losses else float("nan")
    return mean, {"total": mean}
