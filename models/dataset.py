"""A generated multimodal question-answering dataset: coloured shapes on a grid, and text maths.

Nothing is downloaded. Every example is a pure function of (seed, split, index), and each split
only keeps examples whose content hash falls in its bucket range, so the train, validation and
test splits are disjoint by construction and identical on every machine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
# Buckets out of 100 that each split owns (by hash of the example's content).
SPLIT_BUCKETS: dict[str, range] = {
    "train": range(0, 80),
    "val": range(80, 90),
    "test": range(90, 100),
}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 240),
    "yellow": (240, 220, 40),
    "purple": (170, 60, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
GRID = 4  # objects sit in distinct cells of a GRID x GRID layout, aligned to vision patches
MAX_OBJECTS = len(SHAPES)  # every object has its own shape and its own colour
DIRECTIONS: tuple[str, ...] = ("left", "right", "above", "below")
MAX_NUMBER = 20
LIST_LENGTHS = range(2, 7)
NUMBERS: tuple[str, ...] = tuple(str(n) for n in range(MAX_NUMBER + 1))

IMAGE_KINDS: tuple[str, ...] = ("colour", "shape", "count", "position")
# Text questions are small arithmetic over numbers 0-20: comparisons and list questions.
# Their answers are computed from what the question shows, so a held-out question is answerable
# by a model that learned the operation (unlike a memorised fact or an addition table).
TEXT_KINDS: tuple[str, ...] = ("larger", "smaller", "length", "last")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    row: int
    col: int


@dataclass(frozen=True)
class Example:
    """One question with its short answer; `scene` is None for text-only questions."""

    question: str
    answer: str
    kind: str
    scene: tuple[SceneObject, ...] | None = None

    @property
    def has_image(self) -> bool:
        return self.scene is not None

    @property
    def modality(self) -> str:
        return "image" if self.has_image else "text"

    def key(self) -> str:
        """Content identity: what makes two examples the same question about the same input."""
        scene = (
            ""
            if self.scene is None
            else ";".join(f"{o.shape},{o.colour},{o.row},{o.col}" for o in self.scene)
        )
        return f"{scene}|{self.question}"


def vocabulary() -> list[str]:
    """Every word any question or answer can use, in a fixed order (the tokenizer's vocabulary)."""
    words = (
        "what color is the shape how many shapes are there where relative to one "
        "which larger smaller or numbers in last centre ?"
    ).split()
    return list(dict.fromkeys([*words, *COLOURS, *SHAPES, *DIRECTIONS, *NUMBERS]))


def split_of(example: Example) -> Split:
    bucket = int.from_bytes(hashlib.sha256(example.key().encode()).digest()[:8], "big") % 100
    return next(s for s in SPLITS if bucket in SPLIT_BUCKETS[s])


def _random_scene(rng: np.random.Generator, count: int) -> tuple[SceneObject, ...]:
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    shapes = rng.choice(len(SHAPES), size=count, replace=False)
    colours = rng.choice(len(COLOURS), size=count, replace=False)
    names = list(COLOURS)
    return tuple(
        SceneObject(SHAPES[s], names[c], int(cell) // GRID, int(cell) % GRID)
        for cell, s, c in zip(cells, shapes, colours, strict=True)
    )


def _direction_from_centre(obj: SceneObject) -> str | None:
    """Where an object lies relative to the image centre, or None on a diagonal (ambiguous)."""
    centre = (GRID - 1) / 2
    dx, dy = obj.col - centre, obj.row - centre
    if abs(dx) == abs(dy):
        return None
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _image_question(rng: np.random.Generator, kind: str) -> Example | None:
    """Colour and shape questions show one object; count shows 1-4; position shows two.

    Two-step bindings ("the colour of the circle", "the red shape relative to the blue one")
    kept a decoder trained from scratch at chance for 1000+ steps on 2 CPU cores (measured),
    beyond this project's 10-minute training budget. So each question needs at most one
    binding: position asks where one named object lies relative to the image centre, with a
    second object in the scene as a distractor.
    """
    if kind == "colour":
        (obj,) = _random_scene(rng, 1)
        return Example("what color is the shape ?", obj.colour, kind, (obj,))
    if kind == "shape":
        (obj,) = _random_scene(rng, 1)
        return Example("what shape is there ?", obj.shape, kind, (obj,))
    if kind == "count":
        scene = _random_scene(rng, int(rng.integers(1, MAX_OBJECTS + 1)))
        return Example("how many shapes are there ?", str(len(scene)), kind, scene)
    target, distractor = _random_scene(rng, 2)
    direction = _direction_from_centre(target)
    if direction is None:
        return None
    question = f"where is the {target.colour} shape relative to the centre ?"
    return Example(question, direction, kind, (target, distractor))


def _text_question(rng: np.random.Generator, kind: str) -> Example:
    if kind in ("larger", "smaller"):
        a, b = (int(x) for x in rng.choice(MAX_NUMBER + 1, size=2, replace=False))
        answer = max(a, b) if kind == "larger" else min(a, b)
        return Example(f"which is {kind} {a} or {b} ?", str(answer), kind)
    length = int(rng.choice(list(LIST_LENGTHS)))
    numbers = " ".join(str(int(x)) for x in rng.integers(0, MAX_NUMBER + 1, size=length))
    if kind == "length":
        return Example(f"how many numbers are in {numbers} ?", str(length), kind)
    return Example(f"what is the last number in {numbers} ?", numbers.split()[-1], kind)


def make_example(
    seed: int,
    split: Split,
    index: int,
    modality: str,
    kind_weights: Mapping[str, float] | None = None,
) -> Example:
    """The index-th example of a split and modality (rejection-sampled until its hash fits).

    Question kinds are uniform unless `kind_weights` (relative weights; a kind left out weighs
    1) reweights them: training uses this to see more of the hard kinds. Evaluation never does,
    so the validation and test distributions do not depend on any training recipe.
    """
    split_id = SPLITS.index(split)
    modality_id = 0 if modality == "image" else 1
    rng = np.random.default_rng([seed, split_id, modality_id, index])
    kinds = IMAGE_KINDS if modality == "image" else TEXT_KINDS
    if kind_weights:
        unknown = set(kind_weights) - {*IMAGE_KINDS, *TEXT_KINDS}
        if unknown:
            raise ValueError(f"unknown question kinds in kind weights: {sorted(unknown)}")
        weights = np.array([float(kind_weights.get(k, 1.0)) for k in kinds])
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"kind weights must be non-negative, not all zero: {kind_weights}")
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    else:
        kind = kinds[int(rng.integers(len(kinds)))]
    while True:
        example = _image_question(rng, kind) if modality == "image" else _text_question(rng, kind)
        if example is not None and split_of(example) == split:
            return example


def make_examples(
    seed: int, split: Split, count: int, image_fraction: float = 0.5, start: int = 0
) -> list[Example]:
    """A deterministic mix: example i is an image question iff it falls in the image fraction.

    The interleaving is by a fixed stride (not random), so any prefix of the list has the
    requested ratio to within one example.
    """
    if not 0.0 <= image_fraction <= 1.0:
        raise ValueError(f"image fraction must be in [0, 1], got {image_fraction}")
    examples = []
    for i in range(start, start + count):
        is_image = int((i + 1) * image_fraction) > int(i * image_fraction)
        examples.append(make_example(seed, split, i, "image" if is_image else "text"))
    return examples


def render(example: Example, size: int) -> Image.Image:
    """Draw the scene at `size` x `size` pixels (black background, one shape per cell).

    Cells are `size / GRID` pixels wide; the presets choose image and patch sizes so that a
    cell is a whole number of patches, so each shape is seen whole by its own patch tokens.
    """
    if example.scene is None:
        raise ValueError("a text-only example has no image")
    image = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    cell = size / GRID
    radius = cell * 0.4
    for obj in example.scene:
        cx = (obj.col + 0.5) * cell
        cy = (obj.row + 0.5) * cell
        colour = COLOURS[obj.colour]
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if obj.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif obj.shape == "square":
            draw.rectangle(box, fill=colour)
        elif obj.shape == "triangle":
            draw.polygon(
                [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)],
                fill=colour,
            )
        else:
            bar = radius * 0.38
            draw.rectangle((cx - radius, cy - bar, cx + radius, cy + bar), fill=colour)
            draw.rectangle((cx - bar, cy - radius, cx + bar, cy + radius), fill=colour)
    return image


def render_array(example: Example, size: int) -> np.ndarray:
    """The rendered scene as a uint8 (size, size, 3) array."""
    return np.asarray(render(example, size), dtype=np.uint8)
