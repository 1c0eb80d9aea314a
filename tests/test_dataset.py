"""The generated dataset: deterministic, balanced, and with disjoint splits."""

from collections import Counter

import numpy as np
import pytest

from models.dataset import (
    COLOURS,
    DIRECTIONS,
    GRID,
    IMAGE_KINDS,
    SHAPES,
    TEXT_KINDS,
    make_example,
    make_examples,
    render_array,
    split_of,
)


def test_examples_are_deterministic_by_seed():
    assert make_examples(3, "train", 60) == make_examples(3, "train", 60)
    assert make_examples(3, "train", 60) != make_examples(4, "train", 60)


def test_splits_are_disjoint_and_each_example_is_in_its_split():
    keys = {}
    for split, count in (("train", 1500), ("val", 600), ("test", 600)):
        examples = make_examples(0, split, count)
        assert all(split_of(e) == split for e in examples)
        keys[split] = {e.key() for e in examples}
    assert not keys["train"] & keys["val"]
    assert not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]


def test_image_fraction_is_respected_in_every_prefix():
    examples = make_examples(0, "test", 101, image_fraction=0.3)
    for n in (10, 50, 101):
        images = sum(e.has_image for e in examples[:n])
        assert abs(images - 0.3 * n) <= 1
    assert all(not e.has_image for e in make_examples(0, "test", 20, image_fraction=0.0))
    with pytest.raises(ValueError):
        make_examples(0, "test", 5, image_fraction=1.5)


def _balanced(answers: list[str], categories, tolerance: float = 0.35) -> None:
    counts = Counter(answers)
    expected = len(answers) / len(categories)
    assert set(counts) <= set(categories)
    for category in categories:
        assert abs(counts[category] - expected) <= tolerance * expected, (category, counts)


def test_answers_are_balanced_within_each_question_kind():
    examples = [make_example(1, "train", i, "image") for i in range(2400)]
    by_kind = {k: [e.answer for e in examples if e.kind == k] for k in IMAGE_KINDS}
    assert all(len(v) > 400 for v in by_kind.values())
    _balanced(by_kind["colour"], list(COLOURS))
    _balanced(by_kind["shape"], list(SHAPES))
    _balanced(by_kind["count"], ["1", "2", "3", "4"])
    _balanced(by_kind["position"], list(DIRECTIONS))
    texts = [make_example(1, "train", i, "text") for i in range(1200)]
    assert {e.kind for e in texts} == set(TEXT_KINDS)
    comparisons = [e for e in texts if e.kind in ("larger", "smaller")]
    first_is_answer = sum(e.question.split()[3] == e.answer for e in comparisons)
    assert 0.4 < first_is_answer / len(comparisons) < 0.6


def _expected_direction(row: int, col: int) -> str:
    """Where cell (row, col) lies from the image centre: the larger offset wins."""
    centre = (GRID - 1) / 2  # 1.5: the centre lies between the middle cells
    dx, dy = col - centre, row - centre
    assert abs(dx) != abs(dy), "a diagonal position is ambiguous and must never be asked"
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"  # rows count down from the top


def test_expected_direction_known_cells():
    assert GRID == 4
    assert _expected_direction(1, 0) == "left" and _expected_direction(2, 3) == "right"
    assert _expected_direction(0, 1) == "above" and _expected_direction(3, 2) == "below"


def test_answers_are_correct_for_the_question():
    positions = 0
    for e in make_examples(2, "val", 300):
        words = e.question.split()
        if e.kind == "larger":
            assert int(e.answer) == max(int(words[3]), int(words[5]))
        elif e.kind == "smaller":
            assert int(e.answer) == min(int(words[3]), int(words[5]))
        elif e.kind == "length":
            assert int(e.answer) == len(words) - 6
        elif e.kind == "last":
            assert e.answer == words[-2]
        elif e.kind == "count":
            assert int(e.answer) == len(e.scene)
        elif e.kind == "colour":
            assert e.answer == e.scene[0].colour and len(e.scene) == 1
        elif e.kind == "shape":
            assert e.answer == e.scene[0].shape and len(e.scene) == 1
        elif e.kind == "position":
            target, distractor = e.scene
            assert target.colour == words[3] and distractor.colour != words[3]
            assert e.answer == _expected_direction(target.row, target.col), e
            positions += 1
    assert positions >= 20  # the branch above really ran


def test_kind_weights_reweight_training_kinds_and_leave_the_default_alone():
    weights = {"position": 3.0, "larger": 2.0, "smaller": 2.0}
    images = [make_example(0, "train", i, "image", weights).kind for i in range(1200)]
    assert 0.42 < images.count("position") / len(images) < 0.58  # 3/6, against 1/4 uniform
    assert set(images) == set(IMAGE_KINDS)
    texts = [make_example(0, "train", i, "text", weights).kind for i in range(1200)]
    comparisons = sum(k in ("larger", "smaller") for k in texts) / len(texts)
    assert 0.6 < comparisons < 0.73  # 4/6, against 1/2 uniform
    assert make_example(0, "test", 7, "image", None) == make_example(0, "test", 7, "image")
    with pytest.raises(ValueError):
        make_example(0, "train", 0, "image", {k: 0.0 for k in IMAGE_KINDS})
    with pytest.raises(ValueError):
        make_example(0, "train", 0, "image", {"postion": 3.0})


def test_render_draws_each_object_in_its_cell_in_its_colour():
    example = next(e for e in make_examples(0, "test", 40) if e.has_image and len(e.scene) >= 2)
    size = 64
    pixels = render_array(example, size)
    cell = size // GRID
    for obj in example.scene:
        centre = pixels[obj.row * cell + cell // 2, obj.col * cell + cell // 2]
        assert tuple(centre) == COLOURS[obj.colour]
    assert pixels.dtype == np.uint8 and pixels.shape == (size, size, 3)
